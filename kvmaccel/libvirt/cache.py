"""The libvirt hook's plan cache: what a start needs of a guest's last plan, and what the plan
was made from.

``<run_dir>/domains/<uuid>.plan-cache.json`` lets the next ``prepare`` of the same XML skip
the planner (the warm path reads it), and the full ``start`` populate without it
(:func:`kvmaccel.libvirt.ops.cached_job`).  One writer (:func:`write_cache`), one reader
(:func:`read_cache`), a schema version ``"v"``: a cache of another version, or one whose
limits this kvmaccel does not know, is not a cache, and the guest is planned again (and the
hook says so in its debug line).

Paths in a cache are kept around the guest's short name (``<id>-<name>``), whose id changes
at every start.  The warm path imports this module: only what ``json`` already loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ..serve.state import (
    VERSION,
    JobBackend,
    RecipeBackend,
    SchemaError,
    cache_path,
    read_json,
    write_json,
)


class CachedBackend(NamedTuple):
    """A backend of the cached plan: its job (``mem_path`` with this start's short name),
    where its path has the short name, and the pool on its filesystem (None: no pool)."""

    backend: JobBackend
    around_shortname: tuple[str, str]
    pool_dir: str | None
    state_dir: str | None


class PlanCache(NamedTuple):
    inputs: dict[str, Any]  # what the plan was made of (libvirt.warm.plan_inputs)
    name: str
    limits: dict[str, Any]  # the plan's Limits, as :meth:`Limits.to_json` wrote them
    shortname_tail: str  # the short name after ``<id>-``
    backends: tuple[CachedBackend, ...]

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "inputs": self.inputs, "name": self.name, "limits": self.limits,
                "shortname_tail": self.shortname_tail,
                "backends": [{**b.backend.to_json(),
                              "path_around_shortname": list(b.around_shortname),
                              "pool_dir": b.pool_dir, "state_dir": b.state_dir}
                             for b in self.backends]}

    @classmethod
    def from_json(cls, raw: object) -> PlanCache:
        """Raises :class:`SchemaError`."""
        if not isinstance(raw, Mapping) or raw.get("v") != VERSION:
            raise SchemaError("not a plan cache of this kvmaccel")
        try:
            backends = []
            for b in raw["backends"]:
                head, tail = b["path_around_shortname"]
                pool_dir, state_dir = b.get("pool_dir"), b.get("state_dir")
                if not (isinstance(head, str) and isinstance(tail, str)
                        and isinstance(pool_dir, (str, type(None)))
                        and isinstance(state_dir, (str, type(None)))):
                    raise SchemaError(f"backend {b.get('backend_id')!r}: malformed")
                backends.append(CachedBackend(JobBackend.from_json(b), (head, tail), pool_dir,
                                              state_dir))
            inputs, name, limits, tail = (raw["inputs"], raw["name"], raw["limits"],
                                          raw["shortname_tail"])
        except (KeyError, TypeError, ValueError) as e:
            raise SchemaError(f"malformed: {e}") from None
        if not (isinstance(inputs, dict) and isinstance(name, str)
                and isinstance(limits, dict) and isinstance(tail, str)):
            raise SchemaError("malformed")
        return cls(inputs, name, limits, tail, tuple(backends))

    def for_start(self, shortname: str) -> tuple[CachedBackend, ...]:
        """The backends with the paths of a start whose short name is ``shortname``."""
        return tuple(b._replace(backend=b.backend._replace(
            mem_path=f"/{shortname}/".join(b.around_shortname))) for b in self.backends)


class CachedPlan(NamedTuple):
    """The guest's cached plan, for this start: its backends with this start's paths."""

    uuid: str
    domain_id: int
    shortname: str
    cache: PlanCache
    backends: tuple[CachedBackend, ...]

    def recipe_backends(self) -> list[RecipeBackend | None]:
        """What a recipe keeps of each backend (None: no pool on its filesystem)."""
        return [None if c.pool_dir is None else RecipeBackend(
            c.backend.backend_id, c.backend.mem_path, c.backend.key, c.pool_dir, c.state_dir,
            c.backend.make_dir) for c in self.backends]


def write_cache(uuid: str, cache: PlanCache) -> None:
    write_json(cache_path(uuid), cache.to_json())


def read_cache(uuid: str) -> PlanCache | None:
    """The guest's plan cache; None when there is none.  Raises :class:`SchemaError` for one
    that is not of this kvmaccel, :class:`UnsafePathError` for a file that is not its own."""
    raw = read_json(cache_path(uuid))
    return None if raw is None else PlanCache.from_json(raw)
