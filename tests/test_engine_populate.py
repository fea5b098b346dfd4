"""The populate engine on real memory: memfd, tmpfs and hugetlbfs, with real threads."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.engine.populate import EngineOps, WorkItem, populate
from kvmaccel.errors import CancelledError, PopulateError
from kvmaccel.host import sysmem
from kvmaccel.host.facts import HostFacts, NumaNode, read_host
from kvmaccel.plan.limits import Limits, split_across_nodes

from .conftest import free_hugepages_2m

MIB = 1 << 20


def resident(fd: int, length: int, page: int) -> int:
    addr = sysmem.mmap_shared(fd, length)
    try:
        return sysmem.resident_pages(addr, length, page)
    finally:
        sysmem.munmap(addr, length)


def memfd(size: int, huge_kib: int | None = None) -> int:
    flags = os.MFD_CLOEXEC
    if huge_kib:
        flags |= os.MFD_HUGETLB | ((huge_kib * 1024).bit_length() - 1) << 26
    fd = os.memfd_create("kvtest", flags)
    os.ftruncate(fd, size)
    return fd


def two_threads() -> Limits:
    return Limits(threads=2, max_helpers_host=1, max_helpers_per_node=1,
                  min_chunk_bytes=16 * MIB, idle_cpus_only=False)


def test_memfd_populated_and_resident() -> None:
    size = 256 * MIB
    fd = memfd(size)
    try:
        assert resident(fd, size, 4096) == 0
        result = populate([WorkItem(fd, 0, size, 4096)], read_host(), two_threads())
        assert result.bytes_total == size
        assert sum(result.bytes_per_node.values()) == size
        assert result.threads == 2 and result.method == "madvise"
        assert resident(fd, size, 4096) == size // 4096
    finally:
        os.close(fd)


def test_tmpfs_file_populated_and_resident(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "guest")
    backings, result = populate_backings([BackingSpec(path, 128 * MIB, nodes=(0,))], read_host(),
                                         two_threads(), keep_open=True)
    (b,) = backings
    try:
        assert b.fs_kind == "tmpfs" and b.created
        assert os.stat(path).st_size == 128 * MIB
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert resident(b.fd, 128 * MIB, 4096) == 128 * MIB // 4096
        assert result.bytes_per_node == {0: 128 * MIB}
    finally:
        b.close()


def test_hugetlbfs_file_takes_huge_pages(hugetlbfs: str) -> None:
    path = os.path.join(hugetlbfs, "kvtest-guest")
    before = free_hugepages_2m()
    backings, result = populate_backings([BackingSpec(path, 256 * MIB)], read_host(),
                                         two_threads())
    assert backings[0].page_size_bytes == 2 * MIB and backings[0].fs_kind == "hugetlbfs"
    assert result.chunks >= 2
    # The pages stay in the file after the engine unmapped it: 128 fewer free pages.
    assert before - free_hugepages_2m() == 128
    os.unlink(path)
    assert free_hugepages_2m() == before


def test_huge_memfd(hugetlbfs: str) -> None:
    before = free_hugepages_2m()
    fd = memfd(64 * MIB, 2048)
    try:
        populate([WorkItem(fd, 0, 64 * MIB, 2 * MIB)], read_host(), two_threads())
        assert before - free_hugepages_2m() == 32
    finally:
        os.close(fd)
    assert free_hugepages_2m() == before


def task_state(tid: int) -> tuple[int, frozenset[int], str]:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    nice = int(fields[16])  # field 19 of stat; fields[0] is field 3
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list"))
    from kvmaccel.model.units import parse_cpu_spec
    with open(f"/proc/self/task/{tid}/comm") as f:
        comm = f.read().strip()
    return nice, parse_cpu_spec(line.split(":")[1].strip()), comm


def test_helpers_niced_and_pinned_while_running() -> None:
    """Read niceness and affinity of the helper threads from /proc while they populate."""
    size = 256 * MIB
    fd = memfd(size)
    host = read_host()
    seen: dict[int, tuple[int, frozenset[int], str]] = {}
    release = threading.Event()

    def slow_populate(addr: int, length: int) -> None:
        if threading.get_native_id() != caller:
            release.wait(5)  # keep helpers busy until the caller has looked
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)

    def progress(done: int, total: int) -> None:
        if release.is_set():
            return
        for tid in map(int, os.listdir("/proc/self/task")):
            state = task_state(tid)
            if state[2].startswith("kvmaccel-"):
                seen[tid] = state
        if seen:
            release.set()

    caller = threading.get_native_id()
    caller_nice = os.getpriority(os.PRIO_PROCESS, caller)
    limits = dataclasses.replace(two_threads(), nice=17)
    try:
        populate([WorkItem(fd, 0, size, 4096, node_id=0)], host, limits,
                 progress=progress, ops=EngineOps(populate=slow_populate))
    finally:
        os.close(fd)
        release.set()
    assert len(seen) == 1
    (nice, cpus, comm), = seen.values()
    assert comm == "kvmaccel-0-0"
    assert nice == 17  # or boosted to the caller's, but not before the caller ran dry
    assert cpus == host.nodes[0].cpus & frozenset(os.sched_getaffinity(0))
    assert os.getpriority(os.PRIO_PROCESS, caller) == caller_nice  # caller keeps its priority


HANG_S = 30.0
"""A hang guard for the tests' own waits (never a speed bound: this machine is shared)."""


