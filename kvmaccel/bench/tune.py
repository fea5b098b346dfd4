"""``kvmaccel tune``: measure, on each NUMA node, how population throughput grows with threads.

For every node with CPUs, and every page size the host can back guests with (base pages in
a memfd, and each hugetlbfs mount's size that has free pages, in an unlinked ``O_TMPFILE``
on the mount), a scratch backing bound to the node is populated with 1, 2, ... up to the
node's usable CPUs threads.  The calling thread is pinned to the node's CPUs while it
measures, and the engine pins the helpers there, so ``T`` threads means ``T`` CPUs of that
node.  Measurements follow FACTS.md's advice for noisy VMs, like ``kvmaccel bench``: one
untimed warm-up per backing, every count once per round in an order that rotates from round
to round, medians.  Helpers run at nice 0 and whatever the load (the hook's nice-19 and
idle-CPU gate would measure the other tenants, not the memory system).

Scratch sizes: ``size_bytes`` per run when given; by default :data:`DEFAULT_SIZE_BYTES`,
bounded by a quarter of the node's free memory or free huge pages of that size.  A page size
whose bound leaves fewer pages than threads to measure is skipped with a note.  Scratch
memory is never named in the file system: a memfd or an unlinked file, whose pages return
to the host when the run closes it, whatever happens to the process.

See :mod:`kvmaccel.plan.tuning` for the knee, the fingerprint and the state file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.backing import BackingSpec, populate_backings
from ..errors import CapacityError, HostError, UsageError
from ..host.facts import HostFacts, NumaNode, allowed_cpus, read_host
from ..model.units import GIB, align_down, format_size
from ..plan.limits import CHUNKS_PER_THREAD, Limits
from ..plan.tuning import Curve, Fingerprint, Tuning

log = logging.getLogger(__name__)

DEFAULT_SIZE_BYTES = 1 * GIB
DEFAULT_ROUNDS = 5
FREE_SHARE = 4  # the default size uses at most 1/FREE_SHARE of what is free
SLOT_RETRIES = 3

ProgressFn = Callable[[int, int, str], None]
"""``progress(runs_done, runs_total, label)``."""


@dataclass(frozen=True)
class Scratch:
    """One scratch backing to measure on: base pages in a memfd (``mount`` None) or huge
    pages in an unlinked file on ``mount``."""

    node_id: int
    page_size_kib: int
    size_bytes: int
    mount: str | None

    @property
    def backing(self) -> str:
        return "memfd" if self.mount is None else f"hugetlbfs {self.mount}"

    def spec(self) -> BackingSpec:
        if self.mount is None:
            return BackingSpec(None, self.size_bytes, nodes=(self.node_id,),
                               name="kvmaccel-tune")
        return BackingSpec(None, self.size_bytes, nodes=(self.node_id,),
                           tmpfile_dir=self.mount)


def node_cpus(node: NumaNode) -> frozenset[int]:
    """The node's CPUs this process may use."""
    return node.cpus & allowed_cpus()


