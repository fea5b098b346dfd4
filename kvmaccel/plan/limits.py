"""How many helper threads a population job gets, and why.  Pure functions, no I/O.

The rules follow the kernel's ktask proposal:

* the calling thread always works; *helpers* are the extra threads, and caps count helpers;
* no more threads than there are minimum-size chunks of work (``ceil(total / min_chunk)``);
* helpers per node: default 80% of the node's CPUs (at least 1), or the count
  ``kvmaccel tune`` measured on this host (:attr:`Limits.tuned_helpers_per_node`);
* helpers host-wide: default 80% of the online CPUs (at least 1), shared by every kvmaccel
  process on the host (the engine enforces it with lock-file slots);
* a requested thread count (``--threads``, ``<allocation threads='N'/>``) counts the caller.

Both the planner and the engine call :func:`distribute_helpers`, so a plan shows exactly the
helpers a run will start (less any host-wide slots other processes hold at that moment).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError
from ..host.facts import CpuQuota

DEFAULT_MIN_CHUNK_BYTES = 128 << 20
DEFAULT_NICE = 19
CHUNKS_PER_THREAD = 4


def default_cap(cpu_count: int) -> int:
    """80% of ``cpu_count``, rounded down, at least 1 (ktask's default)."""
    return max(1, cpu_count * 4 // 5)


@dataclass(frozen=True)
class Limits:
    """Knobs an operator sets.  ``None`` means the default rule."""

    threads: int | None = None  # total, including the calling thread
    max_helpers_per_node: int | None = None
    max_helpers_host: int | None = None
    nice: int = DEFAULT_NICE
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES
    idle_cpus_only: bool = True  # niced helpers only on CPUs idle when the run starts
    # Per-node default caps measured by `kvmaccel tune`, ((node_id, helpers), ...): they
    # replace the 80% rule on those nodes, and memory bound to no node gets the knees of all
    # nodes together; max_helpers_per_node, when set, wins over both.
    tuned_helpers_per_node: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, not {self.threads}")
        for name in ("max_helpers_per_node", "max_helpers_host"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name.replace('_', '-')} must be 0 or more, not {value}")
        if not -20 <= self.nice <= 19:
            raise UsageError(f"nice must be between -20 and 19, not {self.nice}")
        if self.min_chunk_bytes <= 0:
            raise UsageError("min-chunk must be greater than zero")

    def to_json(self) -> dict[str, object]:
        return {"threads": self.threads, "max_helpers_per_node": self.max_helpers_per_node,
                "max_helpers_host": self.max_helpers_host, "nice": self.nice,
                "min_chunk_bytes": self.min_chunk_bytes, "idle_cpus_only": self.idle_cpus_only,
                "tuned_helpers_per_node": [list(p) for p in self.tuned_helpers_per_node]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Limits:
        """The inverse of :meth:`to_json`.  Raises :class:`ValueError` for a field this
        kvmaccel does not know or of the wrong type (a cache written by another version is
        not trusted); a field missing takes its default."""
        default = cls()
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"limits {sorted(unknown)} unknown to this kvmaccel")

        def number(name: str, fallback: int | None) -> int | None:
            value = data.get(name, fallback)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name}: {value!r} is not an integer")
            return value

        tuned = data.get("tuned_helpers_per_node", [])
        idle = data.get("idle_cpus_only", default.idle_cpus_only)
        if not isinstance(tuned, list) or not isinstance(idle, bool):
            raise ValueError(f"tuned_helpers_per_node {tuned!r} or idle_cpus_only {idle!r}")
        try:
            return cls(number("threads", None), number("max_helpers_per_node", None),
                       number("max_helpers_host", None),
                       number("nice", default.nice) or 0,
                       number("min_chunk_bytes", default.min_chunk_bytes) or 0, idle,
                       tuple((int(n), int(h)) for n, h in tuned))
        except UsageError as e:
            raise ValueError(str(e)) from None


@dataclass(frozen=True)
class HelperPlan:
    """Helpers per node key (a node id, or None for memory with no node), with reasons."""

    helpers_per_node: dict[int | None, int]
    reasons: tuple[str, ...] = field(default=())

    @property
    def helpers(self) -> int:
        return sum(self.helpers_per_node.values())

    @property
    def threads(self) -> int:
        return self.helpers + 1


def _label(node: int | None) -> str:
    return "any node" if node is None else f"node {node}"


def distribute_helpers(
    work_bytes: dict[int | None, int],
    node_cpu_counts: dict[int, int],
    online_cpu_count: int,
    limits: Limits,
    cpu_quota: CpuQuota | None = None,
) -> HelperPlan:
    """Decide how many helpers serve each node's work.

    ``work_bytes`` maps a node id (or None) to the bytes to populate there;
    ``node_cpu_counts`` gives the usable CPUs of each node (allowed CPUs only, so a cgroup
    cpuset counts); ``cpu_quota``, the caller's cgroup CPU quota: threads beyond its whole
    CPUs would only share them, so helpers stop at that many less the caller.
    Returns a :class:`HelperPlan` whose reasons name every rule that cut the count.
    """
    total = sum(work_bytes.values())
    reasons: list[str] = []
    if total <= 0:
        return HelperPlan({node: 0 for node in work_bytes}, ("nothing to populate",))

    chunks = math.ceil(total / limits.min_chunk_bytes)
    wanted = chunks - 1
    if limits.threads is not None and limits.threads - 1 < wanted:
        wanted = limits.threads - 1
        reasons.append(f"{limits.threads} thread(s) requested, the caller included")
    elif limits.threads is not None and limits.threads - 1 > wanted:
        reasons.append(
            f"only {chunks} chunk(s) of at least {limits.min_chunk_bytes >> 20} MiB: "
            f"{chunks} thread(s), not {limits.threads}"
        )
    elif limits.threads is None and chunks - 1 < online_cpu_count:
        reasons.append(f"only {chunks} chunk(s) of at least {limits.min_chunk_bytes >> 20} MiB")

    host_cap = (
        limits.max_helpers_host
        if limits.max_helpers_host is not None
        else default_cap(online_cpu_count)
    )
    if wanted > host_cap:
        source = "configured" if limits.max_helpers_host is not None else (
            f"80% of {online_cpu_count} online CPUs"
        )
        reasons.append(f"host-wide cap {host_cap} helper(s) ({source})")
        wanted = host_cap

    if cpu_quota is not None:
        quota_cap = max(0, math.floor(cpu_quota.cpus + 1e-9) - 1)
        if wanted > quota_cap:
            reasons.append(f"cgroup CPU quota of {cpu_quota.cpus:g} CPU(s) "
                           f"({cpu_quota.source}): {quota_cap} helper(s) beside the caller")
            wanted = quota_cap

    def node_cap(node: int | None) -> int:
        node_chunks = math.ceil(work_bytes[node] / limits.min_chunk_bytes)
        if node is None:
            # Unbound memory may land on any node: the tuned knees of all nodes together
            # (each knee counts the one caller, hence the -1 per node but one).
            return node_chunks if any_node_tuned is None else min(node_chunks, any_node_tuned)
        cpus = node_cpu_counts.get(node, 0)
        if limits.max_helpers_per_node is not None:
            cap = limits.max_helpers_per_node
        elif node in tuned:
            cap = min(tuned[node], cpus)
        else:
            cap = default_cap(cpus)
        return min(cap, node_chunks)

    tuned = dict(limits.tuned_helpers_per_node)
    any_node_tuned = (sum(h + 1 for h in tuned.values()) - 1
                      if tuned and limits.max_helpers_per_node is None else None)
    caps = {node: node_cap(node) for node in work_bytes}
    helpers = {node: 0 for node in work_bytes}
    # Hand out helpers one at a time to the node with the most work per thread (its own
    # helpers plus a share of the caller), so helpers follow the work.
    for _ in range(wanted):
        open_nodes = [n for n in work_bytes if helpers[n] < caps[n] and work_bytes[n] > 0]
        if not open_nodes:
            break
        best = max(open_nodes, key=lambda n: work_bytes[n] / (helpers[n] + 1))
        helpers[best] += 1
    for node in sorted(work_bytes, key=lambda n: (n is None, n or 0)):
        if helpers[node] == caps[node] and node is not None and work_bytes[node] > 0:
            if limits.max_helpers_per_node is not None:
                per_node = f"configured {limits.max_helpers_per_node}"
            elif node in tuned:
                per_node = "measured by kvmaccel tune"
            else:
                per_node = f"80% of {node_cpu_counts.get(node, 0)} CPU(s)"
            if caps[node] < wanted:
                reasons.append(f"{_label(node)}: per-node cap {caps[node]} ({per_node})")
        elif (node is None and any_node_tuned is not None and work_bytes[node] > 0
              and helpers[node] == caps[node] == any_node_tuned < wanted):
            reasons.append(f"any node: cap {any_node_tuned} (the knees of all nodes, measured "
                           "by kvmaccel tune)")
    return HelperPlan(helpers, tuple(reasons))


def chunk_size_bytes(total_bytes: int, threads: int, page_size_bytes: int,
                     min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES) -> int:
    """ktask's chunk size: about 4 chunks per thread, never below ``min_chunk_bytes``,
    a multiple of ``page_size_bytes``."""
    size = max(math.ceil(total_bytes / (threads * CHUNKS_PER_THREAD)), min_chunk_bytes)
    return -(-size // page_size_bytes) * page_size_bytes


def split_across_nodes(size_bytes: int, nodes: Sequence[int], page_size_bytes: int
                       ) -> list[tuple[int | None, int, int]]:
    """Split ``size_bytes`` into one contiguous ``(node, offset_bytes, length_bytes)`` part per
    node, each a whole number of pages, the remainder pages going to the first nodes.  No
    nodes: one part for any node.  The planner and the engine both split with this."""
    if not nodes:
        return [(None, 0, size_bytes)]
    per_node, extra = divmod(size_bytes // page_size_bytes, len(nodes))
    parts: list[tuple[int | None, int, int]] = []
    offset = 0
    for i, node in enumerate(nodes):
        length = (per_node + (1 if i < extra else 0)) * page_size_bytes
        parts.append((node, offset, length))
        offset += length
    return parts
