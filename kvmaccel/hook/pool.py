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
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import safefs
from ..errors import UnsafePathError, UsageError
from ..model.units import format_size
from ..pool.discovery import existing_pools, refused_line
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
    """The pool on ``path``'s filesystem, or None (pool disabled, not a pool filesystem, or
    a pool directory that is not kvmaccel's: :func:`refused`)."""
    if not config.pool_enabled:
        return None
    try:
        directory = pool_dir_for(path, host.mounts)
    except UsageError:
        return None
    pool = Pool(directory, max_bytes=config.pool_max_bytes,
                max_node_bytes=config.pool_max_node_bytes)
    try:
        pool.check()
    except UnsafePathError as e:
        refused(e)
        return None
    return pool


_refused: set[str] = set()


def refused(e: UnsafePathError) -> None:
    """A start never fails because of a pool, not even under ``strict`` (which is about
    room for the guest): a pool directory that is not kvmaccel's (one another user made
    first on a world-writable tmpfs, a symlink, a file) is not used, with one warning line
    per hook call.  Its guests start as if it were not there."""
    if e.path not in _refused:
        _refused.add(str(e.path))
        log.warning("%s", refused_line(e))


def served_by_pool(plan: DomainPlan, host: HostFacts, config: HookConfig
                   ) -> tuple[set[str], dict[str, list[PoolEntry]]]:
    """The backends a pool file will serve at start (a clean one, or this guest's own file
    that a scrub is finishing), and per pool the clean files left over."""
    served: set[str] = set()
    clean: dict[str, list[PoolEntry]] = {}  # per pool: clean files not yet spoken for
    own: dict[str, list[PoolEntry]] = {}  # per pool: this guest's files a scrub finishes
    for backend in plan.populated:
        assert backend.file_path is not None
        pool = pool_for(backend.file_path, host, config)
        if pool is None:
            continue
        if pool.directory not in clean:
            try:
                entries = pool.entries()
            except UnsafePathError as e:  # made by another user since pool_for looked
                refused(e)
                entries = []
            clean[pool.directory] = [e for e in entries if e.state == "clean"]
            own[pool.directory] = [e for e in entries if plan.uuid is not None
                                   and e.domain_uuid == plan.uuid
                                   and e.state in ("dirty", "scrubbing")]
        key = backend_key(backend)
        for candidates in (clean[pool.directory], own[pool.directory]):
            match = next((e for e in reserved_first(candidates)
                          if e.key.serves(key, plan.uuid)), None)
            if match is not None:
                candidates.remove(match)
                served.add(backend.backend_id)
                break
    return served, clean


def room_for_everything(plan: DomainPlan, host: HostFacts, config: HookConfig) -> int:
    """A pool must never be the reason a start fails.  Count what the guest will allocate of
    each page size on each node, whatever allocates it (kvmaccel, or QEMU itself for the
    backends kvmaccel does not populate), less what pool files will serve; where the host
    has less free, give back unused, unreserved pool files of that page size on that node,
    oldest first, until it fits.  Returns the bytes given back."""
    from ..plan.limits import split_across_nodes
    from ..pool.keep import free_bytes

    if not config.pool_enabled:
        return 0
    served, _ = served_by_pool(plan, host, config)
    need: dict[tuple[int | None, int], int] = {}
    for b in plan.backends:
        if b.backend_id in served:
            continue
        for node, _, length in split_across_nodes(b.size_bytes, b.host_nodes or (),
                                                  b.page_size_kib * 1024):
            need[(node, b.page_size_kib)] = need.get((node, b.page_size_kib), 0) + length
    freed = 0
    for (node, page_kib), wanted in need.items():
        short = wanted - free_bytes(host, node, page_kib)
        for pool in _pools_of_page(page_kib, host, config) if short > 0 else []:

            def fits(e: PoolEntry, node: int | None = node, page_kib: int = page_kib) -> bool:
                nodes = e.key.node_bytes()
                return (e.key.page_size_kib == page_kib and e.key.reserved_uuid is None
                        and (node is None or node in nodes or None in nodes))

            try:
                got = pool.drain(at_least_bytes=short, matching=fits)
            except UnsafePathError as e:
                refused(e)
                continue
            if got:
                log.info("pool %s: gave back %s of %s pages%s so that guest %s fits",
                         pool.directory, format_size(got), format_size(page_kib * 1024),
                         "" if node is None else f" on node {node}", plan.name)
            freed += got
            short -= got
            if short <= 0:
                break
    return freed


def _pools_of_page(page_kib: int, host: HostFacts, config: HookConfig) -> list[Pool]:
    pools = []
    for mount in host.mounts:
        if (mount.fs_type == "hugetlbfs" and mount.page_size_kib == page_kib) or (
                mount.fs_type == "tmpfs" and page_kib == host.base_page_size_kib):
            for directory in existing_pools([mount]):
                pool = pool_for(directory, host, config)
                if pool is not None:
                    pools.append(pool)
    return pools


