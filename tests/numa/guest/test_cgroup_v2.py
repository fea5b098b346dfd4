"""On a real cgroup2 hierarchy with the cpu controller: helper counts follow ``cpu.max``, and
``kvmaccel.engine.cgroup.enter`` makes kvmaccel's own cgroup with ``cpu.idle``.

The host that runs the test suite has cgroup v1 only; the guest (4 CPUs, Linux 6.1) has the
cgroup2 hierarchy virtme-ng's init mounts on /sys/fs/cgroup, or, without one, a cgroup2 this
module mounts itself.  Every cgroup here is the test's own (``kvtest-*`` under the root), and
is removed again, with every process moved back where it was.

Populating 128 MiB of tmpfs over nodes 0 and 1 in 8 MiB chunks, at most 2 helpers per node,
starts 3 helpers (the host-wide 80% of 4 CPUs) beside the caller, 4 threads, when no quota
applies; a quota of N CPUs leaves N threads, the caller included.  Every quota below gives a
count other than 4, so the tests fail when kvmaccel ignores the quota.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.host.facts import read_host, read_mounts
from kvmaccel.plan.limits import Limits

from ...conftest import need, private_mount
from .conftest import MIB, record

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LIMITS = Limits(max_helpers_per_node=2, min_chunk_bytes=8 * MIB, idle_cpus_only=False)
SIZE = 128 * MIB
THREADS_WITHOUT_QUOTA = 4
PERIOD = 100000


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup2 path of a process, from its ``0::`` line of /proc/PID/cgroup."""
    for line in read(f"/proc/{pid}/cgroup").splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no cgroup2 line in /proc/{pid}/cgroup")


@pytest.fixture(scope="module")
def v2root() -> Iterator[str]:
    """The root of a cgroup2 hierarchy with the cpu controller available."""
    cpu_v1 = [m.path for m in read_mounts()
              if m.fs_type == "cgroup" and "cpu" in m.options.split(",")]
    need(not cpu_v1, f"the cpu controller is bound to cgroup v1 at {cpu_v1}")
    mounted = [m.path for m in read_mounts() if m.fs_type == "cgroup2"]
    with contextlib.ExitStack() as stack:
        root = mounted[0] if mounted else stack.enter_context(
            private_mount("cgroup2", "rw", prefix="numa-cgroup2-"))
        controllers = read(os.path.join(root, "cgroup.controllers")).split()
        need("cpu" in controllers, f"no cpu controller in {root} ({controllers})")
        yield root


def remove(directory: str) -> None:
    """rmdir a cgroup once its last process is gone (a reaped process leaves it shortly)."""
    for _ in range(100):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    os.rmdir(directory)


@contextlib.contextmanager
def cgroups(root: str, chain: list[tuple[str, str]]) -> Iterator[str]:
    """Make each ``(path, cpu.max)`` of ``chain``, parents first, with the cpu controller
    enabled above each; yield the last one's directory; remove them all afterwards."""
    made: list[str] = []
    try:
        for name, cpu_max in chain:
            directory = os.path.join(root, name)
            write(os.path.join(os.path.dirname(directory), "cgroup.subtree_control"), "+cpu")
            os.mkdir(directory)
            made.append(directory)
            write(os.path.join(directory, "cpu.max"), cpu_max)
        yield made[-1]
    finally:
        for directory in reversed(made):
            remove(directory)


@contextlib.contextmanager
def moved_into(root: str, directory: str) -> Iterator[None]:
    """Run this (test) process in ``directory`` for a block, then move it back."""
    home = os.path.join(root, own_cgroup().lstrip("/"))
    write(os.path.join(directory, "cgroup.procs"), str(os.getpid()))
    try:
        yield
    finally:
        write(os.path.join(home, "cgroup.procs"), str(os.getpid()))


def populate_threads(directory: str, name: str) -> tuple[int, dict[int | None, int]]:
    """Populate a fresh tmpfs file the way ``kvmaccel populate`` does; threads and helpers."""
    path = os.path.join(directory, name)
    try:
        _, result = populate_backings([BackingSpec(path, SIZE, nodes=(0, 1))], read_host(),
                                      LIMITS)
    finally:
        os.unlink(path)
    assert sum(result.helpers_per_node.values()) == result.threads - 1
    return result.threads, dict(result.helpers_per_node)


