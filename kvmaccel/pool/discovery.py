"""Which pools exist on this host, and the one line for a pool that is skipped.

A pool is ``<mount>/.kvmaccel-pool`` on a hugetlbfs or tmpfs mount.  On a world-writable
tmpfs (``/dev/shm``) any user can make that name first: a directory of their own, a
symlink, a file.  :meth:`kvmaccel.pool.manage.Pool.check` refuses it
(:class:`~kvmaccel.errors.UnsafePathError`), and every caller that walks several pools skips
it with :func:`refused_line` and goes on with the others: one squatted pool never stops
``metrics``, ``pool list``, ``pool scrub``, ``pool drain``, the keeper, or a guest's start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import UnsafePathError
from .files import POOL_DIRNAME

if TYPE_CHECKING:
    from ..host.facts import Mount


def existing_pools(mounts: Sequence[Mount]) -> list[str]:
    """The pool directories on the hugetlbfs and tmpfs ``mounts``: every ``.kvmaccel-pool``
    name there, whatever it is (another user's directory, a symlink, a file: ``Pool.check``
    refuses it, and the callers skip it with a warning)."""
    found: list[str] = []
    for mount in mounts:
        path = os.path.join(mount.path, POOL_DIRNAME)
        if mount.fs_type in ("hugetlbfs", "tmpfs") and path not in found and \
                os.path.lexists(path):
            found.append(path)
    return found


def refused_line(e: UnsafePathError) -> str:
    """The one warning line for a pool that is skipped."""
    return f"{e}; this pool is skipped, the others are used"
