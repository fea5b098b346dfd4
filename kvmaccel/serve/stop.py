"""A guest's stop: its filler stopped, the files its start made removed, its pool files
given back to be scrubbed, its directories removed, its state forgotten.

:func:`stop` acts on the guest's state as the start left it (:mod:`.state`), whatever front
started it; it is run as root, so nothing is removed that is not what kvmaccel made.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..engine import records
from ..errors import BackingError, KvmaccelError
from ..model.units import format_size
from . import memdir
from . import pool as serve_pool
from .filler import STOP_WAIT_S, forget_record
from .filler import stop_filler as stop_the_filler
from .state import FillerRef, ProofRef, read_state, state_path

if TYPE_CHECKING:
    from ..plan.config import HookConfig

log = logging.getLogger(__name__)


def remove_made_dirs(proofs: Sequence[ProofRef], made: Sequence[str]) -> None:
    """The proof directories and the memfd guests' directories a start recorded, each
    removed whole (libvirt has usually removed the guest's directories already)."""
    for proof in proofs:
        if memdir.remove_proof_dir(proof.path, proof.dev, proof.ino):
            log.info("removed %s", proof.path)
    for directory in made:
        if memdir.remove_guest_dir(directory):
            log.info("removed %s", directory)


def _stop_filler(filler: FillerRef | None) -> None:
    """Stop the guest's filler if it still runs (SIGTERM, then SIGKILL) and say so."""
    outcome = stop_the_filler(filler)
    pid = filler.pid if filler is not None else None
    if outcome == "stopped":
        log.info("stopped the filler (pid %s)", pid)
    elif outcome == "stuck":
        log.warning("the filler (pid %s) did not stop within %g s of SIGKILL; its files are "
                    "released when it exits", pid, STOP_WAIT_S)


def stop(key: str, name: str, uuid: str | None, config: HookConfig) -> None:
    """The guest stopped: remove the files kvmaccel created for it that are still there,
    give its pool files back (to be scrubbed), and forget it."""
    from ..engine.backing import created_by_us, forget, release

    state = read_state(key)
    forget_record(key)
    if state is None:
        log.debug("no kvmaccel state for %s", key)
        return
    _stop_filler(state.filler)  # it maps the files: stopped before they go
    freed = 0
    for path in state.files:
        try:
            ours = created_by_us(path)
        except KvmaccelError as e:  # a creation record another user could have written
            log.warning("%s; %s left alone", e, path)
            continue
        if ours:
            with contextlib.suppress(BackingError):
                freed += release(path)  # by its directory's descriptor, if still that file
                log.info("removed %s", path)
        elif os.path.lexists(path):
            log.warning("%s is no longer the file kvmaccel created; left alone", path)
        forget(path)
    links = state.pool_links
    if uuid and links:
        serve_pool.release(uuid, links, config)
    remove_made_dirs(state.proof_dirs, state.made_dirs)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    records.stop(domain=name, uuid=uuid, bytes=freed,
                 pool_files=len(links))
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")
