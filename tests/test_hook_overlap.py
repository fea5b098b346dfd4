"""A fresh start overlapped with QEMU's preallocation, on the real libvirtd and QEMU.

The filler (``kvmaccel.serve.overlap``) populates a guest's file while QEMU starts and
preallocates the same file.  These tests slow the filler down to a crawl in a cpu cgroup
with a tiny quota (the config's ``cgroup``, made beforehand by the test with
``cpu.cfs_quota_us``) and stop it (SIGSTOP) from a test-only hook that runs after kvmaccel's
and before QEMU, noting where the filler runs; so QEMU's preallocation does nearly all of the
work, and the filler would still be there when the guest runs.  Then they check:

* the filler was in the config's cgroup before QEMU started (before ``start begin`` returned:
  it never works outside it), and the guest runs on memory that is fully there although the
  filler did almost nothing (QEMU's own preallocation made it ready, before the guest ran);
* once the guest has started, the filler is gone for good: a range QEMU discards then (as a
  balloon, free page reporting or postcopy's discard at listen make it do: a hole punched in
  the file) stays a hole, however long the filler would have run;
* a start refused after ``start begin``: the stop hooks stop the filler, the pages go back.

``tests/test_hook_filler.py`` checks the filler's own stop (a file once whole is left alone)
and that it never changes a page that was written.  The env fixture (private hugetlbfs
mounts, the front, kvmaccel's hook, libvirtd) is the front's integration tests'.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from kvmaccel.bench import virsh
from kvmaccel.engine.backing import Backing, BackingSpec
from kvmaccel.plan.config import HookConfig
from kvmaccel.serve import overlap
from tests.test_hook_filler import cpu_cgroup_of, crawling_cgroup, qemu_discards, quota
from tests.test_hook_front_integration import (  # noqa: F401 - env is a fixture
    GUESTS,
    Env,
    defined,
    domain_dir,
    env,
    free_pages,
)

ON_LIBVIRT = [pytest.mark.libvirt, pytest.mark.root]

CPU_V1 = "/sys/fs/cgroup/cpu"
CGROUP = "kvmaccel-test-overlap"
GUEST = GUESTS[0]  # 1 GiB of 2M pages, one cell
MIB = 1 << 20


FREEZER = "zz-kvmaccel-test-freeze-filler"
FREEZER_SCRIPT = '''#!{python}
# Test-only libvirt hook: at start begin, after kvmaccel's hook and before QEMU, note where the
# filler kvmaccel's hook left for this guest runs and stop it (SIGSTOP); refuse the start (exit
# 1) while {refuse!r} exists.
import json, os, signal, sys
if sys.argv[2:4] != ["start", "begin"]:
    sys.exit(0)
sys.stdin.read()
top = {domains!r}
for n in os.listdir(top):
    try:
        with open(os.path.join(top, n)) as f:
            state = json.load(f)
        if state.get("name") != sys.argv[1]:
            continue
        pid = state["filler"]["pid"]
        with open(f"/proc/{{pid}}/cgroup") as f:
            cgroups = f.read()
        with open(f"/proc/{{pid}}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        os.kill(pid, signal.SIGSTOP)
        with open({out!r}, "a") as f:
            f.write(json.dumps({{"pid": pid, "start_ticks": ticks, "cgroups": cgroups}}) + "\\n")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
sys.exit(1 if os.path.exists({refuse!r}) else 0)
'''


class Frozen:
    """The freezer hook's notes, and its switch to refuse starts."""

    def __init__(self, out: str, refuse: str) -> None:
        self.out, self.refuse = out, refuse

    def fillers(self) -> list[dict[str, object]]:
        """One note per start: the filler's pid, start time and /proc/<pid>/cgroup then."""
        return [json.loads(line) for line in virsh.read_text(self.out).splitlines()]


