"""File work done as root where another user can write: on descriptors, never on checked paths.

kvmaccel runs as root inside directories that others can change: a guest's per-domain memory
directory belongs to the qemu user (who may run a compromised QEMU), and ``/dev/shm`` lets any
local user create names.  A path that was checked can be swapped for a symlink before it is
used, so code here follows one rule, and every module that does file work as root (the pool,
the backings, the hook) uses these helpers to follow it:

* **Open the directory, then work relative to it.**  A directory is opened once with
  ``O_DIRECTORY|O_NOFOLLOW``, checked on the descriptor (``fstat``, ``fstatfs``), and every
  name in it is reached with ``dir_fd=`` and ``follow_symlinks=False`` / ``O_NOFOLLOW``
  (``openat``, ``linkat``, ``unlinkat``, ``fstatat``).
* **Change owner and mode on a descriptor** (``fchown``/``fchmod``), before the file becomes
  visible in a directory someone else can write.
* **Link a file by its descriptor** (``linkat`` of ``/proc/self/fd/N`` with
  ``AT_SYMLINK_FOLLOW``), never by a path that could have changed since it was checked.
* **Prove nobody else holds an inode before it changes hands**: a write lease
  (:func:`nobody_else_holds`) is refused while any other open file of the inode exists, and
  a mapping keeps its file open even after its descriptor is closed.
* **Directories of kvmaccel's own** (the run and state directories, the pool) are created one
  level at a time with mode 0700 whatever the umask (:func:`private_dirs`), and one that
  exists is used only when it is a real directory owned by us and writable by nobody else.
* **A file is written whole** (:func:`write_atomic`): under a new name of its own beside the
  target (``O_EXCL|O_NOFOLLOW``), then renamed over it, only ever over a file of ours: a
  reader sees the old content or the new, and a failure leaves no temporary file.
* **What root reads, it checks as it would before writing** (:func:`open_own_file`,
  :func:`read_own_json`, :func:`open_append`): a state file, a record or a log line names
  files to remove, processes to stop, where to append; one planted by another user would make
  root do that for them.  The directory is reached from ``/`` one level at a time
  (:func:`open_checked_dir`): from the top of kvmaccel's own tree (the run dir; a log's
  directory) down, every level a real directory of this user that group and others cannot
  write; above it, no level a symlink (but one root made in a directory only root writes, as
  ``/var/run``) and none writable by another user unless sticky (``/tmp``).  The file is
  opened ``O_NOFOLLOW`` relative to that descriptor and must be a regular file of this user
  that group and others cannot write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any

from .errors import UnsafePathError

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
O_DIR_NOFOLLOW = O_DIR | os.O_NOFOLLOW


def open_dir(path: str, *, follow: bool = False) -> int:
    """Open directory ``path`` and return its descriptor (close it yourself).  The last
    component must not be a symlink unless ``follow``.  Raises :class:`OSError`."""
    return os.open(path, O_DIR if follow else O_DIR_NOFOLLOW)


@contextlib.contextmanager
def opened_dir(path: str, *, follow: bool = False) -> Iterator[int]:
    fd = open_dir(path, follow=follow)
    try:
        yield fd
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """The path the kernel has for an open file or directory (for messages and records)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def check_private_dir(fd: int, path: str, *, what: str = "directory") -> os.stat_result:
    """Raise :class:`UnsafePathError` unless ``fd`` is a directory owned by this user with no
    permission for group or others."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
        raise UnsafePathError(
            f"{what} {path} is owned by uid {st.st_uid} with mode {mode:04o}, not uid "
            f"{os.geteuid()} with mode 0700: kvmaccel did not make it; remove it (look at what "
            "is in it first) and run again", path=path)
    return st


def check_own_dir(fd: int, path: str, *, what: str = "directory") -> os.stat_result:
    """Raise :class:`UnsafePathError` unless ``fd`` is a directory of this user that group
    and others cannot write (what :func:`private_dirs` accepts)."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o022:
        raise UnsafePathError(
            f"{what} {path} is owned by uid {st.st_uid} with mode {mode:04o}; kvmaccel keeps "
            f"its files only in directories of its own user (uid {os.geteuid()}) that nobody "
            "else can write: remove it (look at what is in it first) or chmod go-w it, and "
            "run again", path=path)
    return st


