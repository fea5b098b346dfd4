"""User and group names or numbers -> ids, as libvirt reads qemu.conf's ``user`` and ``group``.

libvirt's rule (``virGetUserID``/``virGetGroupID``; the comment above ``user`` in the
qemu.conf it installs): a value is tried first as a name, and, when no user (group) has that
name, as a number; a leading ``+`` makes it a number without a lookup, since digits are a
valid name (``user = "+0"`` is root, ``user = "107"`` the user named ``107``, else uid 107).
``chown(1)`` reads ``--owner USER[:GROUP]`` the same way, so the CLI uses this rule too.

One error, :class:`~kvmaccel.errors.HostError`, naming the value and what to do.
"""

from __future__ import annotations

import grp
import pwd

from ..errors import HostError

MAX_ID = (1 << 32) - 2
"""The largest user or group id (``(uid_t) -1`` means "no change" to chown)."""


def _resolve(text: str, kind: str, where: str, remedy: str) -> int:
    numeric = text[1:] if text.startswith("+") else None
    if numeric is None:
        try:
            if kind == "user":
                return pwd.getpwnam(text).pw_uid
            return grp.getgrnam(text).gr_gid
        except (KeyError, UnicodeEncodeError, ValueError):  # ValueError: a NUL in the name
            numeric = text  # libvirt: no such name, so digits are an id
    if not (numeric.isascii() and numeric.isdigit()):
        raise HostError(f"unknown {kind} {text[:40]!r} in {where}: no {kind} of this host has "
                        f"that name (+N gives a number); {remedy}")
    value = int(numeric)
    if value > MAX_ID:
        raise HostError(f"{kind} {text[:40]!r} in {where}: id {value} is above the largest "
                        f"possible, {MAX_ID}; give a {kind} of this host")
    return value


def user_id(text: str, where: str,
            remedy: str = "create the user, or give one that exists") -> int:
    """The uid of ``text``: a user name, else digits as a uid; ``+N`` is uid N.  Raises
    :class:`HostError` (``where`` says where it was given, ``remedy`` what to do)."""
    return _resolve(text, "user", where, remedy)


def group_id(text: str, where: str,
             remedy: str = "create the group, or give one that exists") -> int:
    """The gid of ``text``, read as :func:`user_id` reads a user."""
    return _resolve(text, "group", where, remedy)


QEMU_CONF_REMEDY = "install libvirt (which creates its qemu user) or set {} in qemu.conf"


def qemu_owner(user: str, group: str) -> tuple[int, int]:
    """qemu.conf's ``user`` and ``group`` as ``(uid, gid)``.  Raises :class:`HostError`."""
    return (user_id(user, "qemu.conf", QEMU_CONF_REMEDY.format("user")),
            group_id(group, "qemu.conf", QEMU_CONF_REMEDY.format("group")))
