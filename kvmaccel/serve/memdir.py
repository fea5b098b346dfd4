"""The guest's directories the front serves from: the proof directory, and a memfd guest's.

* **The proof directory** ``D/.kvmaccel``: ``D`` (``<mount>/libvirt/qemu/<shortname>``)
  belongs to the qemu user, so a name in it proves nothing; at each start the hook (root)
  makes ``D/.kvmaccel``, root's, mode 0755, and puts the files the front may hand QEMU in it
  (:mod:`kvmaccel.setup.front` says what the front checks).  One found there already is
  removed whole when it is root's (a start or stop of kvmaccel's that did not finish: only
  root can make a directory of root's there) and refused otherwise; it is removed whole at
  stop too.
* **A memfd guest's** ``D``: libvirt 9.0 makes ``D`` (owned by the qemu user, mode 0700)
  before ``start begin`` for a ``<hugepages/>`` guest backed by files, and removes it whole
  at stop (``virFileDeleteTree``, on every mount of qemu.conf's ``hugetlbfs_mount``, before
  the ``stopped end`` hook).  For ``<source type='memfd'/>`` with huge pages it makes none,
  since QEMU needs no path; so the hook makes it, as libvirt would, removes it whole at stop,
  and never reuses one that is not empty (what a previous QEMU left in it is not handed on).

Root work in a directory tree others may write follows :mod:`kvmaccel.safefs`: the parent
``<mount>/libvirt/qemu`` (libvirt's, root's, not writable by others) is opened
``O_DIRECTORY|O_NOFOLLOW`` and checked on its descriptor; every name below it is reached by
descriptor without following symlinks (``mkdirat``, ``openat``, ``unlinkat``), and owner and
mode are set by descriptor.

Errors: :class:`~kvmaccel.errors.BackingError` saying what is wrong; the hook then fails
open (QEMU allocates the memory itself) unless ``strict``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, NamedTuple

from .. import safefs
from ..errors import BackingError
from .state import ProofRef

PARENT_SUFFIX = "/libvirt/qemu"
PROOF_DIR = ".kvmaccel"  # keep in step with kvmaccel.plan.planner and the front's script
PROOF_MODE = 0o755  # the front opens it (read) to hold it on a descriptor
MAX_DEPTH = 16  # what a removal descends into; deeper is left (and said)


def is_guest_dir(directory: str, shortname: str) -> bool:
    """True for ``<something>/libvirt/qemu/<shortname>``: a directory this module may make."""
    parent, name = os.path.split(directory)
    return name == shortname and parent.endswith(PARENT_SUFFIX)


def guest_dir_of(path: str) -> str | None:
    """``D`` for a file the front serves (``D/.kvmaccel/kvmaccel-<id>``), else None."""
    proof = os.path.dirname(path)
    return os.path.dirname(proof) if os.path.basename(proof) == PROOF_DIR else None


def _log(level: str, message: str, *args: Any) -> None:
    """Log only when there is something to say: the warm start imports no ``logging``."""
    import logging

    getattr(logging.getLogger(__name__), level)(message, *args)


class ProofDir(NamedTuple):
    """``D/.kvmaccel`` as this start made it: its inode, and ``D``'s owner (the files')."""

    path: str
    dev: int
    ino: int
    uid: int
    gid: int

    def ref(self) -> ProofRef:
        """What the guest's state keeps of it, for the stop."""
        return ProofRef(self.path, self.dev, self.ino)

    def holds(self, dir_fd: int) -> bool:
        """True when the open directory ``dir_fd`` is this one (not one swapped in)."""
        st = os.fstat(dir_fd)
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


def _open_parent(directory: str) -> int:
    """``<mount>/libvirt/qemu``, opened and checked: root's, not writable by others."""
    parent = os.path.dirname(directory)
    try:
        pfd = safefs.open_dir(parent)
    except OSError as e:
        raise BackingError(f"{parent}: {e.strerror}; libvirt makes it for every hugetlbfs "
                           "mount it uses", path=directory) from None
    pst = os.fstat(pfd)
    if pst.st_uid != 0 or stat.S_IMODE(pst.st_mode) & 0o022:
        os.close(pfd)
        raise BackingError(f"{parent} is not root's, or others can write it; refusing to use "
                           "a guest directory in it", path=directory)
    return pfd


def _open_below(dir_fd: int, name: str, path: str) -> int:
    try:
        return os.open(name, safefs.O_DIR_NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        raise BackingError(f"{path} is not a directory ({e.strerror}); refusing to use it",
                           path=path) from None


def make_guest_dir(directory: str, owner: tuple[int, int]) -> bool:
    """Make ``directory`` (mode 0700, owned by ``owner``) if it is missing; True when this
    call made it.  Raises :class:`BackingError` when its parent is not a root-owned directory
    others cannot write, or the name holds something else: not a directory, another user's,
    or one with anything in it but a proof directory kvmaccel left (removed)."""
    parent_fd = _open_parent(directory)
    name = os.path.basename(directory)
    try:
        made = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            made = True
        except FileExistsError:
            pass
        fd = _open_below(parent_fd, name, directory)
        try:
            st = os.fstat(fd)
            if made:
                os.fchown(fd, *owner)
                os.fchmod(fd, 0o700)
                return True
            if st.st_uid not in (0, owner[0]):
                raise BackingError(f"{directory} belongs to uid {st.st_uid}, not the qemu "
                                   "user; refusing to use it", path=directory)
            _remove_stale_proof(fd, directory)
            left = sorted(os.listdir(fd))
            if left:
                raise BackingError(
                    f"{directory} is not empty ({', '.join(left[:3])}"
                    f"{', ...' if len(left) > 3 else ''}): left by an earlier guest of this "
                    "shortname; kvmaccel hands QEMU nothing from it: remove it", path=directory)
            return False
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)


