"""The per-domain hugepage directory of a memfd guest, which libvirt does not make.

libvirt 9.0 makes ``<mount>/libvirt/qemu/<shortname>`` (owned by the qemu user, mode 0700)
before ``start begin`` for a ``<hugepages/>`` guest backed by files, and removes it at stop.
For ``<source type='memfd'/>`` with huge pages it makes none (seen here: the hook found no
directory), since QEMU needs no path.  Through the front, kvmaccel's file for such a backend
goes in that same directory, so the hook makes it itself, as libvirt would, and removes it
at stop (only if empty: nothing else of kvmaccel's or QEMU's is left in it by then).

Root work in a directory tree others may write follows :mod:`kvmaccel.safefs`: the parent
``<mount>/libvirt/qemu`` (libvirt's, root's, not writable by others) is opened
``O_DIRECTORY|O_NOFOLLOW`` and checked on its descriptor; the directory is made with
``mkdirat``, opened ``O_NOFOLLOW`` and given its owner and mode by descriptor.  An existing
entry is used only when it is a real directory owned by the qemu user or root.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd

from .. import safefs
from ..errors import BackingError, UnsafePathError

PARENT_SUFFIX = "/libvirt/qemu"


def is_guest_dir(directory: str, shortname: str) -> bool:
    """True for ``<something>/libvirt/qemu/<shortname>``: a directory this module may make."""
    parent, name = os.path.split(directory)
    return name == shortname and parent.endswith(PARENT_SUFFIX)


def qemu_owner(user: str, group: str) -> tuple[int, int]:
    """qemu.conf's ``user``/``group`` (names, or ``+N`` for a number) as ids.  Raises
    :class:`BackingError` for a name this host does not know."""
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise BackingError(f"qemu.conf's user {user!r} or group {group!r} is not known on "
                           "this host") from None
    return uid, gid


def make_guest_dir(directory: str, owner: tuple[int, int]) -> bool:
    """Make ``directory`` (mode 0700, owned by ``owner``) if it is missing; True when this
    call made it (:func:`kvmaccel.safefs.make_owned_dir`, as ``kvmaccel prealloc`` makes
    its directory).  Raises :class:`BackingError` when its parent is not a root-owned
    directory others cannot write, or the name holds something else."""
    try:
        return safefs.make_owned_dir(directory, owner, owner_parents=False)
    except UnsafePathError as e:
        raise BackingError(f"refusing to make {directory}: {e}", path=directory) from None
    except OSError as e:
        raise BackingError(f"{os.path.dirname(directory)}: {e.strerror}; libvirt makes it "
                           "for every hugetlbfs mount it uses", path=directory) from None


def remove_guest_dir(directory: str) -> bool:
    """Remove ``directory`` if it is empty (``unlinkat`` with ``AT_REMOVEDIR`` relative to
    its opened parent); True when it was removed."""
    parent, name = os.path.split(directory)
    with contextlib.suppress(OSError), safefs.opened_dir(parent) as pfd:
        os.rmdir(name, dir_fd=pfd)
        return True
    return False
