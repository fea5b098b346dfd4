"""A fresh start overlapped with QEMU's own preallocation.

When no pool file serves a backend, populating it before QEMU starts puts the whole populate
on the start path, and QEMU's own preallocation (huge pages, ``<allocation
mode='immediate'/>``) walks the file again afterwards.  For a backend QEMU preallocates
itself, the hook instead creates the file, names it at once, and leaves a detached *filler*
(a forked child of the hook, in its own session, stdio closed so libvirt does not wait for
it) populating it with the engine while libvirt execs QEMU and QEMU preallocates the same
file.  Every page the filler reaches first is a page QEMU only maps, and the other way round.

Why this is safe, and what the tests check (``tests/test_hook_overlap.py``):

* *The filler never writes a byte.*  It populates with ``MADV_POPULATE_WRITE`` only, which
  faults a page in (allocating and zeroing it when absent) without touching the contents of
  a page that is there; the engine's touch fallback, which does write, is refused here
  (:func:`no_touch`).  So a page the guest has written is never changed, however late the
  filler reaches it.
* *A page is zeroed once.*  Two faults on the same page of one file, from QEMU and from the
  filler, are serialised by the kernel (the hugetlb fault mutex, the shmem folio lock): the
  second finds the first's page in the page cache and maps it.
* *The guest never runs before its memory is ready*: QEMU's preallocation of the backend
  runs while QEMU creates the object, before any vCPU exists, and a failure there stops QEMU.
  The filler only shortens it.  A backend QEMU does not preallocate is populated before QEMU
  starts, as before (:func:`why_not`).
* *Placement*: the filler binds every range to the backend's nodes before it faults, as the
  engine always does, and QEMU binds its mapping to the same host-nodes.
* *It stops for good once QEMU's preallocation is done* (:mod:`kvmaccel.serve.filler` says
  why a range faulted in after that can break a guest): it leaves alone every file it has
  once seen allocated whole (:class:`Complete`), and ``started begin`` kills it.
* *Its own cgroup from the start*: the hook moves it into the config's ``cgroup`` before it
  runs an instruction (:func:`fork_detached`), and it sizes its helpers from there.
* *Lifetime*: the filler's pid and start time are in the guest's state; ``started``,
  ``stopped`` and ``release`` stop it (:func:`kvmaccel.serve.filler.stop_filler`) before
  the files are released or scrubbed, and it exits by itself when done, or after
  ``populate_timeout_s``.

Order: QEMU splits a backend into ``T`` contiguous parts, one per preallocation thread, each
walked upwards from its start.  The filler walks each part from its end downwards, the parts
taken in turn, so both meet inside every part and rarely fault the same page.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..engine import records
from ..errors import KvmaccelError, ProcessGoneError
from ..host import proc, process, sysmem
from ..model.units import format_size
from .filler import stop_filler, write_record
from .state import FillerRef

if TYPE_CHECKING:
    from ..engine.backing import Backing
    from ..engine.populate import WorkItem
    from ..host.facts import HostFacts
    from ..plan.config import HookConfig
    from ..plan.limits import Limits

log = logging.getLogger(__name__)

PIECE_BYTES = 64 << 20
"""The filler's unit of work: QEMU's own preallocation gives a thread at least 64 MiB."""
QEMU_MAX_THREADS = 16


def has_populate_write() -> bool:
    """True when this kernel has ``MADV_POPULATE_WRITE`` (Linux 5.14), tried on one page."""
    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        import ctypes

        c = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(c)
        del c
        sysmem.madvise(addr, mmap.PAGESIZE, sysmem.MADV_POPULATE_WRITE)
        return True
    except OSError:
        return False
    finally:
        m.close()


def why_not(prealloc: Sequence[bool], config: HookConfig) -> str | None:
    """Why a fresh start of these backends (QEMU preallocates each one or not) cannot overlap
    QEMU's start; None when it can."""
    if not config.overlap:
        return "overlap = false in the config"
    if not all(prealloc):
        return ("QEMU does not preallocate every backend (no huge pages and no <allocation "
                "mode='immediate'/>), so nothing would make the memory ready before the guest "
                "runs")
    if not has_populate_write():
        return "this kernel lacks MADV_POPULATE_WRITE (Linux 5.14)"
    return None


