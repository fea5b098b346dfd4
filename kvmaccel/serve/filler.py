"""The filler's identity, how it is stopped, and the moment it stops for good.

The filler (:mod:`kvmaccel.serve.overlap`) populates a guest's fresh file beside QEMU's own
preallocation.  Its work is only worth anything until QEMU's preallocation of that file is
done; after that, every range it faults in is one the guest may have given back meanwhile:
QEMU punches a hole in fd-backed RAM (``fallocate(PUNCH_HOLE)``) when a balloon inflates,
when the guest reports free pages, and at postcopy migration's listen, where the destination
discards what it is about to receive.  A filler refilling such a range wastes the memory, and
under postcopy it breaks the guest: a page that is present gets no userfault, so the guest
reads the zeros the filler faulted in instead of its migrated memory.  So it stops for good,
twice over:

* *by itself*: it leaves alone, for good, every file it has once seen allocated whole (QEMU
  preallocates every page; the filler checks before each step, :mod:`.overlap`);
* *at* ``started begin`` (:func:`kvmaccel.libvirt.started.stop_at_started`): libvirt runs
  that hook after QEMU's start, when every backend is preallocated (QEMU preallocates while
  it creates the objects, before its monitor answers): after ``cont`` for a plain start, before the
  migration source sends anything for an incoming migration, after the whole saved state
  is loaded for a restore.  The hook kills the filler there (SIGKILL at once: a step in
  flight is the only thing SIGTERM would let it finish) and waits until it is gone, so no
  filler outlives the start.  Nothing starts a filler again: only ``start begin`` of a fresh
  start forks one, once per QEMU.

Every ``started begin`` costs a hook call, on every guest's start: the installed script
(:mod:`kvmaccel.setup.install`) starts Python for it only while a *filler record* exists, the file
``<filler dir>/<uuid>.json`` that ``start begin`` writes when it leaves a filler, and this
path imports no more than the warm path does (no logging, no engine).  The filler dir is the
one the installed script looks in and names in ``$KVMACCEL_FILLER_DIR`` (``fillers/`` in the
run dir the script was installed with, ``/run/kvmaccel`` by default), so that a config whose
``run_dir`` changed since ``kvmaccel hook install`` still finds it; without the variable (the
hook run by hand), ``fillers/`` in the run dir (:attr:`kvmaccel.paths.Places.filler_dir`).
``stopped``/``release`` stop a filler that still runs too (:func:`stop_filler`, SIGTERM first
there) and remove the record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from .. import paths
from ..errors import UsageError
from ..host import proc
from ..safefs import write_json_atomic
from .state import VERSION, FillerRef

STOP_WAIT_S = 5.0
"""How long :func:`stop_filler` waits after each signal."""


def record_path(key: str) -> str:
    """``<filler dir>/<key>.json``: this guest's start left a filler."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a filler record")
    return os.path.join(paths.places().filler_dir, f"{key}.json")


def write_record(key: str, filler: FillerRef) -> None:
    """The filler record: its content is the filler (:class:`FillerRef`, versioned); what the
    installed script checks is only that it exists."""
    write_json_atomic(record_path(key), {"v": VERSION, **filler.to_json()})


def forget_record(key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(key))


def stop_filler(filler: FillerRef | None, at_once: bool = False) -> str:
    """Stop ``filler`` if it still runs, and wait until it is gone (it maps the guest's
    files: a scrub must not start before).  SIGTERM first (the filler logs why it stopped),
    then SIGKILL; ``at_once``: SIGKILL only.

    Returns ``"not running"``, ``"stopped"``, or ``"stuck"`` (still there after
    :data:`STOP_WAIT_S` s of SIGKILL: its files are released when it exits)."""
    if filler is None:
        return "not running"
    pid, ticks = filler
    if not proc.running(pid, ticks):
        return "not running"
    for sig in (signal.SIGKILL,) if at_once else (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child when the same process stops it
            if not proc.running(pid, ticks):  # reaped, or a zombie: its mappings are gone
                return "stopped"
            time.sleep(0.005)
    return "stuck"
