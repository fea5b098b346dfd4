"""The warm pool on real hugetlbfs and tmpfs files: states, linking, scrubbing, limits."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from kvmaccel.host.facts import read_host
from kvmaccel.plan.limits import Limits
from kvmaccel.pool.manage import Pool, PoolError, PoolKey, key_for, pool_dir_for

from .conftest import free_hugepages_2m
from .test_pool_isolation import count, write_all_over

MIB = 1 << 20
PATTERN = b"guest-secret-"


@pytest.fixture
def huge_area(hugetlbfs: str) -> Iterator[tuple[str, str]]:
    """(pool directory, guest directory) on the 2M hugetlbfs, removed afterwards."""
    base = tempfile.mkdtemp(prefix="kvtest-pool-", dir=hugetlbfs)
    pool_dir, guest_dir = os.path.join(base, "pool"), os.path.join(base, "guest")
    os.makedirs(guest_dir)
    yield pool_dir, guest_dir
    shutil.rmtree(base, ignore_errors=True)


def limits() -> Limits:
    return Limits(threads=2, max_helpers_host=1, min_chunk_bytes=16 * MIB, idle_cpus_only=False)


def write_pattern(path: str, size: int, every: int) -> None:
    """What a guest does: write its data all over the memory."""
    write_all_over(path, size, PATTERN, every)


def pattern_count(path: str, size: int) -> int:
    return count(path, size, PATTERN)


def test_key_filename_round_trip() -> None:
    key = PoolKey(8 << 30, 2048, (0, 1), "bind", "0b7e3a38-7b0e-4c0e-9d7b-6b0c5a1b2c3d")
    assert PoolKey.from_filename(key.filename("0123abcd")) == key
    assert PoolKey.from_filename(PoolKey(4096, 4).filename("deadbeef")) == PoolKey(4096, 4)
    assert PoolKey.from_filename("not-ours") is None
    with pytest.raises(Exception, match="multiple"):
        key_for(3 * MIB, 2048)


def test_pool_dir_is_on_the_guests_filesystem() -> None:
    mounts = read_host().mounts
    assert pool_dir_for("/dev/shm/libvirt/qemu/1-x/pc.ram", mounts) == "/dev/shm/.kvmaccel-pool"
    with pytest.raises(Exception, match="not hugetlbfs or tmpfs"):
        pool_dir_for("/var/lib/libvirt/qemu/ram/1-x/pc.ram", mounts)


def test_guest_data_never_reaches_the_next_guest(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    host = read_host()
    pool = Pool(pool_dir)
    key = key_for(32 * MIB, 2048)
    free_before = free_hugepages_2m()
    pool.fill(key, 2, host, limits())
    assert [e.state for e in pool.entries()] == ["clean", "clean"]
    assert free_before - free_hugepages_2m() == 32

    # Guest A starts from the pool and writes all over its memory.
    target = os.path.join(guest_dir, "a-ram")
    taken = pool.take(key, target, domain_uuid="uuid-a", backend_id="pc.ram", uid=65534)
    assert taken is not None and os.stat(target).st_nlink == 2
    assert os.stat(target).st_uid == 65534 and os.stat(target).st_mode & 0o777 == 0o600
    write_pattern(target, 32 * MIB, 2 * MIB)
    os.unlink(target)  # libvirt removes the guest's directory after it stops
    assert {e.state for e in pool.entries()} == {"clean", "dirty"}  # its guest is gone

    pool.release_domain("uuid-a")
    dirty = [e for e in pool.entries() if e.state == "dirty"]
    assert len(dirty) == 1 and pattern_count(dirty[0].path, 32 * MIB) == 16

    # Guest B gets the other clean file, never the dirty one; then none is left.
    b1 = pool.take(key, os.path.join(guest_dir, "b-ram"), domain_uuid="uuid-b",
                   backend_id="pc.ram")
    assert b1 is not None and b1.path != dirty[0].path
    assert pool.take(key, os.path.join(guest_dir, "c-ram"), domain_uuid="uuid-c",
                     backend_id="pc.ram") is None
    assert not os.path.exists(os.path.join(guest_dir, "c-ram"))

    # The scrub zeroes it; guest C then gets it, with none of A's bytes.
    assert [e.path for e in pool.scrub(host, limits())] == [dirty[0].path]
    c = pool.take(key, os.path.join(guest_dir, "c-ram"), domain_uuid="uuid-c",
                  backend_id="pc.ram")
    assert c is not None and c.path == dirty[0].path
    assert pattern_count(os.path.join(guest_dir, "c-ram"), 32 * MIB) == 0
    assert free_before - free_hugepages_2m() == 32  # the pool kept its pages throughout


def test_unreadable_or_foreign_state_is_dirty(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    pool = Pool(pool_dir)
    key = key_for(4 * MIB, 2048)
    pool.fill(key, 2, read_host(), limits())
    first, second = pool.entries()
    with open(pool._state_path(first.path), "w") as f:
        f.write("{not json")
    with open(pool._state_path(second.path)) as f:
        record = json.load(f)
    record["ino"] += 1  # a state written for another file
    with open(pool._state_path(second.path), "w") as f:
        json.dump(record, f)
    assert [e.state for e in pool.entries()] == ["dirty", "dirty"]
    assert pool.take(key, os.path.join(guest_dir, "x"), domain_uuid="u",
                     backend_id="pc.ram") is None


def test_clean_file_with_a_second_link_is_not_handed_out(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    pool = Pool(pool_dir)
    key = key_for(4 * MIB, 2048)
    pool.fill(key, 1, read_host(), limits())
    (entry,) = pool.entries()
    os.link(entry.path, os.path.join(guest_dir, "sneaky"))
    assert pool.entries()[0].state == "dirty"
    assert pool.take(key, os.path.join(guest_dir, "x"), domain_uuid="u",
                     backend_id="pc.ram") is None


def pattern_at(fd: int, size: int, every: int) -> int:
    """How many of the places :func:`write_pattern` wrote (every ``every`` bytes) still hold
    the pattern: a cheap look at a scrub's progress (one short pread per place)."""
    return sum(os.pread(fd, len(PATTERN), off) == PATTERN for off in range(0, size, every))


