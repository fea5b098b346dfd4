"""``kvmaccel bench-run``: time to a running QEMU, QEMU's own prealloc against ``kvmaccel run``.

Each configuration starts the same guest (``-machine pc`` with KVM, else TCG; no disk, no
display; its RAM one ``memory-backend-file`` on a hugetlbfs directory, shared, as libvirt writes
it for hugepages) with ``-daemonize``, and is timed from spawning until the parent returns:
QEMU's daemonize pipe closes only when initialization (and any preallocation) is done.  Then the
guest is killed and its pages return to the pool.

* ``qemu``: QEMU preallocates itself, ``prealloc=on,prealloc-threads=T``;
* ``kvmaccel``: ``kvmaccel run --threads T -- <the same command>``: T populating threads (the
  caller and T-1 helpers; QEMU's T threads likewise include every thread that populates; the
  helpers at ``--nice`` 0 by default, as QEMU's threads, since niced helpers are only started
  on idle CPUs and a shared test machine rarely has one),
  then QEMU execs with ``prealloc=off`` on an inherited unlinked file.  kvmaccel's own start-up
  (the Python interpreter) is inside the time;
* ``none``: QEMU with ``prealloc=off``, nothing populated: the floor, start-up alone.

One untimed warm-up round, then the configurations alternate within each round (their order
rotates), and medians are quoted (see FACTS.md on noisy VMs).
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import paths
from ..errors import HostError
from ..host import proc as host_proc
from ..host.capacity import CapacityCheck, check
from ..host.facts import read_host
from ..model.units import format_size

log = logging.getLogger(__name__)

CONFIGS = ("qemu", "kvmaccel", "none")


@dataclass(frozen=True)
class BenchRunResult:
    """Seconds per configuration (one list entry per timed round) and the medians."""

    size_bytes: int
    threads: int
    seconds: dict[str, list[float]]

    def median(self, config: str) -> float:
        return statistics.median(self.seconds[config])

    @property
    def ratio(self) -> float:
        """QEMU's time over kvmaccel's: above 1, kvmaccel gets to a running QEMU sooner."""
        return self.median("qemu") / self.median("kvmaccel")


def guest_argv(qemu: str, directory: str, size_bytes: int, threads: int, prealloc: bool,
               pidfile: str) -> list[str]:
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    return [qemu, "-machine", f"pc,accel={accel},memory-backend=mem0", "-m",
            f"{size_bytes >> 20}M", "-display", "none", "-nodefaults", "-daemonize", "-pidfile",
            pidfile, "-object",
            f"memory-backend-file,id=mem0,size={size_bytes},mem-path={directory},share=on,"
            f"prealloc={'on' if prealloc else 'off'},prealloc-threads={threads}"]


def _kill(pidfile: str) -> None:
    with open(pidfile, encoding="ascii") as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while host_proc.exists(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _room(page_kib: int, size_bytes: int) -> CapacityCheck:
    """One guest's ``size_bytes`` of ``page_kib`` pages against what is free host-wide now."""
    return check(read_host(), None, page_kib, size_bytes)


def start_once(config: str, qemu: str, directory: str, size_bytes: int, threads: int,
               nice: int = 0) -> float:
    """Seconds from spawn to a running (daemonized) QEMU for ``config``.  Raises HostError."""
    with tempfile.TemporaryDirectory(prefix="kvmaccel-bench-run-") as tmp:
        pidfile = os.path.join(tmp, "qemu.pid")
        argv = guest_argv(qemu, directory, size_bytes, threads, config == "qemu", pidfile)
        if config == "kvmaccel":
            argv = [sys.executable, "-m", "kvmaccel", "run", "--threads", str(threads),
                    "--nice", str(nice), "--",
                    *argv]
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env={**os.environ, **paths.places().environment()})
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise HostError(f"{config}: start failed ({proc.returncode}): "
                            f"{lines[-1] if lines else 'no message'}")
        _kill(pidfile)
    return seconds


def bench_run(qemu: str, directory: str, size_bytes: int, threads: int, runs: int,
              emit: Callable[[str], None], nice: int = 0, wait_s: float = 0.0) -> BenchRunResult:
    """Time every configuration ``runs`` times (after one warm-up round).

    Raises :class:`CapacityError` when the hugetlbfs pool lacks the pages for one guest for
    ``wait_s`` seconds (checked before every start: the pool is shared), HostError when QEMU
    fails.
    """
    mount = read_host().mount_of(directory)
    if mount is None or mount.fs_type != "hugetlbfs" or not mount.page_size_kib:
        raise HostError(f"{directory} is not on a hugetlbfs mount; give --dir of one")
    page_kib = mount.page_size_kib
    pages = size_bytes // (page_kib * 1024)
    seconds: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for round_no in range(runs + 1):
        order = CONFIGS[round_no % 3:] + CONFIGS[:round_no % 3]
        for config in order:
            deadline = time.monotonic() + wait_s
            while not (room := _room(page_kib, pages * page_kib * 1024)).ok and (
                    time.monotonic() < deadline):
                time.sleep(0.5)  # the pool is shared: wait for other users to give pages back
            if not room.ok:
                raise room.error("one guest", hint="or wait for other users")
            t = start_once(config, qemu, directory, size_bytes, threads, nice)
            if round_no:
                seconds[config].append(t)
            emit(f"{'warm-up' if not round_no else f'round {round_no}'}: {config:8} {t:.3f} s")
    result = BenchRunResult(size_bytes, threads, seconds)
    emit(f"{format_size(size_bytes)} on {directory} ({page_kib} KiB pages), {threads} "
         f"populating thread(s), medians of {runs}:")
    for config in CONFIGS:
        emit(f"  {config:8} {result.median(config):.3f} s  "
             f"({', '.join(f'{s:.3f}' for s in seconds[config])})")
    emit(f"  ratio qemu/kvmaccel: {result.ratio:.2f}x")
    return result
