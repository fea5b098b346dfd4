"""What the pool will serve of a planned guest, and the room left on the host after it.

A pool must never be the reason a start fails: before the start, the plan's capacity checks
count only what no pool file serves (:func:`capacity_after_pool`), and where the host is short
for the rest, unused pool files are given back first (:func:`room_for_everything`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import UnsafePathError
from ..host.capacity import capacity_checks
from ..model.units import format_size
from ..pool.discovery import existing_pools
from ..pool.manage import Pool, PoolEntry, PoolKey, reserved_first
from .job import backend_key
from .pool import pool_for, refused

if TYPE_CHECKING:
    from ..host.capacity import CapacityCheck
    from ..host.facts import HostFacts
    from ..plan.config import HookConfig
    from ..plan.planner import DomainPlan

log = logging.getLogger(__name__)


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
    for check in capacity_checks(host, need):
        node, page_kib, short = check.node, check.page_size_kib, check.shortfall_bytes
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
    """Add ``key``'s bytes per node, and to the host-wide total (a check with node None counts
    every node's: :func:`kvmaccel.host.capacity.capacity_checks`)."""
    for node, length in key.node_bytes().items():
        for where in {node, None}:
            totals[(where, key.page_size_kib)] = totals.get((where, key.page_size_kib),
                                                            0) + length