def dirty_pool_file(pool_dir: str, size: int) -> tuple[Pool, PoolKey, str]:
    """A pool of one tmpfs file a guest wrote all over (every MiB) and released: dirty."""
    pool = Pool(pool_dir)
    key = key_for(size, 4)
    pool.fill(key, 1, read_host(), limits())
    (entry,) = pool.entries()
    write_pattern(entry.path, size, 1 * MIB)
    pool._write_state(entry.path, "dirty")
    return pool, key, entry.path


def real_scrub(pool_dir: str) -> subprocess.Popen[bytes]:
    """The real scrub, in a process of its own, at nice 19 (it zeroes slowly on a busy host;
    it is never paused or faked)."""
    return subprocess.Popen([sys.executable, "-c",
                             "import os\n"
                             "os.nice(19)\n"
                             "from kvmaccel import paths\n"
                             "paths.use(paths.resolve(os.environ))  # as an entry point\n"
                             "from kvmaccel.pool.manage import Pool\n"
                             "from kvmaccel.host.facts import read_host\n"
                             f"Pool({pool_dir!r}).scrub(read_host())\n"])


def all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T in /proc/PID/task/TID/stat)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that has exited
            continue
    return all(s in ("T", "t") for s in states)


def test_scrub_killed_midway_leaves_the_file_dirty(shm_dir: str) -> None:
    """SIGKILL the real scrub once it has zeroed some of the file but not all: the file is
    never handed out until a later scrub finishes."""
    pool_dir, guest_dir = os.path.join(shm_dir, "pool"), os.path.join(shm_dir, "guest")
    os.makedirs(guest_dir)
    size = 1024 * MIB
    pool, key, path = dirty_pool_file(pool_dir, size)
    proc = real_scrub(pool_dir)
    fd = -1
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a speed bound
        while pool.entries()[0].recorded_state != "scrubbing":  # past its "nobody holds it"
            assert proc.poll() is None and time.monotonic() < deadline, pool.entries()
            time.sleep(0.001)
        fd = os.open(path, os.O_RDONLY)  # only now: the scrub skips a file another holds
        left = pattern_at(fd, size, MIB)
        while left == size // MIB:  # until it has zeroed some
            assert proc.poll() is None and time.monotonic() < deadline, "the scrub never began"
            left = pattern_at(fd, size, MIB)
        os.kill(proc.pid, signal.SIGSTOP)  # mid-way: checked below, then killed
        while not all_stopped(proc.pid):  # SIGSTOP reaches each thread in its own time
            assert time.monotonic() < deadline, "the scrub never stopped"
            time.sleep(0.001)
        left = pattern_at(fd, size, MIB)
        assert 0 < left < size // MIB, f"not caught mid-way: {left} MiB still hold data"
        (entry,) = pool.entries()
        assert entry.state == "scrubbing" and entry.recorded_state == "scrubbing"
        assert Pool(pool_dir).scrub(read_host()) == []  # another scrubber holds it
    finally:
        if fd >= 0:
            os.close(fd)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (entry,) = pool.entries()
    assert entry.recorded_state == "scrubbing" and entry.state == "dirty"
    assert pattern_count(entry.path, size) == left  # the killed scrub zeroed no more
    assert pool.take(key, os.path.join(guest_dir, "next"), domain_uuid="u2",
                     backend_id="pc.ram") is None
    assert [e.path for e in pool.scrub(read_host(), limits())] == [entry.path]
    assert pool.take(key, os.path.join(guest_dir, "next"), domain_uuid="u2",
                     backend_id="pc.ram") is not None
    assert pattern_count(os.path.join(guest_dir, "next"), size) == 0


