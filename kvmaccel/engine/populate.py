"""The populate engine: kvmaccel's user-space ktask.

This is the only code that maps guest memory, starts helper threads and sets their affinity,
niceness and memory policy.  One call, :func:`populate`, takes a list of :class:`WorkItem`
(a range of an open backing, and the NUMA node it belongs on or ``None`` for any) and faults
in and zeroes every page of them.

How it runs, and why (docs/facts.md has the measurements):

1. *Map everything first, bind it, then start the helpers.*  Creating a thread maps its stack
   and ``mbind`` splits VMAs: both take ``mmap_lock`` for write, and a writer waits for every
   ``MADV_POPULATE_WRITE`` in flight.  So all mappings and ``mbind`` calls happen before any
   helper starts, every helper is started before any thread populates, and they are released
   together by a barrier.  Nothing is mapped or unmapped until every helper has finished.
2. *Populate through libc's madvise via ctypes.*  ctypes drops the GIL for the call, so the
   threads really run in parallel (``mmap.mmap.madvise`` holds the GIL).  A kernel that answers
   ``EINVAL`` (before Linux 5.14) gets the touch fallback, one byte per page.
3. *Load-balance, as ktask.*  The work is split into chunks of about a quarter of a thread's
   share (never below ``min_chunk_bytes``, page aligned) and queued per node.  Helpers are
   pinned to their node's CPUs (within the allowed set), pull from their node's queue and,
   once it is dry, steal from other nodes' queues.  The calling thread works too, from any
   queue.
4. *Helpers are niced, the caller is not, and there is no priority inversion.*  Helpers run
   at ``nice`` (19 by default) so a busy host's own work barely notices them.  When the caller
   runs out of queued chunks it does not simply wait: as ktask's ``flush_work_at_nice`` it
   takes the unclaimed remainder of every chunk still held by a helper, step by step, and
   lends its own priority to each helper still inside a step until it returns.
5. *Stop promptly.*  The first error, or a cancel (signal), stops every thread at its next
   step (at most ``STEP_BYTES``).  Callers undo what they created; the engine itself creates
   no files.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import CancelledError, CapacityError, PopulateError
from ..host import sysmem
from ..host.facts import HostFacts, allowed_cpus, runnable_tasks
from ..model.units import GIB, format_size
from ..plan.limits import HelperPlan, Limits, chunk_size_bytes, distribute_helpers
from .slots import HostSlots

log = logging.getLogger(__name__)

STEP_BYTES = 64 << 20
"""The most one madvise call covers: bounds how long a stop or a priority hand-off waits."""

ProgressFn = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called from the calling thread."""


@dataclass(frozen=True)
class WorkItem:
    """``length_bytes`` of ``fd`` from ``offset_bytes``, to be populated on ``node_id``.

    ``node_id`` None means any node (no binding, helpers unpinned).  ``policy`` is the
    memory policy for the range when a node is given (``bind`` or ``preferred``).
    Offset and length must be multiples of ``page_size_bytes``.
    """

    fd: int
    offset_bytes: int
    length_bytes: int
    page_size_bytes: int
    node_id: int | None = None
    policy: str = "bind"
    label: str = ""


