"""Capacity: what a set of (node, page size, bytes) needs against what is free, with reasons.

The one free-memory rule is :meth:`~kvmaccel.host.facts.HostFacts.free_bytes`; this is the one
check on it, for the planner, the engine, the pool keeper's callers, the start path and the
benches.  Needs are keyed ``(node, page KiB)``, node None for memory that may come from any
node.  Each key is checked against what is free there, and, for every page size with memory
bound to a node, the total of that size against what is free host-wide (a row with node None):
a node's ``free_hugepages`` does not count the pages promised to mappings that exist
(``resv_hugepages``, host-wide only), so nodes that each have room can still be short together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import CapacityError
from ..model.units import format_size
from .facts import HostFacts

Needs = Mapping[tuple[int | None, int], int]
"""Bytes needed per ``(node or None, page size in KiB)``."""


@dataclass(frozen=True)
class CapacityCheck:
    """Bytes one node (None: host-wide) must supply in one page size, against what it has.
    ``huge``: of huge pages; ``pool_pages``: then the pool's ``nr_hugepages`` there (for the
    command that reserves more)."""

    node: int | None
    page_size_kib: int
    needed_bytes: int
    available_bytes: int
    source: str
    huge: bool = False
    pool_pages: int = 0

    @property
    def ok(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.needed_bytes - self.available_bytes)

    def remedy(self) -> str:
        """What to do when the check fails: the command that reserves the missing huge pages,
        or to free memory."""
        if not self.huge:
            where = "" if self.node is None else f" on node {self.node}"
            return f"free memory{where} or ask for less"
        page = self.page_size_kib * 1024
        target = (self.pool_pages + math.ceil(self.needed_bytes / page)
                  - self.available_bytes // page)
        sysfs = ("/sys/kernel/mm/hugepages" if self.node is None
                 else f"/sys/devices/system/node/node{self.node}/hugepages")
        return (f"reserve more huge pages: echo {target} > "
                f"{sysfs}/hugepages-{self.page_size_kib}kB/nr_hugepages")

    def reason(self, who: str = "") -> str:
        """One line: who needs what of which pages where, what is free (and by which count),
        and what to do."""
        where = "host-wide" if self.node is None else f"on node {self.node}"
        return (f"{f'{who} needs' if who else 'need'} {format_size(self.needed_bytes)} of "
                f"{format_size(self.page_size_kib * 1024)} pages {where} but only "
                f"{format_size(self.available_bytes)} is free ({self.source}); {self.remedy()}")

    def error(self, who: str = "", hint: str = "") -> CapacityError:
        """:class:`CapacityError` with :meth:`reason` (and ``hint`` after it) and the numbers."""
        return CapacityError(self.reason(who) + (f"; {hint}" if hint else ""),
                             node_id=self.node, page_size_kib=self.page_size_kib,
                             needed_bytes=self.needed_bytes,
                             available_bytes=self.available_bytes)


def free_source(host: HostFacts, node: int | None, page_kib: int) -> str:
    """What :meth:`HostFacts.free_bytes` counts for ``(node, page_kib)``, in words."""
    if page_kib == host.base_page_size_kib:
        return "MemAvailable" if node is None else f"MemFree of node {node}"
    if node is None:
        return f"free_hugepages - resv_hugepages ({page_kib} kB), host-wide"
    return f"free_hugepages ({page_kib} kB) of node {node}"


def check(host: HostFacts, node: int | None, page_kib: int, needed_bytes: int
          ) -> CapacityCheck:
    """``needed_bytes`` of ``page_kib`` pages on ``node`` (None: host-wide) against what is
    free there now.  A node this host does not have has nothing free."""
    known = node is None or node in host.nodes
    available = host.free_bytes(node, page_kib) if known else 0
    huge = page_kib != host.base_page_size_kib
    pool_pages = 0
    if huge:
        pools = host.hugepages if node is None else (
            host.nodes[node].hugepages if node in host.nodes else {})
        pool = pools.get(page_kib)
        pool_pages = pool.nr_pages if pool else 0
    return CapacityCheck(node, page_kib, needed_bytes, available,
                         free_source(host, node, page_kib), huge, pool_pages)


def _order(key: tuple[int | None, int]) -> tuple[bool, int, int]:
    return (key[0] is None, key[0] or 0, key[1])


def capacity_checks(host: HostFacts, needs: Needs) -> tuple[CapacityCheck, ...]:
    """One check per key of ``needs`` (zero needs left out), and for each page size with
    memory bound to a node, its total against what is free host-wide; by node (host-wide
    last), then page size."""
    totals: dict[tuple[int | None, int], int] = {}
    for (node, page_kib), size in needs.items():
        if size <= 0:
            continue
        totals[(node, page_kib)] = totals.get((node, page_kib), 0) + size
    bound: dict[int, int] = {}  # page KiB -> bytes bound to some node
    for (node, page_kib), size in totals.items():
        if node is not None:
            bound[page_kib] = bound.get(page_kib, 0) + size
    for page_kib, size in bound.items():
        totals[(None, page_kib)] = totals.get((None, page_kib), 0) + size
    return tuple(check(host, node, page_kib, size)
                 for (node, page_kib), size in sorted(totals.items(),
                                                      key=lambda kv: _order(kv[0])))


def first_short(checks: Iterable[CapacityCheck]) -> CapacityCheck | None:
    """The first check that fails, in :func:`capacity_checks`' order (a node's before the
    host-wide total: the more telling of two, and raising a node's pool raises the host's);
    None when all pass."""
    return next((c for c in checks if not c.ok), None)


def require(checks: Iterable[CapacityCheck], who: str = "", hint: str = "") -> None:
    """Raise :class:`CapacityError` for :func:`first_short` of ``checks``, if any."""
    short = first_short(checks)
    if short is not None:
        raise short.error(who, hint)