def qemu_threads(size_bytes: int, prealloc_threads: int | None, online_cpus: int) -> int:
    """How many threads QEMU preallocates ``size_bytes`` with: its ``prealloc-threads`` (1 when
    unset), at most the online CPUs, 16, and one per 64 MiB."""
    wanted = max(1, prealloc_threads or 1)
    return max(1, min(wanted, online_cpus, QEMU_MAX_THREADS, size_bytes // PIECE_BYTES or 1))


def against_qemu(backing: Backing, threads: int) -> list[WorkItem]:
    """The backing's work as pieces of at most :data:`PIECE_BYTES`, each within one node's
    part, ordered so the filler meets QEMU's ``threads`` halfway: every QEMU part from its
    end down, the parts in turn."""
    from ..engine.populate import WorkItem

    page = backing.page_size_bytes
    size = backing.spec.size_bytes
    pages = size // page
    per, extra = divmod(pages, threads)
    starts, offset = [], 0
    for i in range(threads):  # QEMU's static split: the first parts get the extra pages
        starts.append(offset)
        offset += (per + (1 if i < extra else 0)) * page
    bounds = [*starts, size]
    node_parts = [(item.node_id, item.offset_bytes, item.offset_bytes + item.length_bytes)
                  for item in backing.work_items()]
    piece = max(PIECE_BYTES // page, 1) * page
    lanes: list[list[WorkItem]] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        lane: list[WorkItem] = []
        for node, n_lo, n_hi in reversed(node_parts):
            top, bottom = min(hi, n_hi), max(lo, n_lo)
            while top > bottom:
                start = max(bottom, top - piece)
                lane.append(WorkItem(backing.fd, start, top - start, page, node,
                                     backing.spec.policy, backing.spec.label))
                top = start
        lanes.append(lane)
    ordered = []
    for i in range(max((len(lane) for lane in lanes), default=0)):
        ordered += [lane[i] for lane in lanes if i < len(lane)]
    return ordered


def no_touch(addr: int, length: int, page_size: int) -> None:
    """The engine's fallback writes a byte per page: never beside a running QEMU."""
    raise OSError(0, "MADV_POPULATE_WRITE refused; the filler never writes to guest memory")


def start_filler(backings: Sequence[Backing], threads: Sequence[int], host: HostFacts,
                 limits: Limits, config: HookConfig, domain: str, key: str) -> FillerRef:
    """Fork the filler for ``backings`` (named, sized, owned: QEMU may open them from now on),
    record it for ``started begin`` (:func:`kvmaccel.libvirt.started.stop_at_started`) and
    return what :func:`~kvmaccel.serve.filler.stop_filler` needs to find it again: its pid
    and start time.  The filler runs in the config's cgroup from its first instruction on
    (:func:`fork_detached`)."""
    items = [item for backing, t in zip(backings, threads, strict=True)
             for item in against_qemu(backing, t)]
    # Only the CPU QEMU's start leaves idle: every thread at the helpers' nice.
    pid = fork_detached("kvmaccel-fill", limits.nice,
                        lambda: _fill(backings, items, host, limits, config, domain),
                        cgroup=config.cgroup)
    try:
        ticks = proc.start_ticks(pid)
    except ProcessGoneError:  # our child, a zombie until reaped: only if SIGCHLD is ignored
        ticks = 0
    filler = FillerRef(pid, ticks)
    try:
        write_record(key, filler)
    except BaseException:
        stop_filler(filler, at_once=True)  # the start fails open: its files go
        raise
    return filler


class Complete:
    """Which of the filler's files have been allocated whole, by QEMU's preallocation or the
    filler: the filler leaves each of those alone for good (the module docstring of
    :mod:`kvmaccel.serve.filler` says why).  :meth:`populate` stands in for the engine's
    ``MADV_POPULATE_WRITE`` step (``EngineOps.populate``): before each step it looks at
    every file not yet seen whole, then skips the step if its own file was.

    A file is whole when its allocated blocks (``st_blocks``, which hugetlbfs and tmpfs
    count per page allocated and uncount per page punched out) cover its size.  The step's
    file is found by address in ``/proc/self/maps``, read once at the first step (the engine
    maps every range before any thread populates)."""

    def __init__(self, backings: Sequence[Backing]) -> None:
        self.backings = list(backings)
        self.whole = [False] * len(self.backings)
        self.skipped_bytes = 0
        self._lock = threading.Lock()
        self._ranges: list[tuple[int, int, int]] | None = None

    def populate(self, addr: int, length: int) -> None:
        index = self._which(addr)
        self._look()
        if self.whole[index] if index is not None else any(self.whole):
            with self._lock:
                self.skipped_bytes += length
            return
        sysmem.madvise(addr, length, sysmem.MADV_POPULATE_WRITE)

    def _look(self) -> None:
        for i, b in enumerate(self.backings):
            if self.whole[i] or os.fstat(b.fd).st_blocks * 512 < b.spec.size_bytes:
                continue
            with self._lock:
                if not self.whole[i]:
                    self.whole[i] = True
                    log.info("%s is allocated whole (QEMU's preallocation is done, or the "
                             "filler's): the filler leaves it alone for good", b.path)

    def _which(self, addr: int) -> int | None:
        with self._lock:
            if self._ranges is None:
                self._ranges = _mapped(self.backings)
            ranges = self._ranges
        return next((i for lo, hi, i in ranges if lo <= addr < hi), None)


def _mapped(backings: Sequence[Backing]) -> list[tuple[int, int, int]]:
    """(start, end, index into ``backings``) of this process's mappings of their files."""
    ids = {}
    for i, b in enumerate(backings):
        st = os.fstat(b.fd)
        ids[(st.st_dev, st.st_ino)] = i
    return [(a.start, a.end, ids[(a.dev, a.inode)]) for a in proc.maps(proc.SELF)
            if (a.dev, a.inode) in ids]


def _fill(backings: Sequence[Backing], items: list[WorkItem], host: HostFacts, limits: Limits,
          config: HookConfig, domain: str) -> int:
    import dataclasses

    from ..engine.placement import check_placement
    from ..engine.populate import EngineOps, populate
    from ..host.facts import read_cpu_quota

    # Sized from in here: the cgroup's CPU quota, not the hook's (fork_detached joined it).
    host = dataclasses.replace(host, cpu_quota=read_cpu_quota())
    complete = Complete(backings)
    cancel = threading.Event()
    if config.populate_timeout_s > 0:
        timer = threading.Timer(config.populate_timeout_s, cancel.set)
        timer.daemon = True
        timer.start()
    t0 = time.monotonic()
    try:
        result = populate(items, host, limits, cancel=cancel,
                          ops=EngineOps(populate=complete.populate, touch=no_touch))
    except (KvmaccelError, OSError, KeyboardInterrupt) as e:
        # QEMU preallocates what the filler did not reach: never a failed start.
        if cancel.is_set():
            log.warning("populate ran past populate_timeout_s = %g s: the filler stopped; "
                        "QEMU preallocates the rest", config.populate_timeout_s)
        elif isinstance(e, KeyboardInterrupt):
            log.info("filler stopped after %.2f s (SIGTERM: the guest stopped)",
                     time.monotonic() - t0)
        else:
            log.warning("filler stopped after %.2f s (%s); QEMU preallocates the rest",
                        time.monotonic() - t0, " ".join(str(e).split()))
        return 0
    filled = result.bytes_total - complete.skipped_bytes
    log.info("filler populated %s alongside QEMU in %.2f s, %d thread(s)%s",
             format_size(filled), result.seconds, result.threads,
             f"; left {format_size(complete.skipped_bytes)} to QEMU, which had preallocated "
             "it" if complete.skipped_bytes else "")
    for b in backings:  # QEMU has the file by now: a wrong node can only be reported
        if b.spec.nodes and b.spec.policy == "bind":
            try:
                check_placement(b.fd, b.spec.size_bytes, b.page_size_bytes, b.spec.nodes,
                                str(b.path))
            except KvmaccelError as e:
                log.error("%s", e)
    records.fill(domain=domain, source="overlap", bytes=filled,
                 seconds=round(result.seconds, 4), threads=result.threads)
    return 0


def fork_detached(name: str, nice: int, work: Callable[[], int],
                  cgroup: str | None = None) -> int:
    """Fork a child of the hook that runs ``work`` and exits with what it returns; return
    its pid.  The child first detaches (:func:`kvmaccel.host.process.detach`): a session of
    its own (out of libvirt's process group), stdio on /dev/null (libvirt waits for the
    hook's pipes to close, not for the hook), SIGTERM as KeyboardInterrupt (the engine then
    stops), the name ``name``, and ``nice`` for the process and for its new scheduler
    autogroup.  Forked, not a new interpreter: it works within milliseconds.  An exception
    ``work`` lets through is logged, never raised into the hook.

    With ``cgroup``, the hook moves the child into that cgroup
    (:func:`kvmaccel.engine.cgroup.enter`) before it lets the child do anything at all, and
    before this returns: the child waits on a pipe until then (and exits if the hook dies
    first).  A child that joined
    its cgroup itself would run at ``nice`` outside it until it got the CPU to do so, on a
    busy host for as long as the hook and the next hooks take."""
    for handler in logging.getLogger("kvmaccel").handlers:
        handler.flush()
    gate = os.pipe() if cgroup else None
    pid = os.fork()
    if pid:
        if gate is not None:
            os.close(gate[0])
            try:
                from ..engine.cgroup import enter

                enter(cgroup or "", pid=pid)
                os.write(gate[1], b"\x01")
            finally:
                os.close(gate[1])
        return pid
    code = 1
    try:
        if gate is not None:
            os.close(gate[1])
            if os.read(gate[0], 1) != b"\x01":  # the hook died before it placed us
                os._exit(1)
            os.close(gate[0])
        process.detach(nice, name)
        code = work()
    except BaseException:  # noqa: BLE001 - a child: logged, never raised into the hook
        log.exception("%s failed", name)
    finally:
        os._exit(code)