def test_dynamic_balancing_with_uneven_chunks() -> None:
    """One chunk takes as long as all the others together (its step waits until the other
    thread has done the rest): whoever gets it does that one chunk while the other thread
    does all seven others (a static split would give each half, and hang here)."""
    size = 256 * MIB
    fd = memfd(size)
    per_thread: dict[int, int] = {}
    lock = threading.Lock()
    slow_tid: list[int] = []
    rest_done = threading.Event()

    def uneven(addr: int, length: int) -> None:
        tid = threading.get_native_id()
        with lock:
            slow = not slow_tid
            if slow:
                slow_tid.append(tid)
        if slow:
            assert rest_done.wait(HANG_S), "the other thread never did the rest"
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)
        with lock:
            per_thread[tid] = per_thread.get(tid, 0) + length
            if sum(n for t, n in per_thread.items() if t != slow_tid[0]) == size - length:
                rest_done.set()

    limits = Limits(threads=2, max_helpers_host=1, max_helpers_per_node=1,
                    min_chunk_bytes=16 * MIB, idle_cpus_only=False)
    try:
        result = populate([WorkItem(fd, 0, size, 4096)], read_host(), limits,
                          ops=EngineOps(populate=uneven))
    finally:
        os.close(fd)
    assert result.chunks == 8
    assert sum(per_thread.values()) == size
    (slow,) = slow_tid
    assert per_thread[slow] == size // 8  # the slow chunk, and nothing else
    assert [n for t, n in per_thread.items() if t != slow] == [7 * size // 8]


def fake_two_node_host() -> HostFacts:
    """This machine's CPUs presented as two nodes (a real two-node host cannot exist here)."""
    real = read_host()
    cpus = sorted(real.online_cpus)
    half = max(1, len(cpus) // 2)
    nodes = {0: NumaNode(0, frozenset(cpus[:half])), 1: NumaNode(1, frozenset(cpus[half:]))}
    return dataclasses.replace(real, nodes=nodes)


def test_helpers_steal_from_other_nodes_and_bind_per_node() -> None:
    """Node 1's helper is stuck in its first step, and so is the caller, until node 0's
    helper has run dry and taken one of node 1's chunks (a hang guard fails the test if it
    never does).  Each node's range is bound to its node before any helper starts."""
    size = 128 * MIB
    fd = memfd(2 * size)
    host = fake_two_node_host()
    binds: list[tuple[int, int, str, frozenset[int]]] = []
    by_thread: dict[str, list[int]] = {}
    lock = threading.Lock()
    stolen_one = threading.Event()

    def work(addr: int, length: int) -> None:
        name = threading.current_thread().name
        with lock:
            by_thread.setdefault(name, []).append(addr)
        if name == "kvmaccel-0-0" and in_node1(addr):
            stolen_one.set()
        elif name != "kvmaccel-0-0":  # node 1's helper and the caller wait for the steal
            assert stolen_one.wait(HANG_S), "node 0's helper never took node 1's work"
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)

    def bind(addr: int, length: int, policy: str, nodes: frozenset[int]) -> None:
        assert threading.active_count() == base_threads  # before any helper exists
        binds.append((addr, length, policy, nodes))

    def in_node1(addr: int) -> bool:  # node 1's mapping (mmap may place it below node 0's)
        return binds[1][0] <= addr < binds[1][0] + binds[1][1]

    base_threads = threading.active_count()
    limits = Limits(threads=3, max_helpers_host=2, max_helpers_per_node=1,
                    min_chunk_bytes=16 * MIB, idle_cpus_only=False)
    items = [WorkItem(fd, 0, size, 4096, node_id=0), WorkItem(fd, size, size, 4096, node_id=1)]
    try:
        result = populate(items, host, limits,
                          ops=EngineOps(populate=work, bind=bind, pin=lambda cpus: None))
    finally:
        os.close(fd)
    assert result.helpers_per_node == {0: 1, 1: 1}
    assert [(b[1], b[2], b[3]) for b in binds] == [(size, "bind", frozenset({0})),
                                                  (size, "bind", frozenset({1}))]
    stolen = [a for a in by_thread.get("kvmaccel-0-0", []) if in_node1(a)]
    assert stolen, "node 0's helper never took node 1's work"
    assert not [a for a in by_thread.get("kvmaccel-1-0", []) if not in_node1(a)]
    assert result.bytes_per_node == {0: size, 1: size}


def test_caller_takes_over_a_starved_helpers_chunk() -> None:
    """A helper that barely runs (as at nice 19 on a busy host) does not hold the job up:
    the caller takes the unclaimed rest of its chunk.  Here the helper's step lasts until
    the caller has taken that rest (a hang guard fails the test if it never does)."""
    size = 256 * MIB
    fd = memfd(size)
    steps: list[tuple[bool, int]] = []  # (by the caller, address) of every step
    lock = threading.Lock()
    helper_in_step, took_over = threading.Event(), threading.Event()
    caller = threading.get_native_id()

    def work(addr: int, length: int) -> None:
        mine = threading.get_native_id() == caller
        with lock:
            steps.append((mine, addr))
            if mine and any(not m and a + length == addr for m, a in steps):
                took_over.set()  # the step after the helper's own, in the helper's chunk
        if mine:  # the caller holds its chunk until the helper is inside the other one
            assert helper_in_step.wait(HANG_S), "the helper never started a step"
        else:
            helper_in_step.set()
            took_over.wait(HANG_S)  # starved: its step lasts until the caller took the rest
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)

    # Two chunks, one per thread; each chunk is two 64 MiB steps.
    limits = Limits(threads=2, max_helpers_host=1, max_helpers_per_node=1,
                    min_chunk_bytes=size // 2, idle_cpus_only=False)
    try:
        result = populate([WorkItem(fd, 0, size, 4096)], read_host(), limits,
                          ops=EngineOps(populate=work))
    finally:
        os.close(fd)
    assert result.chunks == 2
    assert [m for m, _ in steps].count(False) == 1  # the helper did one step, not its chunk
    assert took_over.is_set(), steps
    assert result.bytes_by_caller == 3 * 64 * MIB  # its own chunk and the helper's rest


def test_touch_fallback_when_kernel_lacks_populate_write() -> None:
    size = 32 * MIB
    fd = memfd(size)

    def einval(addr: int, length: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    try:
        result = populate([WorkItem(fd, 0, size, 4096)], read_host(), two_threads(),
                          ops=EngineOps(populate=einval))
        assert result.method == "touch"
        assert resident(fd, size, 4096) == size // 4096
    finally:
        os.close(fd)


def test_first_error_stops_the_others() -> None:
    size = 512 * MIB
    fd = memfd(size)
    calls = []

    def failing(addr: int, length: int) -> None:
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        time.sleep(0.02)

    try:
        with pytest.raises(PopulateError, match="I/O error"):
            populate([WorkItem(fd, 0, size, 4096)], read_host(),
                     dataclasses.replace(two_threads(), min_chunk_bytes=64 * MIB),
                     ops=EngineOps(populate=failing))
    finally:
        os.close(fd)
    assert len(calls) <= 4  # 8 steps in all; the others stopped at their next step
    assert threading.active_count() == 1


def test_cancel_event_stops_the_run() -> None:
    size = 512 * MIB
    fd = memfd(size)
    cancel = threading.Event()

    def work(addr: int, length: int) -> None:
        cancel.set()
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)

    try:
        with pytest.raises(CancelledError):
            populate([WorkItem(fd, 0, size, 4096)], read_host(), two_threads(),
                     cancel=cancel, ops=EngineOps(populate=work))
    finally:
        os.close(fd)
    assert threading.active_count() == 1


def test_unaligned_item_is_refused() -> None:
    with pytest.raises(PopulateError, match="multiple"):
        populate([WorkItem(0, 0, 4097, 4096)], read_host())


def test_split_across_nodes() -> None:
    page = 2 * MIB
    assert split_across_nodes(10 * page, (), page) == [(None, 0, 10 * page)]
    assert split_across_nodes(10 * page, (0, 1), page) == [(0, 0, 5 * page),
                                                          (1, 5 * page, 5 * page)]
    assert split_across_nodes(7 * page, (2, 3), page) == [(2, 0, 4 * page),
                                                         (3, 4 * page, 3 * page)]


def test_niced_helpers_only_on_idle_cpus() -> None:
    """With a CPU-bound process on every CPU, no helper at nice 19 is started (it would
    starve and hold the caller up); helpers at the caller's own nice still are."""
    import subprocess
    import sys

    size = 128 * MIB
    cpus = len(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(cpus)]
    fd = memfd(size)
    try:
        time.sleep(0.3)
        limits = Limits(threads=2, max_helpers_host=1, min_chunk_bytes=16 * MIB)
        result = populate([WorkItem(fd, 0, size, 4096)], read_host(), limits)
        assert result.threads == 1
        assert any(r.startswith("host busy: 0 idle CPU(s) for helpers at nice 19")
                   for r in result.reasons), result.reasons
        same_nice = dataclasses.replace(limits, nice=os.getpriority(os.PRIO_PROCESS, 0))
        assert populate([WorkItem(fd, 0, size, 4096)], read_host(), same_nice).threads == 2
        ungated = dataclasses.replace(limits, idle_cpus_only=False)
        assert populate([WorkItem(fd, 0, size, 4096)], read_host(), ungated).threads == 2
    finally:
        os.close(fd)
        for b in burners:
            b.kill()
            b.wait()
