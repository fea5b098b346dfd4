"""A guest's state between its start and its stop, in kvmaccel's run dir: its one schema.

``<run_dir>/domains/<key>.json`` holds what a start made for the guest (:class:`GuestState`:
files, pool links, proof directories, the filler); the stop acts on it as root.  The start
recipe (``<uuid>.prepared.json``, :class:`Recipe`) and the libvirt hook's plan cache
(``<uuid>.plan-cache.json``) sit beside it.  Every file here is read only when it is
kvmaccel's own, in kvmaccel's own directories.

Each file is one typed value here, written by one function and read by one
(:func:`write_state`/:func:`read_state`, :func:`write_recipe`/:func:`read_recipe`), with a
schema version ``"v"``.  A guest's state outlives an upgrade (a guest started before it stops
after it), so a state without ``"v"`` (kvmaccel 0.1's, the same fields) is read as version 1;
one of a newer version, or malformed, is refused as unreadable.  A recipe lives for minutes:
another version is not a recipe, and the start runs the full path.

The warm path imports this module: it imports only what ``json`` already loads (``typing``'s
NamedTuple, not dataclasses).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .. import paths, safefs
from ..errors import BackingError, UnsafePathError, UsageError
from ..pool.files import PoolKey

VERSION = 1
"""The schema of every file this module writes; :func:`_version` reads it."""


class SchemaError(ValueError):
    """A state file that is not of this schema (a field missing or of another type)."""


def _version(data: object) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise SchemaError("not a JSON object")
    if data.get("v", VERSION) != VERSION:
        raise SchemaError(f"schema version {data.get('v')!r}, this kvmaccel reads {VERSION}")
    return data


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise SchemaError(f"{name}: {value!r} is not a string")
    return value


def _opt_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else _str(data, name)


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"{name}: {value!r} is not an integer")
    return value


def _opt_int(data: Mapping[str, Any], name: str) -> int | None:
    return None if data.get(name) is None else _int(data, name)


def _num(data: Mapping[str, Any], name: str) -> float:
    value = data.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SchemaError(f"{name}: {value!r} is not a number")
    return float(value)


def _list(data: Mapping[str, Any], name: str) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise SchemaError(f"{name}: {value!r} is not a list")
    return value


class ProofRef(NamedTuple):
    """A proof directory a start made (``D/.kvmaccel``), as the stop finds it again."""

    path: str
    dev: int | None
    ino: int | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "dev": self.dev, "ino": self.ino}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProofRef:
        return cls(_str(data, "path"), _opt_int(data, "dev"), _opt_int(data, "ino"))


class PoolLink(NamedTuple):
    """A pool file linked at ``link_path`` for one backend."""

    backend_id: str
    link_path: str
    pool_path: str
    pool_dir: str

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PoolLink:
        return cls(*(_str(data, f) for f in cls._fields))


class FillerRef(NamedTuple):
    """The filler a start left: a pid and its start time identify one process."""

    pid: int
    start_ticks: int

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FillerRef:
        ref = cls(_int(data, "pid"), _int(data, "start_ticks"))
        if ref.pid <= 0:
            raise SchemaError(f"pid: {ref.pid} is not a process")
        return ref


class Populated(NamedTuple):
    """What a start populated before QEMU started, and how long it took."""

    bytes: int
    seconds: float


class GuestState(NamedTuple):
    """What a start made for one guest, written before it made it."""

    name: str | None
    uuid: str | None
    domain_id: int | None
    shortname: str | None
    start_unix: float
    files: tuple[str, ...] = ()  # created by this start: removed at the stop
    pool_links: tuple[PoolLink, ...] = ()  # pool files linked or adopted: returned at the stop
    made_dirs: tuple[str, ...] = ()  # directories this start made (a memfd guest's)
    proof_dirs: tuple[ProofRef, ...] = ()
    filler: FillerRef | None = None
    cancelled: bool = False  # the populate was cancelled (timeout): QEMU allocates itself
    populated_unix: float | None = None
    populated: Populated | None = None  # what kvmaccel populated before QEMU started

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "v": VERSION, "name": self.name, "uuid": self.uuid, "id": self.domain_id,
            "shortname": self.shortname, "start_unix": self.start_unix,
            "files": list(self.files), "pool_links": [p.to_json() for p in self.pool_links],
            "made_dirs": list(self.made_dirs),
            "proof_dirs": [p.to_json() for p in self.proof_dirs]}
        if self.filler is not None:
            data["filler"] = self.filler.to_json()
        if self.cancelled:
            data["cancelled"] = True
        if self.populated_unix is not None:
            data["populated_unix"] = self.populated_unix
        if self.populated is not None:
            data["result"] = self.populated._asdict()
        return data

    @classmethod
    def from_json(cls, raw: object) -> GuestState:
        """Raises :class:`SchemaError`."""
        data = _version(raw)
        filler, result = data.get("filler"), data.get("result")
        try:
            return cls(
                _opt_str(data, "name"), _opt_str(data, "uuid"), _opt_int(data, "id"),
                _opt_str(data, "shortname"), _num(data, "start_unix"),
                tuple(_checked_strs(_list(data, "files"), "files")),
                tuple(PoolLink.from_json(x) for x in _list(data, "pool_links")),
                tuple(_checked_strs(_list(data, "made_dirs"), "made_dirs")),
                tuple(ProofRef.from_json(x) for x in _list(data, "proof_dirs")),
                None if filler is None else FillerRef.from_json(filler),
                data.get("cancelled") is True,
                None if data.get("populated_unix") is None else _num(data, "populated_unix"),
                None if not isinstance(result, Mapping)
                else Populated(_int(result, "bytes"), _num(result, "seconds")))
        except (TypeError, AttributeError) as e:  # a list item that is not an object
            raise SchemaError(str(e)) from None


def _checked_strs(items: Sequence[Any], name: str) -> list[str]:
    if not all(isinstance(x, str) for x in items):
        raise SchemaError(f"{name}: {items!r} is not a list of strings")
    return list(items)


class JobBackend(NamedTuple):
    """One file a start creates and populates (or takes from the pool)."""

    backend_id: str
    mem_path: str
    size_bytes: int
    host_nodes: tuple[int, ...]
    policy: str  # bind or preferred: how the engine binds the pages
    alias: str
    key: PoolKey
    make_dir: bool = False  # a hugetlb memfd through the front: libvirt makes no directory
    prealloc: bool = False  # QEMU preallocates it itself: a fresh file can overlap that
    prealloc_threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "host_nodes": list(self.host_nodes),
                "key": self.key._asdict()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobBackend:
        """Raises :class:`SchemaError`."""
        nodes, key = _list(data, "host_nodes"), data.get("key")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in nodes):
            raise SchemaError(f"host_nodes: {nodes!r} is not a list of node ids")
        if not isinstance(key, Mapping):
            raise SchemaError(f"key: {key!r} is not an object")
        try:
            pool_key = PoolKey.from_dict(dict(key))
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"key: {e}") from None
        return cls(_str(data, "backend_id"), _str(data, "mem_path"), _int(data, "size_bytes"),
                   tuple(nodes), _str(data, "policy"), _str(data, "alias"), pool_key,
                   data.get("make_dir") is True, data.get("prealloc") is True,
                   _opt_int(data, "prealloc_threads"))


class RecipeBackend(NamedTuple):
    """One backend of a recipe: where QEMU looks for its file, and the pool that serves it."""

    backend_id: str
    mem_path: str
    key: PoolKey
    pool_dir: str
    state_dir: str | None
    make_dir: bool = False  # a memfd guest's directory, which the full start makes

    def to_json(self) -> dict[str, Any]:
        return {"backend_id": self.backend_id, "mem_path": self.mem_path,
                "key": self.key._asdict(), "pool_dir": self.pool_dir,
                "state_dir": self.state_dir, "make_dir": self.make_dir}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecipeBackend:
        key = data.get("key")
        if not isinstance(key, Mapping):
            raise SchemaError(f"key: {key!r} is not an object")
        try:
            pool_key = PoolKey.from_dict(dict(key))
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"key: {e}") from None
        return cls(_str(data, "backend_id"), _str(data, "mem_path"), pool_key,
                   _str(data, "pool_dir"), _opt_str(data, "state_dir"),
                   data.get("make_dir") is True)


class Recipe(NamedTuple):
    """What a check before the start (libvirt's ``prepare``) leaves for the start: a clean
    pool file waits for each of these backends."""

    uuid: str
    domain_id: int
    name: str
    shortname: str
    written_unix: float
    backends: tuple[RecipeBackend, ...]

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "uuid": self.uuid, "id": self.domain_id, "name": self.name,
                "shortname": self.shortname, "written_unix": self.written_unix,
                "backends": [b.to_json() for b in self.backends]}

    @classmethod
    def from_json(cls, raw: object) -> Recipe:
        """Raises :class:`SchemaError` (a recipe must say its version)."""
        data = _version(raw)
        if "v" not in data:
            raise SchemaError("no schema version")
        try:
            return cls(_str(data, "uuid"), _int(data, "id"), _str(data, "name"),
                       _str(data, "shortname"), _num(data, "written_unix"),
                       tuple(RecipeBackend.from_json(b) for b in _list(data, "backends")))
        except (TypeError, AttributeError, KeyError) as e:
            raise SchemaError(str(e)) from None


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
    """``<run_dir>/domains/<uuid>.json``, in the run dir the entry point resolved
    (:func:`kvmaccel.paths.places`)."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a state file")
    return os.path.join(paths.run_dir(), "domains", f"{key}.json")


def write_state(key: str, state: GuestState) -> None:
    write_json(state_path(key), state.to_json())


def read_state(key: str) -> GuestState | None:
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
    if data is None:
        return None
    try:
        return GuestState.from_json(data)
    except SchemaError as e:
        raise BackingError(f"kvmaccel's state {path} is not one this kvmaccel reads ({e}); "
                           "remove what it names by hand, then the file") from None


def recipe_path(domain_uuid: str) -> str:
    """What ``prepare`` left for a fast start from the pool."""
    return state_path(f"{domain_uuid}.prepared")


def write_recipe(recipe: Recipe) -> None:
    write_json(recipe_path(recipe.uuid), recipe.to_json())


def read_recipe(domain_uuid: str) -> Recipe | None:
    """The recipe, or None when there is none or it is not of this schema."""
    try:
        return Recipe.from_json(read_json(recipe_path(domain_uuid)))
    except SchemaError:
        return None


def cache_path(domain_uuid: str) -> str:
    """The pool-related part of the guest's last plan, for a fast ``prepare``."""
    return state_path(f"{domain_uuid}.plan-cache")