def check_own_file(fd: int, path: str, *, what: str = "file") -> os.stat_result:
    """Raise :class:`UnsafePathError` unless ``fd`` is a regular file of this user that group
    and others cannot write."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o022:
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise UnsafePathError(
            f"{what} {path} is {kind} of uid {st.st_uid} with mode {mode:04o}, not one "
            f"kvmaccel (uid {os.geteuid()}) wrote: refusing to use it; remove it (look at "
            "it first) and run again", path=path)
    return st


def _trusted_level(st: os.stat_result, path: str, uids: frozenset[int]) -> None:
    """A level above kvmaccel's own tree: root's (or one of ``uids``'), and writable by
    nobody else unless sticky (then nobody else can rename or remove what is in it)."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in uids or (mode & 0o022 and not mode & stat.S_ISVTX):
        why = "others can write it" if st.st_uid in uids else f"uid {st.st_uid} owns it"
        raise UnsafePathError(
            f"{path} (uid {st.st_uid}, mode {mode:04o}): {why}, so another user could change "
            "what is below it; kvmaccel works only under directories of root (or uid "
            f"{', '.join(map(str, sorted(uids - {0}))) or '0'}) that nobody else can write "
            "(or sticky ones, as /tmp)", path=path)


def open_checked_dir(path: str, top: str | None = None, *, uids: tuple[int, ...] = (),
                     make_mode: int | None = None, own: bool = True) -> int:
    """Open directory ``path`` from ``/``, one level at a time, and return its descriptor.

    ``top`` (default ``path``) and every level below it must be a real directory of this
    user that group and others cannot write (:func:`check_own_dir`).  A level above ``top``
    must be root's, this user's or one of ``uids``', writable by nobody else unless sticky,
    and may be a symlink only if root made it in a directory only root can write (the
    kernel then resolves it).  With ``own`` False, every level is checked as one above
    ``top`` is (a directory another of ``uids`` may own).  With ``make_mode``, missing levels
    are made (``mkdirat``, this user's, that mode whatever the umask) as the walk reaches
    them.

    Raises :class:`FileNotFoundError` when a level is missing, :class:`UnsafePathError` for
    a level that fails its check, :class:`OSError` otherwise."""
    path = os.path.abspath(path)
    top = os.path.abspath(top or path)
    if path != top and not path.startswith(top.rstrip("/") + "/"):
        raise ValueError(f"{path} is not under {top}")
    strict_from = len(top.strip("/").split("/")) if top != "/" else 0
    if not own:
        strict_from = len(path.split("/")) + 1  # no level is kvmaccel's own
    trusted = frozenset({0, os.geteuid(), *uids})
    fd = os.open("/", O_DIR)
    here = "/"
    try:
        st = os.fstat(fd)
        if strict_from == 0:
            check_own_dir(fd, here)
        else:
            _trusted_level(st, here, trusted)
        for depth, part in enumerate([p for p in path.split("/") if p], 1):
            here = os.path.join(here, part)
            if make_mode is not None:
                try:
                    os.mkdir(part, make_mode, dir_fd=fd)
                    made = os.open(part, O_DIR_NOFOLLOW, dir_fd=fd)
                    try:
                        os.fchmod(made, make_mode)
                    finally:
                        os.close(made)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, O_DIR_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                link = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if (depth >= strict_from or not stat.S_ISLNK(link.st_mode) or link.st_uid
                        or st.st_uid or stat.S_IMODE(st.st_mode) & 0o022):
                    what = "a symlink" if stat.S_ISLNK(link.st_mode) else "not a directory"
                    raise UnsafePathError(
                        f"{here} is {what}; kvmaccel follows only symlinks root made in "
                        "directories only root can write, and none in its own directories: "
                        "use the real path, or remove it", path=here) from None
                nfd = os.open(part, O_DIR, dir_fd=fd)  # root's own link: followed
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if depth >= strict_from:
                check_own_dir(fd, here)
            else:
                _trusted_level(st, here, trusted)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_own_file(path: str, flags: int = os.O_RDONLY, *, top: str | None = None,
                  mode: int = 0o600) -> int:
    """Open ``path``, a file of kvmaccel's own, and return its descriptor: its directory
    reached by :func:`open_checked_dir` (from ``top``, default that directory, down), the
    file opened ``O_NOFOLLOW`` relative to it (``O_NONBLOCK`` too: a FIFO never blocks) and
    checked (:func:`check_own_file`).  ``flags`` may hold ``O_CREAT`` (then ``mode``).

    Raises :class:`FileNotFoundError` when it (or a directory above it) does not exist,
    :class:`UnsafePathError` when it is not kvmaccel's, :class:`OSError` otherwise."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = open_checked_dir(directory, top)
    try:
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                         | os.O_NOCTTY, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
            what = "a symlink" if e.errno == errno.ELOOP else f"not a file ({e.strerror})"
            raise UnsafePathError(f"{path} is {what}; kvmaccel did not make it: remove it "
                                  "and run again", path=path) from None
    finally:
        os.close(dfd)
    try:
        check_own_file(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_own_json(path: str, *, top: str | None = None) -> Any:
    """The JSON in ``path``, a file kvmaccel wrote (:func:`open_own_file`); None when it does
    not exist.  Raises :class:`UnsafePathError`, :class:`ValueError` for a file that is not
    JSON, :class:`OSError`."""
    try:
        fd = open_own_file(path, top=top)
    except FileNotFoundError:
        return None
    with open(fd, encoding="utf-8") as f:
        return json.load(f)


def open_append(path: str, *, top: str | None = None) -> int:
    """Open kvmaccel's record or log file ``path`` to append to it (made 0600 if missing, its
    directory 0700 as :func:`private_dirs` makes it); as :func:`open_own_file` checks it."""
    private_dirs(os.path.dirname(os.path.abspath(path)))
    return open_own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, top=top)


def private_dirs(path: str, mode: int = 0o700) -> None:
    """Create ``path`` and every missing parent one level at a time with ``mode`` (set
    explicitly, whatever the umask).  The leaf, when it exists already, must be a directory
    of this user that group and others cannot write; else :class:`UnsafePathError`."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for level in reversed(missing):
        parent_fd = open_dir(os.path.dirname(level), follow=True)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.basename(level), mode, dir_fd=parent_fd)
            fd = os.open(os.path.basename(level), O_DIR_NOFOLLOW, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        try:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid():
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
    try:
        fd = open_dir(path)
    except OSError as e:
        raise UnsafePathError(f"{path}: {e.strerror}; kvmaccel's directories must be real "
                              "directories (not symlinks)", path=path) from None
    try:
        check_own_dir(fd, path)
    finally:
        os.close(fd)


def make_owned_dir(path: str, owner: tuple[int, int], *, make_parents: bool = False,
                   owner_parents: bool = True, mode: int = 0o700) -> bool:
    """Make directory ``path`` for ``owner`` (uid, gid) with ``mode`` if it is missing; True
    when this call made it.  Its parent is reached by :func:`open_checked_dir` (no level an
    untrusted symlink; each root's, or ``owner``'s if ``owner_parents``, and writable by
    nobody else unless sticky; with ``make_parents``, missing ones made root's, 0755); the
    directory is made with
    ``mkdirat``, opened ``O_NOFOLLOW`` and given its owner and mode on that descriptor, so a
    name swapped meanwhile is never chowned.  An existing entry must be a real directory of
    root or ``owner``.  Raises :class:`UnsafePathError`, :class:`FileNotFoundError` (a parent
    missing), :class:`OSError`."""
    parent, name = os.path.split(os.path.abspath(path))
    pfd = open_checked_dir(parent, uids=(owner[0],) if owner_parents else (), own=False,
                           make_mode=0o755 if make_parents else None)
    try:
        made = False
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=pfd)
            made = True
        try:
            fd = os.open(name, O_DIR_NOFOLLOW, dir_fd=pfd)
        except OSError as e:
            raise UnsafePathError(f"{path} is not a directory ({e.strerror}); refusing to "
                                  "use it", path=path) from None
        try:
            st = os.fstat(fd)
            if made:
                os.fchown(fd, *owner)
                os.fchmod(fd, mode)
            elif st.st_uid not in (0, owner[0]):
                raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not the qemu "
                                      f"user (uid {owner[0]}) or root; refusing to use it",
                                      path=path)
        finally:
            os.close(fd)
        return made
    finally:
        os.close(pfd)


