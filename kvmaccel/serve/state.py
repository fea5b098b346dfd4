"""A guest's state between its start and its stop, in kvmaccel's run dir.

``<run_dir>/domains/<key>.json`` holds what a start made for the guest (files, pool links,
proof directories, the filler); the stop acts on it as root.  The start recipe
(``<uuid>.prepared.json``) and the plan cache (``<uuid>.plan-cache.json``) sit beside it.
Every file here is read only when it is kvmaccel's own, in kvmaccel's own directories.

The warm path imports this module: it imports only what ``json`` already loads.
"""

from __future__ import annotations

import os
from typing import Any

from .. import paths, safefs
from ..errors import BackingError, UnsafePathError, UsageError


def _top(path: str) -> str | None:
    """Where the checked chain of ``path`` starts: the run dir, when it is under it."""
    top = os.path.abspath(paths.run_dir())
    return top if os.path.abspath(path).startswith(top.rstrip("/") + "/") else None


def read_json(path: str) -> Any:
    """The JSON kvmaccel left at ``path`` in its run dir; None when it is missing or not
    JSON.  Root acts on what it reads there (files to remove, processes to stop), so the
    file and every directory from the run dir down must be kvmaccel's own
    (:func:`kvmaccel.safefs.read_own_json`): raises :class:`UnsafePathError` otherwise."""
    try:
        return safefs.read_own_json(path, top=_top(path))
    except UnsafePathError:
        raise
    except (OSError, ValueError):
        return None


def write_json(path: str, data: object) -> None:
    """Write what :func:`read_json` reads (atomically, by the checked directory's
    descriptor).  Raises :class:`OSError`, :class:`UnsafePathError`."""
    safefs.write_json_atomic(path, data, top=_top(path))


# --- per-domain state ----------------------------------------------------------------------

def guest_key(uuid: str | None, name: str) -> str:
    """The name of a guest's state and filler record: its uuid, else ``name-<name>``."""
    return uuid or f"name-{name}"


def state_path(key: str) -> str:
    """``<run_dir>/domains/<uuid>.json`` (the run dir comes from ``$KVMACCEL_RUN_DIR``)."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a state file")
    return os.path.join(paths.run_dir(), "domains", f"{key}.json")


def write_state(key: str, state: dict[str, object]) -> None:
    write_json(state_path(key), state)


def read_state(key: str) -> dict[str, object] | None:
    """The guest's state as ``start`` left it; None when there is none.  The stop acts on it
    as root (the filler's pid, the files to remove), so it is read only from kvmaccel's own
    file in kvmaccel's own directories: raises :class:`UnsafePathError` for anything else,
    :class:`BackingError` for a file that cannot be read."""
    path = state_path(key)
    try:
        data = safefs.read_own_json(path, top=paths.run_dir())
    except UnsafePathError:
        raise
    except (OSError, ValueError) as e:
        raise BackingError(f"cannot read kvmaccel's state {path}: {e}") from None
    return data if isinstance(data, dict) else None


def recipe_path(domain_uuid: str) -> str:
    """What ``prepare`` left for a fast start from the pool."""
    return state_path(f"{domain_uuid}.prepared")


def cache_path(domain_uuid: str) -> str:
    """The pool-related part of the guest's last plan, for a fast ``prepare``."""
    return state_path(f"{domain_uuid}.plan-cache")