@contextlib.contextmanager
def frozen_filler(e: Env) -> Iterator[Frozen]:
    """A hook after kvmaccel's that stops the filler before QEMU starts, so that QEMU's own
    preallocation does all of the work (once QEMU has, the filler would otherwise walk the
    pages that are there in no time, and be gone before the test could look at it)."""
    path = os.path.join(virsh.LIBVIRT_DIR, "hooks", "qemu.d", FREEZER)
    frozen = Frozen(os.path.join(e.workdir, "frozen.jsonl"), os.path.join(e.workdir, "refuse"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(frozen.out)
    with open(path, "w") as f:
        f.write(FREEZER_SCRIPT.format(python=sys.executable, out=frozen.out,
                                      refuse=frozen.refuse,
                                      domains=os.path.join(e.run_dir, "domains")))
    os.chmod(path, 0o755)
    try:
        yield frozen
    finally:
        os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(frozen.refuse)


def same_process(pid: int, ticks: object) -> bool:
    """``pid`` is still the process that started at ``ticks`` and has not exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == str(ticks) and fields[0] not in ("Z", "X")


def wait_until_gone(pid: int, ticks: object, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while same_process(pid, ticks):
        assert time.monotonic() < deadline, f"the filler (pid {pid}) still runs"
        time.sleep(0.05)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@ON_LIBVIRT[0]
@ON_LIBVIRT[1]
def test_the_filler_is_in_its_cgroup_before_qemu_starts(env: Env) -> None:  # noqa: F811
    with crawling_cgroup(CGROUP), frozen_filler(env) as frozen:
        env.write_config(extra=f'cgroup = "{CGROUP}"\n')
        with defined(env, GUEST):
            virsh.virsh("start", GUEST.name)
            [seen] = frozen.fillers()
            # Noted after kvmaccel's hook returned, before QEMU: the filler ran nowhere else.
            assert cpu_cgroup_of(str(seen["cgroups"])) == f"/{CGROUP}", seen
            path = f"{domain_dir(env, GUEST)}/.kvmaccel/kvmaccel-ram-node0"
            [at_start] = env.observed(GUEST.name)
            _, allocated_at_start, _ = at_start["files"][path]  # type: ignore[index]
            # The filler had barely begun when QEMU started; the guest runs on a file that
            # is complete all the same: QEMU's own preallocation did the rest.
            assert allocated_at_start < GUEST.size_bytes // 2
            assert allocated(path) == GUEST.size_bytes
            assert virsh.virsh("domstate", GUEST.name).stdout.strip() == "running"


@ON_LIBVIRT[0]
@ON_LIBVIRT[1]
def test_a_range_discarded_after_the_start_stays_a_hole(env: Env) -> None:  # noqa: F811
    with crawling_cgroup(CGROUP) as cgroup, frozen_filler(env) as frozen:
        env.write_config(extra=f'cgroup = "{CGROUP}"\n')
        with defined(env, GUEST):
            virsh.virsh("start", GUEST.name)  # returns after `started begin`
            [seen] = frozen.fillers()
            pid, ticks = int(seen["pid"]), seen["start_ticks"]  # type: ignore[call-overload]
            path = f"{domain_dir(env, GUEST)}/.kvmaccel/kvmaccel-ram-node0"
            assert allocated(path) == GUEST.size_bytes  # QEMU has preallocated it
            # The guest gives 64 MiB back (paused meanwhile: it touches nothing).
            virsh.virsh("suspend", GUEST.name)
            qemu_discards(path, 512 * MIB, 64 * MIB)
            assert allocated(path) == GUEST.size_bytes - 64 * MIB
            # Whatever was left of the filler: full speed now, until it is certainly gone.
            quota(cgroup, -1)
            if same_process(pid, ticks):
                os.kill(pid, signal.SIGCONT)
            wait_until_gone(pid, ticks)
            assert allocated(path) == GUEST.size_bytes - 64 * MIB, (
                "the filler faulted the discarded range in again")
            assert f"stopped the filler (pid {pid}) for good" in env.log(), env.log()[-3000:]
            virsh.virsh("resume", GUEST.name)


@ON_LIBVIRT[0]
@ON_LIBVIRT[1]
def test_a_start_refused_after_start_begin_stops_the_filler(env: Env) -> None:  # noqa: F811
    free_before = free_pages(GUEST.page_kib)
    with crawling_cgroup(CGROUP), frozen_filler(env) as frozen:
        env.write_config(extra=f'cgroup = "{CGROUP}"\n')
        with open(frozen.refuse, "w"):
            pass
        with defined(env, GUEST):
            assert virsh.virsh("start", GUEST.name, check=False).returncode != 0
            [seen] = frozen.fillers()
            pid, ticks = int(seen["pid"]), seen["start_ticks"]  # type: ignore[call-overload]
            # libvirt ran `stopped` and `release`: the filler (stopped: SIGTERM waits,
            # SIGKILL does not) is gone, and its pages went back with the file.
            assert not same_process(pid, ticks)
            assert f"stopped the filler (pid {pid})" in env.log(), env.log()[-3000:]
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
