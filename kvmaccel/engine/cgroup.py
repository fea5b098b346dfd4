"""kvmaccel's own cgroup: where the keeper's fills and scrubs and the hook's populates run.

With ``cgroup = "NAME"`` in the config, kvmaccel moves the process doing that work into the
cpu controller's cgroup ``NAME`` (made if missing) with the lowest CPU share: cgroup v2
``cpu.idle = 1`` where the kernel has it (5.15), else ``cpu.weight = 1``; v1 ``cpu.shares =
2``.  An operator then sees and limits kvmaccel's share in one place (``cpu.max`` there caps
it, and helper counts follow that quota).  Pages a process faults are charged to its own
memory cgroup, and hugetlb pages to its hugetlb cgroup: a file populated there is charged
there, not to the guest that later maps it (README.md says what that means for limits).

Placement is best effort: a host without a cpu controller, a write the kernel refuses, or a
cgroup another user controls (refused: every level and every file written must be root's and
writable by nobody else) is a warning, never the reason a start or a fill fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator

from .. import safefs
from ..errors import UnsafePathError
from ..host.facts import read_mounts
from ..plan.config import check_cgroup_name

log = logging.getLogger(__name__)

def enter(name: str, root: str = "/", pid: int | None = None) -> str | None:
    """Move this process (or process ``pid``: the hook places the filler it forks before
    the filler runs) into cgroup ``name`` of the cpu controller, made if missing with the
    lowest CPU share; return its directory (None: no cpu controller, or refused).

    Whoever controls a cgroup controls what runs in it (throttle it with ``cpu.max``, freeze
    it, kill it), so every level from the hierarchy's root down to ``name`` must be a real
    directory of root's that nobody else can write, and so must every file written there
    (a cgroup delegated to another user fails this: refused with a warning)."""
    check_cgroup_name(name)
    mounts = read_mounts(root)
    v1 = [m.path for m in mounts if m.fs_type == "cgroup" and "cpu" in m.options.split(",")]
    v2 = [m.path for m in mounts if m.fs_type == "cgroup2"]
    parts = name.split("/")
    try:
        if v1:
            base = v1[0]
            with _level(base, parts) as fd:
                _write(fd, base, name, "cpu.shares", "2")
                _write(fd, base, name, "cgroup.procs", str(pid or os.getpid()))
        elif v2 and "cpu" in _read(v2[0], "cgroup.controllers").split():
            base = v2[0]
            for depth in range(len(parts)):
                with _level(base, parts[:depth]) as fd, \
                        contextlib.suppress(OSError):  # already enabled, or not delegated
                    _write(fd, base, "/".join(parts[:depth]), "cgroup.subtree_control", "+cpu")
            with _level(base, parts) as fd:
                if os.path.exists(f"/proc/self/fd/{fd}/cpu.idle"):
                    _write(fd, base, name, "cpu.idle", "1")
                else:
                    _write(fd, base, name, "cpu.weight", "1")
                _write(fd, base, name, "cgroup.procs", str(pid or os.getpid()))
        else:
            log.warning("no cpu cgroup controller here: kvmaccel runs where it was started")
            return None
    except OSError as e:
        log.warning("cannot run in cgroup %s: %s; kvmaccel runs where it was started", name,
                    e.strerror)
        return None
    except UnsafePathError as e:
        log.warning("refusing cgroup %s: %s; kvmaccel runs where it was started", name, e)
        return None
    directory = os.path.join(base, name)
    log.debug("running in cgroup %s", directory)
    return directory


@contextlib.contextmanager
def _level(base: str, parts: list[str]) -> Iterator[int]:
    """The cgroup ``base/parts`` (made if missing), every level from ``base`` down checked
    on its descriptor: root's, and writable by nobody else."""
    fd = safefs.open_checked_dir(os.path.join(base, *parts), top=base, make_mode=0o755)
    try:
        yield fd
    finally:
        os.close(fd)


def _write(dir_fd: int, base: str, name: str, file: str, value: str) -> None:
    """Write ``value`` to the control file ``file`` of the checked cgroup ``dir_fd``, which
    must be root's and writable by nobody else."""
    fd = os.open(file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
            path = os.path.join(base, name, file)
            raise UnsafePathError(
                f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: "
                "another user controls this cgroup; name one of root's in the config's "
                "cgroup", path=path)
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _read(directory: str, name: str) -> str:
    try:
        with open(os.path.join(directory, name), encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""
