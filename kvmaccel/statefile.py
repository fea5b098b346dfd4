"""Crash-safe small JSON state files: written beside the target, then renamed over it, so a
reader sees the old content or the new, never a torn one."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, data: object, *, dir_mode: int = 0o700,
                      durable: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (creating its directory with
    ``dir_mode``).  ``durable`` also fsyncs before the rename.  Raises :class:`OSError`."""
    os.makedirs(os.path.dirname(path), mode=dir_mode, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
