"""``kvmaccel pool keep --daemon``: the keeper in the background, one at a time.

Where there is no systemd the keeper detaches itself.  Two things must hold:

* **Its start says what happened.**  The caller waits on a pipe until the daemon has
  claimed its pidfile, opened its log and said it runs (:meth:`Daemon.ready`), or has
  stopped and written why; so ``keeper started`` is printed only for a keeper that runs,
  and one that dies at once is an error with its reason (exit 1).
* **One keeper at a time**, with no pid check to race: the pidfile is locked (``flock``)
  by the caller before it forks, the daemon inherits the lock and holds it until it exits,
  and a second start finds it held.  A lock dies with its process, so a pidfile left by a
  keeper that was killed is taken over.  The pidfile is opened ``O_NOFOLLOW`` in its opened
  directory (root's and writable only by root, or sticky) and written through the locked
  descriptor: no temporary name, nothing followed, nothing truncated but a pidfile.

Errors: :class:`~kvmaccel.errors.UsageError` (a keeper runs, a pidfile that is not one),
:class:`~kvmaccel.errors.KvmaccelError` (the daemon stopped as it started).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import time
from dataclasses import dataclass

from .. import safefs
from ..errors import KvmaccelError, UsageError
from ..host import process

log = logging.getLogger("kvmaccel.pool.keep")

READY_TIMEOUT_S = 120.0
"""How long ``pool keep --daemon`` waits for the daemon to say it runs."""


class Daemon:
    """The keeper's side of :func:`daemonize`: ``with daemon:`` around its work, calling
    :meth:`ready` once it is set up.  An exception before that goes back to the caller,
    which reports it; at the end the pidfile goes and the process exits."""

    def __init__(self, claim: Pidfile, report_fd: int) -> None:
        self.claim = claim
        self._report_fd = report_fd

    def ready(self) -> None:
        """Tell the caller the daemon runs (it prints "keeper started" and exits 0)."""
        if self._report_fd >= 0:
            os.write(self._report_fd, f"ready {os.getpid()}\n".encode())
            os.close(self._report_fd)
            self._report_fd = -1

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None,
                 _tb: object) -> None:
        code = 0
        if e is not None and not isinstance(e, SystemExit | KeyboardInterrupt):
            code = 1
            log.error("keep: stopped: %s", _reason(e), exc_info=not isinstance(
                e, KvmaccelError | OSError))
            if self._report_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._report_fd, _reason(e).encode(errors="replace")[:4000])
        for handler in logging.getLogger("kvmaccel").handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self.claim.release()
        os._exit(code)


def _reason(e: BaseException) -> str:
    if isinstance(e, KvmaccelError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return f"{type(e).__name__}: {e}"


def daemonize(pidfile: str) -> Daemon | int:
    """Start the keeper in the background: forked twice (a new session, nice 19, its
    autogroup too, stdio on /dev/null).  In the daemon, return a :class:`Daemon` to run the
    keeper in; in the caller, return the daemon's pid once it said it runs (:meth:`Daemon.ready`).

    One keeper at a time: the caller claims the pidfile (:func:`_claim_pidfile`: an
    ``flock`` on it) before it forks, and the daemon inherits that lock and holds it for
    its whole life; no pid is checked, so no race.  Raises :class:`UsageError` (exit 2)
    when a keeper runs already or the pidfile is not one, and :class:`KvmaccelError` with
    the daemon's own reason when it stopped before it ran."""
    claim = _claim_pidfile(pidfile)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    for handler in logging.getLogger("kvmaccel").handlers:
        handler.flush()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            # A session of its own, nice 19 (its autogroup too), stdio on /dev/null, and
            # SIGTERM, before the keeper's loop takes it over, as a clean stop (the pidfile
            # goes); then forked again: the daemon is no session leader (no terminal).
            process.detach(19)
            if os.fork() > 0:
                os._exit(0)
            claim.write_pid()
        except BaseException as e:  # noqa: BLE001 -- a child: reported, never raised
            with contextlib.suppress(OSError):
                os.write(write_fd, _reason(e).encode(errors="replace"))
            claim.release()
            os._exit(1)
        return Daemon(claim, write_fd)
    os.close(write_fd)
    claim.close()  # the daemon holds the lock now
    os.waitpid(child, 0)
    try:
        said = _read_until_closed(read_fd, READY_TIMEOUT_S)
    finally:
        os.close(read_fd)
    if said is None:
        raise KvmaccelError(f"the keeper did not say it runs within {READY_TIMEOUT_S:g} s; "
                            f"see its log (pool-keep.log) and its pidfile {pidfile}")
    ready = re.fullmatch(r"ready (\d+)\n", said)
    if ready is None:
        raise KvmaccelError("the keeper stopped as it started: "
                            f"{' '.join(said.split()) or 'no reason given'}")
    return int(ready.group(1))


