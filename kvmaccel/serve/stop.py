"""A guest's stop: its filler stopped, the files its start made removed, its pool files
given back to be scrubbed, its directories removed, its state forgotten.

:func:`stop` acts on the guest's state as the start left it (:mod:`.state`), whatever front
started it; it is run as root, so nothing is removed that is not what kvmaccel made.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

from ..engine import records
from ..errors import BackingError, KvmaccelError
from ..model.units import format_size
from . import memdir
from . import pool as serve_pool
from .filler import STOP_WAIT_S, forget_record
from .filler import stop_filler as stop_the_filler
from .state import read_state, state_path

if TYPE_CHECKING:
    from ..plan.config import HookConfig

log = logging.getLogger(__name__)


def remove_made_dirs(state: dict[str, object]) -> None:
    """The proof directories and the memfd guests' directories a start recorded, each
    removed whole (libvirt has usually removed the guest's directories already)."""
    proofs = state.get("proof_dirs")
    for proof in proofs if isinstance(proofs, list) else []:
        if not isinstance(proof, dict) or not isinstance(proof.get("path"), str):
            continue
        dev, ino = proof.get("dev"), proof.get("ino")
        if memdir.remove_proof_dir(proof["path"], dev if isinstance(dev, int) else None,
                                   ino if isinstance(ino, int) else None):
            log.info("removed %s", proof["path"])
    made = state.get("made_dirs")
    for directory in made if isinstance(made, list) else []:
        if isinstance(directory, str) and memdir.remove_guest_dir(directory):
            log.info("removed %s", directory)


def _stop_filler(filler: object) -> None:
    """Stop the guest's filler if it still runs (SIGTERM, then SIGKILL) and say so."""
    outcome = stop_the_filler(filler)
    pid = filler.get("pid") if isinstance(filler, dict) else None
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
    _stop_filler(state.get("filler"))  # it maps the files: stopped before they go
    freed = 0
    files = state.get("files")
    for path in files if isinstance(files, list) else []:
        if not isinstance(path, str):
            continue
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
    links = state.get("pool_links")
    if uuid and isinstance(links, list) and links:
        serve_pool.release(uuid, [x for x in links if isinstance(x, dict)], config)
    remove_made_dirs(state)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    records.append("stop", domain=name, uuid=uuid, bytes=freed,
                   pool_files=len(links) if isinstance(links, list) else 0)
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")
