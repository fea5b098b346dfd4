"""The warm pool at a guest's start and stop: what the hook does with :mod:`kvmaccel.pool.manage`.

* ``prepare begin``: a backend a clean pool file can serve needs no free pages; the capacity
  check counts only the rest.
* ``start begin``: for each backend the plan populates, link a clean pool file of the same
  :class:`~kvmaccel.pool.manage.PoolKey` at the path libvirt hands QEMU (owner, group and mode as
  the hook's own files); the backends no pool file serves are populated fresh, and each fresh
  file then joins the pool, in use by this guest (within the pool's limits), so that the
  guest's next start comes from the pool.
* ``stopped end`` / ``release end``: the guest's pool files still hold its memory: mark them
  dirty and start a detached scrub at nice 19.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import safefs
from ..errors import UsageError
from ..pool.manage import (
    Pool,
    PoolEntry,
    PoolKey,
    key_for,
    pool_dir_for,
    reserved_first,
    spawn_scrub,
)

if TYPE_CHECKING:  # a start from a cached plan imports neither the planner nor the config
    from ..engine.backing import Backing, BackingSpec
    from ..host.facts import HostFacts
    from ..plan.config import HookConfig
    from ..plan.planner import BackendPlan, CapacityCheck, DomainPlan

Fresh = tuple[str, PoolKey, "BackingSpec"]
"""A backend to populate: its id, the pool key its file would have, and its spec."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Linked:
    """A pool file linked at ``link_path`` for one backend."""

    backend_id: str
    link_path: str
    pool_path: str
    pool_dir: str


def backend_key(backend: BackendPlan) -> PoolKey:
    return key_for(backend.file_size_bytes, backend.page_size_kib, backend.host_nodes or (),
                   backend.policy)


def pool_for(path: str, host: HostFacts, config: HookConfig) -> Pool | None:
    """The pool on ``path``'s filesystem, or None (pool disabled, or not a pool filesystem)."""
    if not config.pool_enabled:
        return None
    try:
        directory = pool_dir_for(path, host.mounts)
    except UsageError:
        return None
    return Pool(directory, max_bytes=config.pool_max_bytes,
                max_node_bytes=config.pool_max_node_bytes)


def capacity_after_pool(plan: DomainPlan, host: HostFacts, config: HookConfig
                        ) -> tuple[CapacityCheck, ...]:
    """The plan's capacity checks less what clean pool files would serve, with the clean
    pool files nobody would use counted as available (:func:`make_room` gives them back)."""
    served: dict[tuple[int | None, int], int] = {}
    spare: dict[tuple[int | None, int], int] = {}
    clean: dict[str, list[PoolEntry]] = {}  # per pool: clean files not yet spoken for
    for backend in plan.populated:
        assert backend.file_path is not None
        pool = pool_for(backend.file_path, host, config)
        if pool is None:
            continue
        left = clean.setdefault(pool.directory,
                                [e for e in pool.entries() if e.state == "clean"])
        key = backend_key(backend)
        match = next((e for e in reserved_first(left) if e.key.serves(key, plan.uuid)), None)
        if match is not None:
            left.remove(match)
            _add(served, key)
    for left in clean.values():
        for entry in left:
            _add(spare, entry.key)
    return tuple(replace(c, needed_bytes=max(0, c.needed_bytes
                                             - served.get((c.node, c.page_size_kib), 0)),
                         available_bytes=c.available_bytes
                         + spare.get((c.node, c.page_size_kib), 0))
                 for c in plan.capacity)


def _add(totals: dict[tuple[int | None, int], int], key: PoolKey) -> None:
    for node, length in key.node_bytes().items():
        totals[(node, key.page_size_kib)] = totals.get((node, key.page_size_kib), 0) + length


