"""``started begin``: QEMU has preallocated every backend, and the guest's filler stops for good.

:mod:`kvmaccel.serve.filler` says why a filler must not outlive the start.  This path runs at
every guest's start while a filler record exists, and imports no more than the warm path does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..serve.filler import STOP_WAIT_S, forget_record, record_path, stop_filler
from ..serve.state import guest_key, read_state
from .warm import domain_ids


def stop_at_started(name: str, xml: bytes, say: Callable[[str], None]) -> None:
    """``started begin``: QEMU has preallocated every backend; stop the guest's filler for
    good, if its start left one.  Never raises for a filler that is gone already."""
    uuid, _ = domain_ids(xml)
    key = guest_key(uuid, name)
    if not os.path.lexists(record_path(key)):
        return
    state = read_state(key)
    filler = state.filler if state is not None else None
    outcome = stop_filler(filler, at_once=True)
    pid = filler.pid if filler is not None else None
    if outcome == "stopped":
        say(f"stopped the filler (pid {pid}) for good: QEMU has preallocated every backend")
    elif outcome == "stuck":
        say(f"the filler (pid {pid}) did not exit within {STOP_WAIT_S:g} s of SIGKILL")
    forget_record(key)