def plan_scratch(host: HostFacts, node_id: int, threads: int, size_bytes: int | None = None,
                 page_sizes_kib: Sequence[int] | None = None
                 ) -> tuple[list[Scratch], list[str]]:
    """The scratch backings to measure ``threads`` counts on ``node_id``, and a note for
    every page size skipped.  Pure."""
    candidates: list[tuple[int, str | None, int]] = []  # (page KiB, mount, free bytes)

    def free_here(kib: int) -> int:  # on the node, and not more than host-wide
        return min(host.free_bytes(node_id, kib), host.free_bytes(None, kib))

    candidates.append((host.base_page_size_kib, None, free_here(host.base_page_size_kib)))
    seen: set[int] = set()
    for m in host.hugetlbfs_mounts:
        kib = m.page_size_kib
        if not kib or kib in seen:
            continue
        seen.add(kib)
        candidates.append((kib, m.path, free_here(kib)))
    scratch: list[Scratch] = []
    notes: list[str] = []
    for kib, mount, free in candidates:
        if page_sizes_kib is not None and kib not in page_sizes_kib:
            continue
        page = kib * 1024
        pages = format_size(page)
        if size_bytes is None:
            size = align_down(min(max(DEFAULT_SIZE_BYTES, threads * page), free // FREE_SHARE),
                              page)
        else:
            size = align_down(size_bytes, page)
        if size < threads * page:
            why = (f"{format_size(free)} free" if size_bytes is None
                   else f"--size {format_size(size_bytes)}")
            notes.append(f"node {node_id}: {pages} pages skipped: {why} holds fewer than "
                         f"{threads} page(s), one per thread")
            continue
        if size > free:
            notes.append(f"node {node_id}: {pages} pages skipped: {format_size(size)} "
                         f"needed, {format_size(free)} free")
            continue
        scratch.append(Scratch(node_id, kib, size, mount))
    return scratch, notes


def measure_limits(threads: int, size_bytes: int, page_size_bytes: int) -> Limits:
    """Exactly ``threads`` threads on one node: caps lifted, chunks small enough that every
    thread gets work, helpers at nice 0 whatever the load."""
    chunk = max(page_size_bytes,
                align_down(size_bytes // (threads * CHUNKS_PER_THREAD), page_size_bytes))
    return Limits(threads=threads, nice=0, max_helpers_per_node=threads - 1,
                  max_helpers_host=threads - 1, min_chunk_bytes=chunk, idle_cpus_only=False)


def run_scratch(scratch: Scratch, host: HostFacts, threads: int,
                cancel: threading.Event | None = None) -> float:
    """Seconds to populate a fresh ``scratch`` with ``threads`` threads (its memory is freed
    before returning).  Retries when other kvmaccel runs hold host-wide helper slots; raises
    :class:`HostError` when they keep holding them, and the engine's errors otherwise."""
    limits = measure_limits(threads, scratch.size_bytes, scratch.page_size_kib * 1024)
    for attempt in range(SLOT_RETRIES):
        backings, result = populate_backings([scratch.spec()], host, limits, cancel=cancel)
        for b in backings:
            b.close()  # a memfd or an unlinked file: closing frees its pages
        if result.threads == threads:
            return result.seconds
        log.info("ran %d of %d thread(s) (%s); retrying", result.threads, threads,
                 "; ".join(result.reasons))
        time.sleep(0.2 * (attempt + 1))
    raise HostError(f"other kvmaccel runs hold host-wide helper slots: {threads} thread(s) "
                    "could not run; run kvmaccel tune while no guest is starting")


def count_runs(blocks: Sequence[Sequence[int]], rounds: int) -> int:
    """Runs a measurement makes: a warm-up and ``rounds`` per count, for every block."""
    return sum(1 + rounds * len(counts) for counts in blocks)


def measure(host: HostFacts, fingerprint: Fingerprint, *, size_bytes: int | None = None,
            rounds: int = DEFAULT_ROUNDS, nodes: Sequence[int] | None = None,
            max_threads: int | None = None, page_sizes_kib: Sequence[int] | None = None,
            progress: ProgressFn | None = None, cancel: threading.Event | None = None,
            reread_host: Callable[[], HostFacts] = read_host) -> Tuning:
    """Measure every node (or ``nodes``) and return the :class:`Tuning`.

    ``max_threads`` caps the counts measured (default: the node's usable CPUs).
    Raises :class:`UsageError` for a node the host lacks or no page size to measure,
    :class:`CapacityError` when the memory disappears under the run,
    :class:`~kvmaccel.errors.CancelledError` on ``cancel``.
    """
    if rounds < 1:
        raise UsageError(f"rounds must be at least 1, not {rounds}")
    chosen = sorted(nodes) if nodes is not None else sorted(host.nodes)
    missing = [n for n in chosen if n not in host.nodes]
    if missing:
        raise UsageError(f"NUMA node(s) {missing} do not exist; this host has "
                         f"{sorted(host.nodes)}")
    notes: list[str] = []
    blocks: list[tuple[Scratch, list[int], frozenset[int]]] = []
    for n in chosen:
        cpus = node_cpus(host.nodes[n])
        if not cpus:
            notes.append(f"node {n}: no usable CPUs (memory-only, or outside this cpuset)")
            continue
        top = min(len(cpus), max_threads) if max_threads else len(cpus)
        counts = list(range(1, top + 1))
        planned, skipped = plan_scratch(host, n, top, size_bytes, page_sizes_kib)
        notes.extend(skipped)
        blocks.extend((s, counts, cpus) for s in planned)
    if not blocks:
        have = sorted({host.base_page_size_kib} | {m.page_size_kib for m in
                                                   host.hugetlbfs_mounts if m.page_size_kib})
        raise UsageError("nothing to measure: " + ("; ".join(notes) or (
            f"no page size of {list(page_sizes_kib or [])} KiB here; choose from {have} KiB")))
    total = count_runs([counts for _, counts, _ in blocks], rounds)
    done = 0
    started_unix = time.time()
    t_start = time.monotonic()
    curves: list[Curve] = []
    saved_affinity = os.sched_getaffinity(0)
    try:
        for scratch, counts, cpus in blocks:
            label = (f"node {scratch.node_id}, {format_size(scratch.page_size_kib * 1024)} "
                     f"pages")
            os.sched_setaffinity(0, cpus)  # this thread only: the caller works on the node
            current = reread_host()  # free pages move while others run
            run_scratch(scratch, current, counts[-1], cancel)  # warm-up, untimed
            done += 1
            if progress:
                progress(done, total, label)
            times: dict[int, list[float]] = {t: [] for t in counts}
            for r in range(rounds):
                shift = r % len(counts)
                for t in counts[shift:] + counts[:shift]:
                    times[t].append(run_scratch(scratch, current, t, cancel))
                    done += 1
                    if progress:
                        progress(done, total, label)
            curve = Curve(scratch.node_id, scratch.page_size_kib, scratch.backing,
                          scratch.size_bytes, tuple((t, tuple(times[t])) for t in counts))
            log.info("%s: knee at %d thread(s)", label, curve.knee_threads)
            curves.append(curve)
    except CapacityError as e:
        raise CapacityError(f"{e} (while tuning; free memory or pass a smaller --size)",
                            node_id=e.node_id, page_size_kib=e.page_size_kib,
                            needed_bytes=e.needed_bytes, available_bytes=e.available_bytes
                            ) from e
    finally:
        os.sched_setaffinity(0, saved_affinity)
    return Tuning(fingerprint, started_unix, rounds, tuple(curves),
                  time.monotonic() - t_start, tuple(notes))