def test_real_interrupted_zeroing_is_never_clean(shm_dir: str) -> None:
    """The real zeroing, killed with SIGKILL as soon as its state says it started: the file
    is dirty and never handed out.  The kill must land before the scrub's end (asserted: the
    file still holds data), or this run shows nothing."""
    pool_dir = os.path.join(shm_dir, "pool")
    size = 2048 * MIB
    pool, key, path = dirty_pool_file(pool_dir, size)
    proc = real_scrub(pool_dir)
    try:
        deadline = time.monotonic() + 120  # a hang guard
        while pool.entries()[0].recorded_state != "scrubbing":
            assert proc.poll() is None and time.monotonic() < deadline, pool.entries()
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fd = os.open(path, os.O_RDONLY)
    try:
        left = pattern_at(fd, size, MIB)
    finally:
        os.close(fd)
    assert left > 0, "the scrub had finished before the kill: the race never fired"
    (entry,) = pool.entries()
    assert entry.state == "dirty" and entry.recorded_state == "scrubbing"
    assert pool.take(key, os.path.join(shm_dir, "g"), domain_uuid="u",
                     backend_id="pc.ram") is None


def test_pool_limits(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    key = key_for(8 * MIB, 2048, (0,), "bind")
    pool = Pool(pool_dir, max_bytes=16 * MIB)
    pool.fill(key, 2, read_host(), limits())
    # The pool's state owns filled files: no record of "files this run made" stays behind.
    records = os.path.join(os.environ["KVMACCEL_RUN_DIR"], "files")
    assert not os.path.isdir(records) or os.listdir(records) == []
    with pytest.raises(PoolError, match="would pass its limit of 16M"):
        pool.fill(key, 1, read_host(), limits())
    assert len(pool.entries()) == 2
    guest = os.path.join(guest_dir, "fresh")
    fd = os.open(guest, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MIB)
    try:  # not refilled
        assert pool.adopt(fd, key, domain_uuid="u", backend_id="pc.ram", link_path=guest) is None
    finally:
        os.close(fd)
    per_node = Pool(pool_dir, max_node_bytes=16 * MIB)
    assert "per-node limit of 16M" in (per_node.room_for(key) or "")


def test_adopt_then_drain_returns_every_page(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    host = read_host()
    free_before = free_hugepages_2m()
    pool = Pool(pool_dir)
    key = key_for(16 * MIB, 2048)
    pool.fill(key, 2, host, limits())
    # A guest's freshly populated file joins the pool, in use by that guest.
    guest = os.path.join(guest_dir, "ram")
    fd = os.open(guest, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * MIB)
    adopted = pool.adopt(fd, key, domain_uuid="u", backend_id="pc.ram", link_path=guest)
    os.close(fd)
    assert adopted is not None and adopted.state == "in_use"
    assert pool.drain() == 32 * MIB  # never the file in use
    assert [e.state for e in pool.entries()] == ["in_use"]
    os.unlink(guest)
    pool.release_domain("u")
    assert pool.drain() == 16 * MIB
    assert pool.entries() == []
    assert free_hugepages_2m() == free_before


def test_the_detached_scrub_is_niced_and_so_is_its_autogroup(tmp_path: object) -> None:
    """spawn_scrub starts a new session, which is a new scheduler autogroup; only the
    group's nice counts between groups, so it must be 19 too, or the scrub competes with
    the guests as an equal."""
    from kvmaccel.host.process import AUTOGROUP
    from kvmaccel.pool.manage import spawn_scrub

    from .conftest import need

    need(os.path.exists(AUTOGROUP), "kernel.sched_autogroup_enabled (CONFIG_SCHED_AUTOGROUP)")
    pid = spawn_scrub([str(tmp_path)])
    try:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        with open(f"/proc/{pid}/autogroup") as f:
            assert f.read().rstrip().endswith(" nice 19")
        assert os.getsid(pid) == pid
    finally:
        os.waitpid(pid, 0)


# --- placement: checked before a bound file is handed over --------------------------------

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def test_a_bound_file_on_its_node_is_handed_over(huge_area: tuple[str, str]) -> None:
    pool_dir, guest_dir = huge_area
    pool = Pool(pool_dir)
    key = key_for(8 * MIB, 2048, (0,), "bind")
    pool.fill(key, 1, read_host(), limits())
    target = os.path.join(guest_dir, "kvmaccel-ram-node0")
    assert pool.take(key, target, domain_uuid="u", backend_id="ram-node0") is not None
    assert os.path.exists(target)


def test_a_bound_file_missing_pages_is_removed_not_handed_over(
        huge_area: tuple[str, str]) -> None:
    """A clean file that lost a page (here punched out by root; in life, anything that is
    not kvmaccel): mapping it to look would fill the hole with a page from anywhere, so it is
    refused before, and removed from the pool."""
    pool_dir, guest_dir = huge_area
    pool = Pool(pool_dir)
    key = key_for(8 * MIB, 2048, (0,), "bind")
    pool.fill(key, 1, read_host(), limits())
    (entry,) = pool.entries()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(entry.path, os.O_RDWR)
    try:
        assert libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              ctypes.c_long(2 * MIB), ctypes.c_long(2 * MIB)) == 0
    finally:
        os.close(fd)
    assert pool.entries()[0].state == "clean"
    target = os.path.join(guest_dir, "kvmaccel-ram-node0")
    assert pool.take(key, target, domain_uuid="u", backend_id="ram-node0") is None
    assert not os.path.exists(target) and pool.entries() == []


def test_verify_zero_checks_both_ends_of_a_large_page_without_copying_it_whole() -> None:
    from kvmaccel.pool.manage import VERIFY_WINDOW, verify_zero

    page = 4 * VERIFY_WINDOW  # as a 1G page is to its 2 MiB windows
    fd = os.memfd_create("kvtest-verify")
    try:
        os.ftruncate(fd, 2 * page)
        verify_zero(fd, 2 * page, page)
        for offset in (page - 1, page, 2 * page - 1):  # the end of a page, the start of one
            os.pwrite(fd, b"\1", offset)
            with pytest.raises(PoolError, match="is not zero after scrubbing"):
                verify_zero(fd, 2 * page, page)
            os.pwrite(fd, b"\0", offset)
    finally:
        os.close(fd)


def test_the_hooks_forked_scrub_is_detached_and_a_restart_lends_it_its_priority(
        huge_area: tuple[str, str]) -> None:
    """After a stop the hook forks the scrub (no new interpreter to wait for): its own session
    and autogroup, both at nice 19.  A start of the same guest right after lends it its own
    priority, every thread and the autogroup (``hurry_scrub_of``, which the warm prepare
    calls), instead of waiting for a nice-19 scrub."""
    from kvmaccel.plan.config import HookConfig
    from kvmaccel.serve import pool as hook_pool

    from .conftest import need
    from .test_hook_integration import cpu_hogs

    need(os.path.exists("/proc/self/autogroup"), "kernel.sched_autogroup_enabled")
    pool_dir, guest_dir = huge_area
    pool = Pool(pool_dir)
    key = key_for(256 * MIB, 2048)
    need(free_hugepages_2m() >= 128, "needs 128 free 2M huge pages")
    pool.fill(key, 1, read_host(), limits())
    target = os.path.join(guest_dir, "ram")
    assert pool.take(key, target, domain_uuid="u", backend_id="pc.ram") is not None
    os.unlink(target)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    with cpu_hogs():  # a busy host: the nice-19 scrub crawls, and is caught scrubbing
        pool.release_domain("u")
        pid = hook_pool.fork_scrub([pool_dir], HookConfig())
        try:
            deadline = time.monotonic() + 60
            while pool.entries()[0].state != "scrubbing":
                assert time.monotonic() < deadline, pool.entries()
                time.sleep(0.001)
            os.kill(pid, signal.SIGSTOP)
            assert os.getsid(pid) == pid and os.getpriority(os.PRIO_PROCESS, pid) == 19
            with open(f"/proc/{pid}/autogroup") as f:
                assert f.read().rstrip().endswith(" nice 19")
            assert not Pool(pool_dir).hurry_scrub_of("another-guest")
            assert os.getpriority(os.PRIO_PROCESS, pid) == 19
            assert Pool(pool_dir).hurry_scrub_of("u")
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert os.getpriority(os.PRIO_PROCESS, int(tid)) == mine
            with open(f"/proc/{pid}/autogroup") as f:
                assert f.read().rstrip().endswith(f" nice {mine}")
        finally:
            os.kill(pid, signal.SIGCONT)
            os.waitpid(pid, 0)
    assert [e.state for e in pool.entries()] == ["clean"]