@dataclass(frozen=True)
class PopulateResult:
    bytes_total: int
    seconds: float
    threads: int
    helpers_per_node: dict[int | None, int]
    bytes_per_node: dict[int | None, int]
    bytes_by_caller: int
    chunks: int
    chunk_size_bytes: int
    method: str  # "madvise" or "touch"
    reasons: tuple[str, ...] = field(default=())
    # What was populated, per kind of memory: ("hugetlbfs", page_size_kib, bytes); filled in
    # by kvmaccel.engine.backing, which knows the files (the engine sees only descriptors).
    memory: tuple[tuple[str, int, int], ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def memory_text(self) -> str:
        """``hugetlbfs 2M``, ``tmpfs 4K``, or several joined by ``+``; ``""`` when unknown."""
        return " + ".join(f"{fs} {format_size(kib * 1024)}" for fs, kib, _ in self.memory)

    @property
    def gib_per_s(self) -> float:
        return self.bytes_total / GIB / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        def key(node: int | None) -> str:
            return "any" if node is None else str(node)

        return {
            "bytes": self.bytes_total,
            "seconds": round(self.seconds, 4),
            "gib_per_s": round(self.gib_per_s, 3),
            "threads": self.threads,
            "helpers_per_node": {key(n): c for n, c in self.helpers_per_node.items()},
            "bytes_per_node": {key(n): c for n, c in self.bytes_per_node.items()},
            "bytes_by_caller": self.bytes_by_caller,
            "chunks": self.chunks,
            "chunk_size_bytes": self.chunk_size_bytes,
            "method": self.method,
            "reasons": list(self.reasons),
            "memory": self.memory_text,
            "filesystems": [{"filesystem": fs, "page_size_kib": kib, "bytes": n}
                            for fs, kib, n in self.memory],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class EngineOps:
    """The system primitives the engine uses.  Tests replace one where this machine cannot do
    the real thing (binding memory to a node that only exists in a fake two-node /sys)."""

    populate: Callable[[int, int], None] = lambda addr, length: sysmem.madvise(
        addr, length, sysmem.MADV_POPULATE_WRITE)
    touch: Callable[[int, int, int], None] = sysmem.touch_pages
    # Looked up at each call, so that a test can bind through a wrong mbind (tests/numa).
    bind: Callable[[int, int, str, frozenset[int]], None] = (
        lambda addr, length, policy, nodes: sysmem.mbind(addr, length, policy, nodes))
    pin: Callable[[frozenset[int]], None] = lambda cpus: os.sched_setaffinity(0, cpus)


class _Chunk:
    """A contiguous piece of one mapping; anyone may claim its next step."""

    __slots__ = ("addr", "end", "node_id", "page_size", "cursor", "lock", "owner_tid")

    def __init__(self, addr: int, length: int, node_id: int | None, page_size: int) -> None:
        self.addr = addr
        self.end = addr + length
        self.node_id = node_id
        self.page_size = page_size
        self.cursor = addr
        self.lock = threading.Lock()
        self.owner_tid = 0

    def claim(self) -> tuple[int, int] | None:
        step = max(STEP_BYTES // self.page_size, 1) * self.page_size
        with self.lock:
            if self.cursor >= self.end:
                return None
            start = self.cursor
            self.cursor = min(self.end, start + step)
            return start, self.cursor - start


class _Run:
    """State shared by the threads of one populate call."""

    def __init__(self, chunks: list[_Chunk], ops: EngineOps, cancel: threading.Event) -> None:
        self.queues: dict[int | None, collections.deque[_Chunk]] = collections.defaultdict(
            collections.deque)
        for chunk in chunks:
            self.queues[chunk.node_id].append(chunk)
        self.lock = threading.Lock()
        self.inflight: set[_Chunk] = set()  # chunks a helper holds (the caller may help)
        self.helper_tids: set[int] = set()  # helpers that have not exited yet
        self.ops = ops
        self.cancel = cancel
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.method = "madvise"
        self.done: dict[int | None, int] = collections.defaultdict(int)
        self.done_by_caller = 0

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def stopped(self) -> bool:
        return self.stop.is_set() or self.cancel.is_set()

    def take(self, home: int | None, caller: bool) -> _Chunk | None:
        """Next chunk: the home node's queue first, then the fullest other queue."""
        with self.lock:
            queue = self.queues.get(home)
            if not queue or caller:
                candidates = [q for q in self.queues.values() if q]
                queue = max(candidates, key=len) if candidates else None
            if not queue:
                return None
            chunk = queue.popleft()
            if not caller:
                self.inflight.add(chunk)
            return chunk

    def work_step(self, addr: int, length: int, chunk: _Chunk) -> None:
        if self.method == "madvise":
            try:
                self.ops.populate(addr, length)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.info("MADV_POPULATE_WRITE unsupported (EINVAL): touching pages instead")
                self.method = "touch"
        if self.method == "touch":
            self.ops.touch(addr, length, chunk.page_size)

    def run_chunk(self, chunk: _Chunk, caller: bool,
                  after_step: Callable[[], None] | None = None) -> None:
        """Claim and populate ``chunk``'s steps until none is left (or the run stops); a
        helper then drops the chunk from :attr:`inflight`."""
        while not self.stopped():
            claimed = chunk.claim()
            if claimed is None:
                break
            addr, length = claimed
            self.work_step(addr, length, chunk)
            with self.lock:
                self.done[chunk.node_id] += length
                if caller:
                    self.done_by_caller += length
            if after_step:
                after_step()
        if not caller:
            with self.lock:
                self.inflight.discard(chunk)


def _translate(exc: OSError, page_size: int) -> Exception:
    # 133 is EHWPOISON, which Python's errno module lacks.
    if exc.errno in (errno.ENOMEM, errno.EFAULT, 133):
        return CapacityError(
            f"the kernel could not allocate a {page_size >> 10} KiB page while populating "
            f"({errno.errorcode.get(exc.errno or 0, exc.errno)}); free memory or reserve more "
            "huge pages and retry"
        )
    return PopulateError(f"populating failed: {exc.strerror or exc}")


def _helper_cpus(node: int | None, host: HostFacts, allowed: frozenset[int]) -> frozenset[int]:
    if node is None or node not in host.nodes:
        return allowed
    return (host.nodes[node].cpus & allowed) or allowed


def idle_cpus(host: HostFacts, samples: int = 3) -> int:
    """CPUs (of those this process may use) with nothing runnable on them, beyond the one
    the calling thread runs on: the best of a few instant readings, 1 ms apart.

    Why it matters: a helper at nice 19 only gets CPU time nobody else wants.  On a busy
    host it barely runs, and on hugetlbfs it then holds the caller up: a huge page fault
    zeroes the page under a hashed fault mutex (``hugetlb_fault_mutex_table``), yielding the
    CPU while holding it, so a caller faulting a page of the same hash bucket waits for the
    starved helper.  Measured here with a CPU-bound load on both CPUs: 2 GiB went from
    0.5 s (caller alone) to 4.6 s with one nice-19 helper.
    """
    cpus = len(host.online_cpus & allowed_cpus())
    running = runnable_tasks()
    for _ in range(samples - 1):
        time.sleep(0.001)
        running = min(running, runnable_tasks())
    return max(0, cpus - running)


def plan_helpers(items: Sequence[WorkItem], host: HostFacts, limits: Limits) -> HelperPlan:
    """The helpers :func:`populate` would start for ``items`` (before host-wide slots)."""
    allowed = allowed_cpus()
    work: dict[int | None, int] = collections.defaultdict(int)
    for item in items:
        work[item.node_id] += item.length_bytes
    node_cpus = {n: len(node.cpus & allowed) for n, node in host.nodes.items()}
    return distribute_helpers(dict(work), node_cpus, len(host.online_cpus & allowed), limits,
                              host.cpu_quota)


def populate(
    items: Sequence[WorkItem],
    host: HostFacts,
    limits: Limits | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    ops: EngineOps | None = None,
    slots: HostSlots | None = None,
) -> PopulateResult:
    """Fault in and zero every page of ``items``; return what was done.

    Raises :class:`CapacityError` when the kernel runs out of pages, :class:`PopulateError`
    for any other failure, :class:`CancelledError` when ``cancel`` is set.  On any exception
    every helper has stopped and every mapping is gone before it propagates.
    """
    limits = limits or Limits()
    ops = ops or EngineOps()
    cancel = cancel or threading.Event()
    for item in items:
        if item.offset_bytes % item.page_size_bytes or item.length_bytes % item.page_size_bytes:
            raise PopulateError(
                f"{item.label or 'range'} is not a multiple of its {item.page_size_bytes} byte "
                "pages; round the size up to a whole page")
    total = sum(item.length_bytes for item in items)
    plan = plan_helpers(items, host, limits)
    reasons = list(plan.reasons)
    helpers = dict(plan.helpers_per_node)
    caller_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if limits.idle_cpus_only and limits.nice > caller_nice and plan.helpers:
        idle = idle_cpus(host)
        if idle < plan.helpers:
            reasons.append(
                f"host busy: {idle} idle CPU(s) for helpers at nice {limits.nice} "
                f"(a starved helper would hold the caller up)")
            while sum(helpers.values()) > idle:
                helpers[max(helpers, key=lambda n: helpers[n])] -= 1
    own_slots = slots is None
    slots = slots or HostSlots(
        limits.max_helpers_host if limits.max_helpers_host is not None
        else max(1, len(host.online_cpus) * 4 // 5))
    wanted = sum(helpers.values())
    got = slots.acquire(wanted)
    if got < wanted:
        reasons.append(f"other kvmaccel runs hold host-wide slots: {got} of {wanted} "
                       "helper(s) available")
        while sum(helpers.values()) > got:
            busiest = max(helpers, key=lambda n: helpers[n])
            helpers[busiest] -= 1
    threads = sum(helpers.values()) + 1
    page_max = max((item.page_size_bytes for item in items), default=4096)
    chunk_bytes = chunk_size_bytes(total, threads, page_max, limits.min_chunk_bytes)

    mappings: list[tuple[int, int]] = []
    started: list[threading.Thread] = []
    run: _Run | None = None
    barrier = threading.Barrier(threads)
    t0 = time.monotonic()
    try:
        chunks: list[_Chunk] = []
        for item in items:  # 1. map and bind everything before any thread starts
            if item.length_bytes == 0:
                continue
            try:
                addr = sysmem.mmap_shared(item.fd, item.length_bytes, item.offset_bytes)
                mappings.append((addr, item.length_bytes))
                if item.node_id is not None:
                    ops.bind(addr, item.length_bytes, item.policy, frozenset({item.node_id}))
            except OSError as e:
                raise _translate(e, item.page_size_bytes) from e
            step = max(chunk_bytes // item.page_size_bytes, 1) * item.page_size_bytes
            for off in range(0, item.length_bytes, step):
                chunks.append(_Chunk(addr + off, min(step, item.length_bytes - off),
                                     item.node_id, item.page_size_bytes))
        run = _Run(chunks, ops, cancel)
        allowed = allowed_cpus()

        def helper(node: int | None, index: int) -> None:
            assert run is not None
            tid = threading.get_native_id()
            with run.lock:
                run.helper_tids.add(tid)
            try:
                try:
                    sysmem.set_thread_name(f"kvmaccel-{'a' if node is None else node}-{index}")
                    ops.pin(_helper_cpus(node, host, allowed))
                finally:
                    barrier.wait()
                # Nice only after the barrier: a helper niced before it could be starved on a
                # busy host for a long time, and the caller would wait for it at the barrier.
                os.setpriority(os.PRIO_PROCESS, tid, limits.nice)
                while not run.stopped():
                    chunk = run.take(node, caller=False)
                    if chunk is None:
                        break
                    run.run_chunk(chunk, caller=False)
            except threading.BrokenBarrierError:
                pass
            except OSError as e:
                run.fail(_translate(e, page_max))
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                run.fail(e)
            finally:
                with run.lock:
                    run.helper_tids.discard(tid)

        for node, count in sorted(helpers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            for index in range(count):  # 2. start every helper before anyone populates
                thread = threading.Thread(target=helper, args=(node, index), daemon=True,
                                          name=f"kvmaccel-{node}-{index}")
                thread.start()
                started.append(thread)
        barrier.wait()
        t0 = time.monotonic()
        _caller_loop(run, progress, total, caller_nice)
    except BaseException:
        if run is not None:
            run.stop.set()
        barrier.abort()  # a helper still waiting to start must not wait forever
        raise
    finally:
        for thread in started:
            thread.join()
        for addr, length in mappings:  # 5. unmap only after every helper is gone
            sysmem.munmap(addr, length)
        if own_slots:
            slots.release()
    seconds = time.monotonic() - t0
    if run.error is not None:
        if isinstance(run.error, OSError):
            raise _translate(run.error, page_max) from run.error
        raise run.error
    if cancel.is_set():
        raise CancelledError("population cancelled; what this run created is removed")
    if progress:
        progress(total, total)
    log.debug("populated %d bytes in %.3f s with %d thread(s)", total, seconds, threads)
    return PopulateResult(
        bytes_total=total, seconds=seconds, threads=threads, helpers_per_node=helpers,
        bytes_per_node=dict(run.done), bytes_by_caller=run.done_by_caller,
        chunks=len(chunks), chunk_size_bytes=chunk_bytes, method=run.method,
        reasons=tuple(reasons),
    )


def _caller_loop(run: _Run, progress: ProgressFn | None, total: int, caller_nice: int
                 ) -> None:
    """The calling thread's share: queued chunks, then helpers' leftovers, then waiting."""
    last_report = 0.0
    t_start = time.monotonic()

    def report() -> None:
        nonlocal last_report
        now = time.monotonic()
        if progress and now - last_report >= 0.1:
            last_report = now
            progress(sum(run.done.values()), total)

    try:
        while not run.stopped():
            chunk = run.take(None, caller=True)
            if chunk is None:
                break
            run.run_chunk(chunk, caller=True, after_step=report)
        t_queues = time.monotonic()
        # flush_work_at_nice: take what the (niced) helpers have not started yet ...
        while not run.stopped():
            with run.lock:
                pending = [c for c in run.inflight if c.cursor < c.end]
            if not pending:
                break
            for chunk in pending:
                run.run_chunk(chunk, caller=True, after_step=report)
        t_flush = time.monotonic()
        # ... and lend our priority to every helper until it has finished: one still inside
        # its last step, and one that must wake up only to find nothing left and exit.
        boosted: set[int] = set()
        while True:
            with run.lock:
                alive = set(run.helper_tids)
            if not alive:
                break
            for tid in alive - boosted:
                with contextlib.suppress(PermissionError, ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, tid, caller_nice)
                boosted.add(tid)
            report()
            time.sleep(0.002)
        log.debug("caller: queues dry at %.3f s, helpers' chunks taken %.3f s later, helpers "
                  "gone %.3f s after that", t_queues - t_start, t_flush - t_queues,
                  time.monotonic() - t_flush)
    except OSError as e:
        run.fail(e)
    except BaseException as e:
        run.fail(e)
        raise


def describe_helpers(result: PopulateResult) -> str:
    """``node 0: 3, node 1: 3`` for logs."""
    parts = []
    for node, count in sorted(result.helpers_per_node.items(),
                              key=lambda kv: (kv[0] is None, kv[0] or 0)):
        parts.append(f"{'any node' if node is None else f'node {node}'}: {count}")
    return ", ".join(parts) or "none"