def _read_until_closed(fd: int, timeout_s: float) -> str | None:
    """What the other end wrote before it closed the pipe (or exited); None on timeout."""
    import select

    data = b""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk


@dataclass
class Pidfile:
    """A claimed pidfile: open (``fd``) and locked, in its opened directory (``dir_fd``)."""

    path: str
    dir_fd: int
    fd: int

    def write_pid(self) -> None:
        """This process's pid, written through the locked descriptor."""
        data = f"{os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fchmod(self.fd, 0o644)

    def release(self) -> None:
        """Remove the pidfile's name if it is still this file, then let the lock go."""
        with contextlib.suppress(OSError):
            safefs.unlink_if_same(self.dir_fd, os.path.basename(self.path), os.fstat(self.fd))
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


PIDFILE_MAX_BYTES = 32


def _claim_pidfile(pidfile: str) -> Pidfile:
    """Open and lock ``pidfile`` (created 0644, ``O_NOFOLLOW``, in its opened directory) for
    this process and the daemon it forks.

    Its directory must be root's and writable by nobody else, or sticky (as /tmp), so that
    nobody can swap the pidfile after it is written.  An existing pidfile is taken over only
    when it is one: a regular file of root's with one link and a pid (or nothing) in it, and
    no live keeper's lock on it; anything else is refused and left as it is.  Raises
    :class:`UsageError`."""
    path = os.path.abspath(pidfile)
    directory, name = os.path.split(path)
    try:
        dir_fd = safefs.open_dir(directory, follow=True)
    except OSError as e:
        raise UsageError(f"pidfile directory {directory}: {e.strerror}; give a --pidfile in "
                         "an existing directory") from None
    try:
        dst = os.fstat(dir_fd)
        mode = stat.S_IMODE(dst.st_mode)
        if dst.st_uid not in (0, os.geteuid()) or (mode & 0o022 and not mode & stat.S_ISVTX):
            raise UsageError(f"pidfile directory {directory} is uid {dst.st_uid}'s with mode "
                             f"{mode:04o}: others could replace the pidfile; give a --pidfile "
                             "in a directory of root's that only root can write")
        for _ in range(10):
            fd = _open_pidfile(dir_fd, path, name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_of(fd)
                os.close(fd)
                raise UsageError(f"a keeper already runs ({f'pid {pid}, ' if pid else ''}"
                                 f"{pidfile}); stop it first") from None
            # Locked: but a keeper that just stopped may have removed this name after we
            # opened it; then the lock is on a file nobody else will find.  Open again.
            now = safefs.lstat_at(dir_fd, name)
            if now is not None and safefs.same_inode(now, os.fstat(fd)):
                return Pidfile(path, dir_fd, fd)
            os.close(fd)
        raise UsageError(f"{pidfile} keeps changing under kvmaccel; another process "
                         "replaces it: stop that first")
    except BaseException:
        os.close(dir_fd)
        raise


def _open_pidfile(dir_fd: int, path: str, name: str) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        pass
    st = safefs.lstat_at(dir_fd, name)
    why = _not_a_pidfile(st)
    fd = -1
    if why is None:
        try:
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            why = e.strerror
    if why is None and st is not None:
        now = os.fstat(fd)
        why = _not_a_pidfile(now) if safefs.same_inode(now, st) else "it changed as it was opened"
        if why is None and not re.fullmatch(rb"\d*\n?", os.pread(fd, PIDFILE_MAX_BYTES + 1, 0)):
            why = "it holds something other than a pid"
    if why is not None:
        if fd >= 0:
            os.close(fd)
        raise UsageError(f"{path} exists and is not a keeper's pidfile ({why}); left alone: "
                         "remove it, or give another --pidfile")
    return fd


def _not_a_pidfile(st: os.stat_result | None) -> str | None:
    if st is None:
        return "it vanished as it was opened"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} links"
    if st.st_size > PIDFILE_MAX_BYTES:
        return f"{st.st_size} bytes"
    return None


def _pid_of(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, PIDFILE_MAX_BYTES, 0).strip())
    return None
