"""Whether an emulator path is kvmaccel's front: read from the script's marker line.

The front (:mod:`kvmaccel.setup.front` writes and installs it) is a ``/bin/sh`` script whose
second line is ``# kvmaccel-front: {json}`` (which QEMU it execs, kvmaccel's version, whether a
dpkg diversion put it at QEMU's own path).  Everything that plans a guest asks this module, so
that the hook, the keeper, ``doctor`` and ``plan`` agree on which guests go through the front.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

MARKER = "# kvmaccel-front: "
SUFFIX = "-kvmaccel"  # the front's name: the QEMU binary's, with this appended


@dataclass(frozen=True)
class FrontStatus:
    """What is at a front's path: ``installed`` when kvmaccel wrote it; ``qemu`` it execs."""

    path: str
    installed: bool
    qemu: str | None
    version: str | None
    diverted: bool = False


def read_status(path: str) -> FrontStatus:
    """Read what is at ``path`` (never raises for a missing or foreign file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace").splitlines()
    except OSError:
        return FrontStatus(path, False, None, None)
    if len(head) < 2 or not head[1].startswith(MARKER):
        return FrontStatus(path, False, None, None)
    try:
        info = json.loads(head[1][len(MARKER):])
    except ValueError:
        return FrontStatus(path, False, None, None)
    return FrontStatus(path, True, str(info.get("qemu")), str(info.get("version")),
                       bool(info.get("diverted")))


def is_front(path: str | None) -> bool:
    """True when ``path`` is a front kvmaccel wrote."""
    return bool(path) and read_status(str(path)).installed


def emulator_is_front(emulator: str | None) -> tuple[bool, str | None]:
    """(plan through the front, a note) for a domain's ``<emulator>``: a front kvmaccel wrote,
    or a front's name (``...-kvmaccel``) not installed on this machine (planned as if it
    were, with a note saying to install it)."""
    if emulator and is_front(emulator):
        return True, None
    if emulator and emulator.endswith(SUFFIX) and not os.path.lexists(emulator):
        return True, (f"the emulator {emulator} is kvmaccel's front, which is not installed "
                      "here: kvmaccel front install")
    return False, None
