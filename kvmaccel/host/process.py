"""kvmaccel's own processes: detaching a child, lowering and lending priority.

Every background process kvmaccel starts (the filler, the scrub, the keeper) is detached
the same way (:func:`detach` in a forked child, :func:`spawn_detached` for a new program): a
session of its own (out of the caller's process group: libvirt's, a terminal's), stdio on
``/dev/null`` (libvirt waits for the hook's pipes to close, not for the hook), and a nice for
the process and for its scheduler autogroup.  A new session is a new autogroup
(``kernel.sched_autogroup_enabled``), and between autogroups only the group's nice counts: a
nice-19 process in a group of nice 0 competes with everyone else as an equal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from ..errors import ProcessGoneError
from . import proc

AUTOGROUP = "/proc/self/autogroup"
"""This process's scheduler autogroup; absent on a kernel without autogroups."""


def set_autogroup_nice(nice: int, pid: int | None = None) -> None:
    """The nice of the scheduler autogroup of ``pid`` (None: this process).  A kernel
    without autogroups (``kernel.sched_autogroup_enabled``) is left as it is."""
    try:
        with open(os.path.join(proc.PROC, str(pid or proc.SELF), "autogroup"), "w",
                  encoding="ascii") as f:
            f.write(str(nice))
    except OSError:
        pass


def lower_priority(nice: int, pid: int | None = None) -> None:
    """``nice`` for process ``pid`` (None: this one; its calling thread, and so every thread
    it starts from now on) and for its scheduler autogroup."""
    os.setpriority(os.PRIO_PROCESS, pid or 0, nice)
    set_autogroup_nice(nice, pid)


def lend_priority(pid: int | None, start_ticks: int | None) -> bool:
    """Give every thread of process ``pid`` this thread's priority, when theirs is lower (a
    higher nice), and its scheduler autogroup too: a nice-19 scrub that a start waits for
    must not run at nice 19 meanwhile.  Only to the process that started at ``start_ticks``
    (:func:`kvmaccel.host.proc.start_ticks`, recorded by the scrub): a scrub that died left
    its pid to whatever process gets it next.  True when lent."""
    if pid is None or start_ticks is None or not proc.same_process(pid, start_ticks):
        return False
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(ProcessGoneError, OSError):
        for tid in proc.threads(pid):
            with contextlib.suppress(OSError):
                if os.getpriority(os.PRIO_PROCESS, tid) > mine:
                    os.setpriority(os.PRIO_PROCESS, tid, mine)
        set_autogroup_nice(mine, pid)
    return True


def own_start_ticks() -> int:
    """When this process started (:func:`kvmaccel.host.proc.start_ticks`): with
    ``os.getpid()``, what names it to another process."""
    return proc.start_ticks(proc.SELF)


def detach(nice: int, name: str | None = None) -> None:
    """Detach the calling process, a child just forked: a session of its own, stdio on
    ``/dev/null``, SIGTERM as :class:`KeyboardInterrupt` (the engine then stops; a daemon's
    ``with`` block ends), the thread name ``name`` if given, and ``nice`` for the process
    and for its new scheduler autogroup."""
    from .sysmem import set_thread_name

    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if name is not None:
        set_thread_name(name)
    lower_priority(nice)


def spawn_detached(argv: Sequence[str], nice: int,
                   env: Mapping[str, str] | None = None) -> int:
    """Start program ``argv`` detached (its own session, stdio on ``/dev/null``, no
    inherited descriptors, environment ``env`` if given) and give it and its autogroup
    ``nice``; return its pid.

    The nice is set from here once the program runs (its session made before it did, by
    ``start_new_session``): the child is one thread then, so every thread it starts later
    has it.  No ``preexec_fn``, which is not safe in a threaded caller."""
    child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                             env=env)
    with contextlib.suppress(ProcessLookupError):
        lower_priority(nice, child.pid)
    return child.pid