def take(domain_uuid: str | None, backends: Sequence[Fresh], host: HostFacts,
         config: HookConfig) -> tuple[list[Linked], list[Fresh]]:
    """Link clean pool files for what they can serve; return (linked, still to populate)."""
    linked: list[Linked] = []
    fresh: list[Fresh] = []
    for backend_id, key, spec in backends:
        assert spec.path is not None
        pool = pool_for(spec.path, host, config) if domain_uuid else None
        entry = None
        if pool is not None and domain_uuid:
            entry = pool.take(key, spec.path, domain_uuid=domain_uuid, backend_id=backend_id,
                              uid=spec.uid, gid=spec.gid, mode=spec.mode)
        if entry is None or pool is None:
            fresh.append((backend_id, key, spec))
            continue
        linked.append(Linked(backend_id, spec.path, entry.path, pool.directory))
        log.info("%s: from the pool (%s)", spec.path, entry.path)
    return linked, fresh


def adopt(domain_uuid: str | None, fresh: Sequence[Fresh], backings: Sequence[Backing],
          host: HostFacts, config: HookConfig) -> list[Linked]:
    """Add freshly populated files, still open as ``backings``, to the pool, in use by this
    guest (within its limits).  Each is linked by its descriptor: the guest's directory
    belongs to the qemu user, who may have put anything at the file's path by now."""
    adopted = []
    for (backend_id, key, spec), backing in zip(fresh, backings, strict=True):
        assert spec.path is not None
        pool = pool_for(spec.path, host, config) if domain_uuid else None
        if pool is None or domain_uuid is None:
            continue
        entry = pool.adopt(backing.fd, key, domain_uuid=domain_uuid, backend_id=backend_id,
                           link_path=spec.path)
        if entry is not None:
            adopted.append(Linked(backend_id, spec.path, entry.path, pool.directory))
    return adopted


def release(domain_uuid: str, links: Sequence[dict[str, object]]) -> list[str]:
    """The guest stopped: unlink its pool links that libvirt left, mark its pool files dirty
    and start a detached scrub of those pools.  Returns the pool directories touched."""
    pool_dirs: list[str] = []
    for link in links:
        link_path, pool_path, pool_dir = (link.get("link_path"), link.get("pool_path"),
                                          link.get("pool_dir"))
        if not (isinstance(link_path, str) and isinstance(pool_path, str)
                and isinstance(pool_dir, str)):
            continue
        # Unlink the guest's name only if it is still the pool file (lstat, relative to the
        # directory opened O_NOFOLLOW: whatever the qemu user put there is left alone).
        with contextlib.suppress(OSError):
            pool_st = os.stat(pool_path, follow_symlinks=False)
            with safefs.opened_dir(os.path.dirname(link_path)) as dir_fd:
                safefs.unlink_if_same(dir_fd, os.path.basename(link_path), pool_st)
        if pool_dir not in pool_dirs:
            pool_dirs.append(pool_dir)
    for pool_dir in pool_dirs:
        dirty = Pool(pool_dir).release_domain(domain_uuid)
        log.info("pool %s: %d file(s) of this guest to scrub", pool_dir, len(dirty))
    if pool_dirs:
        pid = spawn_scrub(pool_dirs)
        log.info("scrubbing in the background (pid %d, nice 19)", pid)
    return pool_dirs


def make_room(specs: Sequence[BackingSpec], host: HostFacts, config: HookConfig) -> int:
    """A pool must never starve the guests it serves: when the files about to be populated
    would not fit, give back pool files nobody uses (oldest first) on their filesystems
    until they do.  Returns the bytes given back."""
    from ..engine.backing import check_room

    freed = 0
    for spec in specs:
        assert spec.path is not None
        shortfall = check_room([spec], host)
        pool = pool_for(spec.path, host, config) if shortfall else None
        if pool is not None:
            got = pool.drain(at_least_bytes=shortfall)
            log.info("pool %s: gave back %d bytes to make room for %s", pool.directory, got,
                     spec.path)
            freed += got
    return freed
