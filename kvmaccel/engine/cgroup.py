"""kvmaccel's own cgroup: where the keeper's fills and scrubs and the hook's populates run.

With ``cgroup = "NAME"`` in the config, kvmaccel moves the process doing that work into the
cpu controller's cgroup ``NAME`` (made if missing) with the lowest CPU share: cgroup v2
``cpu.idle = 1`` where the kernel has it (5.15), else ``cpu.weight = 1``; v1 ``cpu.shares =
2``.  An operator then sees and limits kvmaccel's share in one place (``cpu.max`` there caps
it, and helper counts follow that quota).  Pages a process faults are charged to its own
memory cgroup, and hugetlb pages to its hugetlb cgroup: a file populated there is charged
there, not to the guest that later maps it (README.md says what that means for limits).

Placement is best effort: a host without a cpu controller, or a write the kernel refuses,
is a warning, never the reason a start or a fill fails.
"""

from __future__ import annotations

import contextlib
import logging
import os

from ..host.facts import read_mounts
from ..plan.config import check_cgroup_name

log = logging.getLogger(__name__)

def enter(name: str, root: str = "/", pid: int | None = None) -> str | None:
    """Move this process (or process ``pid``: the hook places the filler it forks before
    the filler runs) into cgroup ``name`` of the cpu controller, made if missing with the
    lowest CPU share; return its directory (None: no cpu controller, or refused)."""
    check_cgroup_name(name)
    mounts = read_mounts(root)
    v1 = [m.path for m in mounts if m.fs_type == "cgroup" and "cpu" in m.options.split(",")]
    v2 = [m.path for m in mounts if m.fs_type == "cgroup2"]
    try:
        if v1:
            directory = os.path.join(v1[0], name)
            os.makedirs(directory, exist_ok=True)
            _write(directory, "cpu.shares", "2")
        elif v2 and "cpu" in _read(v2[0], "cgroup.controllers").split():
            parent = v2[0]
            for part in name.split("/"):
                with contextlib.suppress(OSError):  # already enabled, or not delegated
                    _write(parent, "cgroup.subtree_control", "+cpu")
                parent = os.path.join(parent, part)
                os.makedirs(parent, exist_ok=True)
            directory = parent
            if os.path.exists(os.path.join(directory, "cpu.idle")):
                _write(directory, "cpu.idle", "1")
            else:
                _write(directory, "cpu.weight", "1")
        else:
            log.warning("no cpu cgroup controller here: kvmaccel runs where it was started")
            return None
        _write(directory, "cgroup.procs", str(pid or os.getpid()))
    except OSError as e:
        log.warning("cannot run in cgroup %s: %s; kvmaccel runs where it was started", name,
                    e.strerror)
        return None
    log.debug("running in cgroup %s", directory)
    return directory


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w", encoding="ascii") as f:
        f.write(value)


def _read(directory: str, name: str) -> str:
    try:
        with open(os.path.join(directory, name), encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""