def capacity_after_pool(plan: DomainPlan, host: HostFacts, config: HookConfig
                        ) -> tuple[CapacityCheck, ...]:
    """The plan's capacity checks less what pool files would serve (:func:`served_by_pool`),
    with the clean pool files nobody would use counted as available (:func:`make_room` gives
    them back)."""
    served_ids, left = served_by_pool(plan, host, config)
    served: dict[tuple[int | None, int], int] = {}
    spare: dict[tuple[int | None, int], int] = {}
    for backend in plan.populated:
        if backend.backend_id in served_ids:
            _add(served, backend_key(backend))
    for entries in left.values():
        for entry in entries:
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
            try:
                entry = _take_one(pool, key, spec, domain_uuid, backend_id, host, config)
            except UnsafePathError as e:  # made by another user since pool_for looked
                refused(e)
        if entry is None or pool is None:
            fresh.append((backend_id, key, spec))
            continue
        linked.append(Linked(backend_id, spec.path, entry.path, pool.directory))
        log.info("%s: from the pool (%s)", spec.path, entry.path)
    return linked, fresh


def _take_one(pool: Pool, key: PoolKey, spec: BackingSpec, domain_uuid: str, backend_id: str,
              host: HostFacts, config: HookConfig) -> PoolEntry | None:
    assert spec.path is not None
    entry = pool.take(key, spec.path, domain_uuid=domain_uuid, backend_id=backend_id,
                      uid=spec.uid, gid=spec.gid, mode=spec.mode)
    t0 = time.monotonic()
    if entry is None and pool.own_file_after_scrub(
            key, domain_uuid, host, config.limits, own_file_wait_s(config)):
        log.info("%s: waited %.2f s for the scrub of this guest's own last file",
                 spec.path, time.monotonic() - t0)
        entry = pool.take(key, spec.path, domain_uuid=domain_uuid, backend_id=backend_id,
                          uid=spec.uid, gid=spec.gid, mode=spec.mode)
    return entry


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
        try:
            entry = pool.adopt(backing.fd, key, domain_uuid=domain_uuid,
                               backend_id=backend_id, link_path=spec.path)
        except UnsafePathError as e:  # made by another user since pool_for looked
            refused(e)
            continue
        if entry is not None:
            adopted.append(Linked(backend_id, spec.path, entry.path, pool.directory))
    return adopted


OWN_FILE_WAIT_S = 300.0
"""How long a start waits for its own last file's scrub before populating a fresh one (a
scrub zeroes at about the speed a populate does, so a wait this long is already slower)."""


def own_file_wait_s(config: HookConfig) -> float:
    timeout = config.populate_timeout_s
    return min(timeout, OWN_FILE_WAIT_S) if timeout > 0 else OWN_FILE_WAIT_S


def release(domain_uuid: str, links: Sequence[dict[str, object]],
            config: HookConfig | None = None) -> list[str]:
    """The guest stopped: unlink its pool links that libvirt left, mark its pool files dirty
    and start a detached scrub of those pools (forked from the hook with ``config``, else
    ``kvmaccel pool scrub``).  Returns the pool directories touched."""
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
        pid = fork_scrub(pool_dirs, config) if config is not None else spawn_scrub(pool_dirs)
        log.info("scrubbing in the background (pid %d, nice 19)", pid)
    return pool_dirs


SCRUB_NICE = 19


def fork_scrub(pool_dirs: Sequence[str], config: HookConfig) -> int:
    """Scrub ``pool_dirs`` in a child of the hook, detached as ``kvmaccel pool scrub
    --detach`` is (its own session and autogroup, nice 19, the config's cgroup): forked, it
    zeroes within milliseconds of the stop instead of after an interpreter's start (about
    0.3 s at nice 19), which a guest started again at once waits for.  Returns its pid."""
    from .overlap import fork_detached

    def scrub() -> int:
        from ..host.facts import read_host

        if config.cgroup:
            from ..engine.cgroup import enter

            enter(config.cgroup)
        # Every thread of the scrub is at nice 19 in an autogroup of 19, the calling one too:
        # a busy CPU only slows it, never holds up anyone else, so no idle-CPU check (a
        # host busy at the stop would leave it one thread, and a restart waiting for it a
        # second more).
        limits = replace(config.limits, nice=SCRUB_NICE, idle_cpus_only=False)
        host = read_host()
        try:
            for directory in pool_dirs:
                Pool(directory).scrub(host, limits)
        except KeyboardInterrupt:
            log.info("pool: scrub stopped (SIGTERM); the files stay dirty")
            return 1
        return 0

    return fork_detached("kvmaccel-scrub", SCRUB_NICE, scrub)


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
            try:
                got = pool.drain(at_least_bytes=shortfall)
            except UnsafePathError as e:
                refused(e)
                continue
            log.info("pool %s: gave back %d bytes to make room for %s", pool.directory, got,
                     spec.path)
            freed += got
    return freed
