"""A fresh start overlapped with QEMU's preallocation, on the real libvirtd and QEMU.

The filler (``kvmaccel.hook.overlap``) populates a guest's file while QEMU starts and
preallocates the same file.  These tests slow the filler down to a crawl in a cpu cgroup
with a tiny quota (the config's ``cgroup``, made beforehand by the test with
``cpu.cfs_quota_us``) and stop it (SIGSTOP) from a test-only hook that runs after kvmaccel's
and before QEMU, so that QEMU's preallocation does nearly all of the work and the filler is
still there while the guest runs; then they check what the issue asks us to prove:

* the guest runs on memory that is fully there although the filler did almost nothing
  (QEMU's own preallocation made it ready, before the guest ran);
* data the guest wrote (written here through the file, every page, with the guest paused so
  that its firmware writes nothing meanwhile) is unchanged after the filler resumes at full
  speed and walks every page;
* a guest destroyed while its filler still runs: the filler is stopped, the pages go back.

The env fixture (private hugetlbfs mounts, the front, kvmaccel's hook, libvirtd) is the
front's integration tests'.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from kvmaccel.bench import virsh
from kvmaccel.engine.backing import Backing, BackingSpec
from kvmaccel.hook import overlap
from kvmaccel.plan.config import HookConfig
from tests.conftest import need
from tests.test_hook_front_integration import (  # noqa: F401 - env is a fixture
    GUESTS,
    Env,
    defined,
    domain_dir,
    env,
    free_pages,
    state_of,
)

ON_LIBVIRT = [pytest.mark.libvirt, pytest.mark.root]

CPU_V1 = "/sys/fs/cgroup/cpu"
CGROUP = "kvmaccel-test-overlap"
PATTERN = b"guest-wrote-this"
GUEST = GUESTS[0]  # 1 GiB of 2M pages, one cell


FREEZER = "zz-kvmaccel-test-freeze-filler"
FREEZER_SCRIPT = '''#!{python}
# Test-only libvirt hook: at start begin, after kvmaccel's hook and before QEMU, stop (SIGSTOP)
# the filler kvmaccel's hook left for this guest.
import json, os, signal, sys
if sys.argv[2:4] != ["start", "begin"]:
    sys.exit(0)
sys.stdin.read()
top = {domains!r}
for n in os.listdir(top):
    try:
        with open(os.path.join(top, n)) as f:
            state = json.load(f)
        if state.get("name") == sys.argv[1]:
            os.kill(state["filler"]["pid"], signal.SIGSTOP)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
'''


@contextlib.contextmanager
def frozen_filler(e: Env) -> Iterator[None]:
    """A hook after kvmaccel's that stops the filler before QEMU starts, so that QEMU's own
    preallocation does all of the work (once QEMU has, the filler would otherwise walk the
    pages that are there in no time, and be gone before the test could look at it)."""
    path = os.path.join(virsh.LIBVIRT_DIR, "hooks", "qemu.d", FREEZER)
    with open(path, "w") as f:
        f.write(FREEZER_SCRIPT.format(python=sys.executable,
                                      domains=os.path.join(e.run_dir, "domains")))
    os.chmod(path, 0o755)
    try:
        yield
    finally:
        os.unlink(path)


@contextlib.contextmanager
def crawling_cgroup() -> Iterator[str]:
    """kvmaccel's cgroup, made here first with 1 ms of CPU per 100 ms."""
    need(os.path.isdir(CPU_V1), "needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    directory = os.path.join(CPU_V1, CGROUP)
    os.makedirs(directory, exist_ok=True)
    quota(directory, 1000)
    try:
        yield directory
    finally:
        quota(directory, -1)
        for _ in range(100):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
                break
            time.sleep(0.1)


def quota(directory: str, us: int) -> None:
    with open(os.path.join(directory, "cpu.cfs_quota_us"), "w") as f:
        f.write(str(us))


def run_state(pid: int) -> str:
    """R, S, T (stopped), Z...; "" when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0]
    except OSError:
        return ""


def alive(pid: int) -> bool:
    return run_state(pid) not in ("", "Z")


def filler_pid(e: Env) -> int:
    """The guest's filler, stopped by the freezer hook before QEMU started."""
    filler = state_of(e, GUEST)["filler"]
    assert isinstance(filler, dict)
    pid = filler["pid"]
    assert isinstance(pid, int)
    # A SIGSTOP takes effect when the process next runs; in its cgroup that can be one
    # quota period (100 ms) later, and it shows as R (throttled) until then.
    deadline = time.monotonic() + 10
    while run_state(pid) == "R" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run_state(pid) == "T", (run_state(pid), e.log()[-3000:])
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "kvmaccel-fill"
    return pid


def pages(path: str, page: int) -> Iterator[tuple[mmap.mmap, int]]:
    size = os.stat(path).st_size
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        for offset in range(0, size, page):
            yield m, offset


@ON_LIBVIRT[0]
@ON_LIBVIRT[1]
def test_a_crawling_filler_never_changes_what_the_guest_wrote(env: Env) -> None:  # noqa: F811
    with crawling_cgroup() as cgroup, frozen_filler(env):
        env.write_config(extra=f'cgroup = "{CGROUP}"\n')
        with defined(env, GUEST):
            virsh.virsh("start", GUEST.name)
            pid = filler_pid(env)
            try:
                path = f"{domain_dir(env, GUEST)}/.kvmaccel/kvmaccel-ram-node0"
                [at_start] = env.observed(GUEST.name)
                _, allocated_at_start, _ = at_start["files"][path]  # type: ignore[index]
                # The filler had barely begun when QEMU started; the guest runs on a file
                # that is complete all the same: QEMU's own preallocation did the rest.
                assert allocated_at_start < GUEST.size_bytes // 2
                assert os.stat(path).st_blocks * 512 == GUEST.size_bytes
                assert virsh.virsh("domstate", GUEST.name).stdout.strip() == "running"
                with open(f"{cgroup}/tasks") as f:
                    assert str(pid) in f.read().split()  # the filler ran in the config's cgroup
                # What a guest does: write everywhere, at both ends of every page.  The guest
                # is paused meanwhile: its firmware writes pages of its own.
                virsh.virsh("suspend", GUEST.name)
                page = GUEST.page_kib * 1024
                for m, offset in pages(path, page):
                    m[offset:offset + len(PATTERN)] = PATTERN
                    m[offset + page - len(PATTERN):offset + page] = PATTERN
            finally:
                quota(cgroup, -1)
                os.kill(pid, signal.SIGCONT)
            for _ in range(300):  # the filler now walks every page at full speed
                if not alive(pid):
                    break
                time.sleep(0.1)
            assert not alive(pid)
            assert "filler populated 1G alongside QEMU" in env.log(), env.log()[-3000:]
            changed = [offset for m, offset in pages(path, page)
                       if m[offset:offset + len(PATTERN)] != PATTERN
                       or m[offset + page - len(PATTERN):offset + page] != PATTERN]
            assert changed == [], f"{len(changed)} pages changed, the first at {changed[0]}"
            virsh.virsh("resume", GUEST.name)


@ON_LIBVIRT[0]
@ON_LIBVIRT[1]
def test_destroy_stops_a_filler_that_still_runs(env: Env) -> None:  # noqa: F811
    free_before = free_pages(GUEST.page_kib)
    with crawling_cgroup(), frozen_filler(env):
        env.write_config(extra=f'cgroup = "{CGROUP}"\n')
        with defined(env, GUEST):
            virsh.virsh("start", GUEST.name)
            pid = filler_pid(env)  # stopped: SIGTERM waits, SIGKILL does not
            virsh.virsh("destroy", GUEST.name)
            assert not alive(pid)
            assert f"stopped the filler (pid {pid})" in env.log()
            for _ in range(50):
                if free_pages(GUEST.page_kib) == free_before:
                    break
                time.sleep(0.1)
            assert free_pages(GUEST.page_kib) == free_before


# --- the filler's order and when it runs: no libvirt needed ---------------------------------

MIB = 1 << 20


def test_qemu_threads_as_qemu_counts_them() -> None:
    assert overlap.qemu_threads(8 << 30, None, 2) == 1  # prealloc-threads unset: one
    assert overlap.qemu_threads(8 << 30, 4, 2) == 2  # at most the online CPUs
    assert overlap.qemu_threads(8 << 30, 32, 64) == 16  # at most 16
    assert overlap.qemu_threads(100 * MIB, 4, 8) == 1  # at most one per 64 MiB


def test_the_filler_meets_every_qemu_thread_halfway_and_covers_each_page_once() -> None:
    spec = BackingSpec(path=None, size_bytes=1024 * MIB, nodes=(0, 1))
    backing = Backing(spec, 99, "hugetlbfs", 2 * MIB, created=False)
    items = overlap.against_qemu(backing, 2)
    # First the top piece of each QEMU thread's half, then down from there, in turn.
    assert [(i.offset_bytes >> 20, i.length_bytes >> 20, i.node_id) for i in items[:4]] == [
        (448, 64, 0), (960, 64, 1), (384, 64, 0), (896, 64, 1)]
    covered = sorted((i.offset_bytes, i.offset_bytes + i.length_bytes) for i in items)
    assert covered[0][0] == 0 and covered[-1][1] == 1024 * MIB
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # no gaps
    assert all(i.fd == 99 and i.page_size_bytes == 2 * MIB for i in items)


def test_pieces_never_cross_a_node_boundary() -> None:
    spec = BackingSpec(path=None, size_bytes=300 * MIB, nodes=(0, 1, 2))
    backing = Backing(spec, 7, "hugetlbfs", 2 * MIB, created=False)
    for item in overlap.against_qemu(backing, 1):
        node_of = {0: (0, 100), 1: (100, 200), 2: (200, 300)}[item.node_id]  # type: ignore
        assert node_of[0] * MIB <= item.offset_bytes
        assert item.offset_bytes + item.length_bytes <= node_of[1] * MIB


def test_overlap_only_where_qemu_preallocates() -> None:
    assert overlap.why_not([True, True], HookConfig()) is None  # Linux 6.x here
    assert "QEMU does not preallocate" in (overlap.why_not([True, False], HookConfig()) or "")
    assert "overlap = false" in (overlap.why_not([True], HookConfig(overlap=False)) or "")