def link_fd(fd: int, dir_fd: int, name: str) -> None:
    """Give the open file ``fd`` the name ``name`` in directory ``dir_fd`` (``linkat`` with
    ``AT_SYMLINK_FOLLOW`` of ``/proc/self/fd/N``: the inode held, whatever its paths are
    now).  Raises :class:`FileExistsError` when the name is taken, :class:`OSError`."""
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``fstatat(dir_fd, name, AT_SYMLINK_NOFOLLOW)``; None when the name does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def unlink_if_same(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Remove ``name`` from ``dir_fd`` if it is still the inode ``st``; True when removed.
    (In a directory another user can write, the name may have changed; whatever it is now,
    unlinking a name never touches another file's contents.)"""
    now = lstat_at(dir_fd, name)
    if now is None or not same_inode(now, st):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
        return True
    return False


def write_atomic(path: str, data: bytes | str, *, mode: int = 0o600, durable: bool = False,
                 top: str | None = None, own: bool = True) -> None:
    """:func:`write_atomic_at` in the directory :func:`open_checked_dir` reaches (from ``top``
    down; with ``own`` False, one of root's as ``/etc/...`` is, not kvmaccel's own tree)."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = open_checked_dir(directory, top, own=own)
    try:
        write_atomic_at(dfd, name, data, mode=mode, durable=durable)
    finally:
        os.close(dfd)


def _temp_name(name: str) -> str:
    return f".{name}.{os.urandom(8).hex()}.tmp"


def write_atomic_at(dir_fd: int, name: str, data: bytes | str, *, mode: int = 0o600,
                    durable: bool = False, place: bool = True) -> str:
    """Replace ``name`` in ``dir_fd`` with a file of ``data`` (a str as UTF-8); return the
    name the file has.  It is written under a new name of its own beside ``name``
    (``.<name>.<random>.tmp``, ``O_EXCL|O_NOFOLLOW``), ``mode`` set on its descriptor once
    written (never executable half written), fsynced (then the directory) if ``durable``,
    and renamed over ``name`` (unless not ``place``: the caller places it) when that is
    missing or a regular file of this user, else :class:`UnsafePathError`.  On any failure
    the old file stays and the new one goes.  Raises :class:`OSError` too."""
    tmp = _temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
        st = lstat_at(dir_fd, name) if place else None
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()):
            where = os.path.join(fd_path(dir_fd), name)
            raise UnsafePathError(f"{where} (uid {st.st_uid}) is not a file kvmaccel wrote: "
                                  "refusing to replace it; look at it, remove it, run again",
                                  path=where)
        if place:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            unlink_if_same(dir_fd, tmp, os.fstat(fd))
        raise
    finally:
        os.close(fd)
    if durable and place:
        os.fsync(dir_fd)
    return name if place else tmp


def write_json_atomic(path: str, data: object, *, durable: bool = False,
                      top: str | None = None) -> None:
    """:func:`write_atomic` of ``data`` as JSON, mode 0600, its directory made 0700 when
    missing (:func:`private_dirs`) and checked from ``top`` down."""
    private_dirs(os.path.dirname(os.path.abspath(path)))
    write_atomic(path, json.dumps(data), durable=durable, top=top)


# --- who else holds an inode -------------------------------------------------------------

def _ignore_sigio() -> None:
    """A lease holder gets SIGIO when someone opens the file; by default SIGIO kills.  Only
    the main thread can set a handler; the entry points set it for the others."""
    import signal

    threading = sys.modules.get("threading")  # not loaded: this is the only thread
    if threading is None or threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def nobody_else_holds(fd: int) -> bool:
    """True when no other open file (descriptor, mapping, descriptor in flight) of ``fd``'s
    inode exists anywhere on the host, right now.

    A write lease (``F_SETLEASE`` with ``F_WRLCK``) is granted only then, and a shared or
    private mapping keeps its file open after its descriptor is closed, so a leftover process
    that still maps a guest's memory is seen.  ``fd`` must be the caller's only open file of
    the inode (an ``O_RDONLY`` descriptor; root has ``CAP_LEASE``).  The lease is released at
    once: the caller makes sure no one can open the file afterwards (no name others can
    reach)."""
    _ignore_sigio()
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        raise
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True
