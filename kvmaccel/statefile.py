"""Crash-safe small JSON state files: written beside the target, then renamed over it, so a
reader sees the old content or the new, never a torn one.

State lives in kvmaccel's own directories (the run dir, the pool's state dirs): each level is
made 0700 by :func:`kvmaccel.safefs.private_dirs`, and every file is 0600, whatever the umask."""

from __future__ import annotations

import json
import os

from .safefs import private_dirs


def write_json_atomic(path: str, data: object, *, durable: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically, mode 0600 (creating its directory
    0700).  ``durable`` also fsyncs before the rename.  Raises :class:`OSError`, and
    :class:`~kvmaccel.safefs.UnsafePathError` for a directory that is not kvmaccel's."""
    private_dirs(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o600)
        json.dump(data, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