def _remove_stale_proof(guest_fd: int, directory: str) -> None:
    """Remove ``.kvmaccel`` from the open ``D`` when it is a directory of root's (kvmaccel's
    own, left by a start or stop that did not finish); refuse anything else there."""
    st = safefs.lstat_at(guest_fd, PROOF_DIR)
    if st is None:
        return
    path = os.path.join(directory, PROOF_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise BackingError(
            f"{path} exists and kvmaccel did not make it (uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to serve this guest from it: QEMU "
            "allocates the memory itself", path=path)
    if not remove_tree(guest_fd, PROOF_DIR):
        raise BackingError(f"cannot remove {path}, left by an earlier start; remove it",
                           path=path)
    _log("info", "removed %s, left by an earlier start", path)


def make_proof_dir(directory: str) -> ProofDir:
    """Make ``directory/.kvmaccel`` for this start (root's, mode 0755), first removing one
    of kvmaccel's left there; return it with ``directory``'s owner.  Raises
    :class:`BackingError` when ``directory`` is not a real directory of its own in libvirt's
    root-owned parent, is writable by others, or holds a ``.kvmaccel`` kvmaccel did not
    make."""
    parent_fd = _open_parent(directory)
    try:
        guest_fd = _open_below(parent_fd, os.path.basename(directory), directory)
    finally:
        os.close(parent_fd)
    path = os.path.join(directory, PROOF_DIR)
    try:
        gst = os.fstat(guest_fd)
        if stat.S_IMODE(gst.st_mode) & 0o022:
            raise BackingError(f"{directory} is writable by others (mode "
                               f"{stat.S_IMODE(gst.st_mode):04o}); refusing to serve this "
                               "guest from it", path=directory)
        _remove_stale_proof(guest_fd, directory)
        try:
            os.mkdir(PROOF_DIR, PROOF_MODE, dir_fd=guest_fd)
        except OSError as e:
            raise BackingError(f"cannot make {path}: {e.strerror}", path=path) from None
        fd = _open_below(guest_fd, PROOF_DIR, path)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():  # someone made it between mkdir and open
                raise BackingError(f"{path} changed while kvmaccel made it; refusing it",
                                   path=path)
            os.fchmod(fd, PROOF_MODE)
        finally:
            os.close(fd)
        return ProofDir(path, st.st_dev, st.st_ino, gst.st_uid, gst.st_gid)
    finally:
        os.close(guest_fd)


def remove_proof_dir(path: str, dev: int | None = None, ino: int | None = None) -> bool:
    """At stop: remove ``D/.kvmaccel`` whole if it is still kvmaccel's (root's, and the
    inode this start made when given).  True when removed; False when gone already
    (libvirt removes ``D`` whole first) or not kvmaccel's (left alone)."""
    directory = os.path.dirname(path)
    with contextlib.suppress(OSError), safefs.opened_dir(os.path.dirname(directory)) as pfd:
        guest_fd = os.open(os.path.basename(directory), safefs.O_DIR_NOFOLLOW, dir_fd=pfd)
        try:
            st = safefs.lstat_at(guest_fd, PROOF_DIR)
            if st is None:
                return False
            ours = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and (
                ino is None or (st.st_dev, st.st_ino) == (dev, ino))
            if not ours:
                _log("warning", "%s is no longer the directory kvmaccel made; left alone", path)
                return False
            return remove_tree(guest_fd, PROOF_DIR)
        finally:
            os.close(guest_fd)
    return False


def remove_guest_dir(directory: str) -> bool:
    """At stop: remove the memfd guest's ``directory`` that the hook made, whole, whatever
    the qemu user left in it (by descriptor, never following a symlink: only names below it
    go).  True when removed."""
    with contextlib.suppress(OSError), safefs.opened_dir(os.path.dirname(directory)) as pfd:
        return remove_tree(pfd, os.path.basename(directory))
    return False


def remove_tree(dir_fd: int, name: str, depth: int = 0) -> bool:
    """Remove ``name`` in the open ``dir_fd`` and everything below it: directories are
    opened ``O_NOFOLLOW`` relative to their parent's descriptor, anything else (a symlink
    included) is unlinked as a name.  True when ``name`` is gone."""
    try:
        fd = os.open(name, safefs.O_DIR_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError:  # not a directory (or a symlink): a name to unlink
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        return safefs.lstat_at(dir_fd, name) is None
    try:
        for entry in os.listdir(fd):
            st = safefs.lstat_at(fd, entry)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth < MAX_DEPTH:
                    remove_tree(fd, entry, depth + 1)
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError as e:
        _log("warning", "cannot remove %s: %s (something was added while kvmaccel removed "
             "it?)", name, e.strerror)
        return False
    return True