def test_enter_makes_an_idle_cgroup_and_moves_the_process(v2root: str) -> None:
    """``enter("kvtest-enter/kvmaccel")`` in a child process: both levels made under the v2
    root, the cpu controller enabled down to the leaf, ``cpu.idle`` = 1 there, and the child
    in it per /proc/self/cgroup.  The test process itself stays where it is."""
    name = "kvtest-enter/kvmaccel"
    directory = os.path.join(v2root, name)
    script = ("import json, sys\n"
              "from kvmaccel.engine.cgroup import enter\n"
              "d = enter(sys.argv[1])\n"
              "print(json.dumps({'dir': d, 'cgroup': open('/proc/self/cgroup').read()}))\n")
    before = own_cgroup()
    try:
        out = subprocess.run([sys.executable, "-c", script, name], cwd=CHECKOUT, check=True,
                             capture_output=True, text=True, timeout=120)
        got = json.loads(out.stdout)
        assert got["dir"] == directory, out.stderr
        assert f"0::/{name}" in got["cgroup"].splitlines(), got["cgroup"]
        assert "cpu" in read(os.path.join(v2root, "kvtest-enter",
                                          "cgroup.subtree_control")).split()
        assert read(os.path.join(directory, "cpu.idle")) == "1"  # Linux 5.15+: 6.1 has it
        assert own_cgroup() == before
    finally:
        remove(directory)
        remove(os.path.dirname(directory))


@pytest.mark.parametrize(("chain", "threads", "source"), [
    ([("kvtest-q", f"{PERIOD} {PERIOD}")], 1, "kvtest-q"),
    ([("kvtest-q", f"{2 * PERIOD} {PERIOD}")], 2, "kvtest-q"),
    ([("kvtest-q", f"{3 * PERIOD} {PERIOD}")], 3, "kvtest-q"),
    ([("kvtest-q", f"{PERIOD * 5 // 2} {PERIOD}")], 2, "kvtest-q"),  # 2.5: whole CPUs count
    # the tightest along the path, wherever it is set
    ([("kvtest-p", f"{PERIOD} {PERIOD}"), ("kvtest-p/c", f"{3 * PERIOD} {PERIOD}")], 1,
     "kvtest-p"),
    ([("kvtest-p", f"{3 * PERIOD} {PERIOD}"), ("kvtest-p/c", f"{2 * PERIOD} {PERIOD}")], 2,
     "kvtest-p/c"),
    ([("kvtest-p", f"{2 * PERIOD} {PERIOD}"), ("kvtest-p/c", f"max {PERIOD}")], 2,
     "kvtest-p"),
], ids=["1cpu", "2cpu", "3cpu", "2.5cpu", "parent-tighter", "child-tighter", "parent-only"])
def test_helper_counts_follow_cpu_max(
        chain: list[tuple[str, str]], threads: int, source: str, v2root: str,
        mounts: dict[str, str], request: pytest.FixtureRequest) -> None:
    """A populate run in this process, first where it runs, then moved into the cgroup at
    the end of ``chain``: the quota the host facts report is the tightest ``cpu.max`` along
    the path, and the run starts as many threads as that quota has whole CPUs."""
    free_threads, free_helpers = populate_threads(mounts["tmpfs"], "cgroup-free")
    assert read_host().cpu_quota is None
    with cgroups(v2root, chain) as leaf:
        with moved_into(v2root, leaf):
            assert own_cgroup() == "/" + chain[-1][0]
            quota = read_host().cpu_quota
            got_threads, got_helpers = populate_threads(mounts["tmpfs"], "cgroup-quota")
        assert own_cgroup() != "/" + chain[-1][0]
    record(request, "threads", {"without_quota": free_threads, "with_quota": got_threads,
                                "helpers": {str(k): v for k, v in got_helpers.items()},
                                "helpers_without_quota": {str(k): v for k, v in
                                                          free_helpers.items()}})
    assert free_threads == THREADS_WITHOUT_QUOTA, free_helpers
    assert quota is not None, f"no quota seen in {chain}"
    assert quota.source == os.path.join(v2root, source, "cpu.max")
    assert got_threads == threads != free_threads, got_helpers


def test_the_cli_follows_cpu_max(v2root: str, mounts: dict[str, str],
                                 request: pytest.FixtureRequest) -> None:
    """``kvmaccel populate --json`` started inside a 1-CPU cgroup runs alone (1 thread), and
    names the quota among its reasons."""
    path = os.path.join(mounts["tmpfs"], "cgroup-cli")
    with cgroups(v2root, [("kvtest-cli", f"{PERIOD} {PERIOD}")]) as leaf:
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', leaf,
                sys.executable, "-m", "kvmaccel", "populate", path, "--size", "128M",
                "--nodes", "0,1", "--max-helpers-per-node", "2", "--min-chunk", "8M",
                "--ignore-load", "--json"]
        try:
            out = subprocess.run(argv, cwd=CHECKOUT, check=True, capture_output=True,
                                 text=True, timeout=120)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    result = json.loads(out.stdout)
    record(request, "cli", {"threads": result["threads"], "reasons": result["reasons"]})
    assert result["threads"] == 1, result
    assert any(os.path.join(leaf, "cpu.max") in r for r in result["reasons"]), result
