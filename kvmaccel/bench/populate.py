"""``kvmaccel bench``: how population scales with threads, against QEMU, and what it costs
a competing workload.

Measurements follow FACTS.md's advice for noisy shared VMs: one untimed warm-up (the first
touch of RAM the hypervisor reclaimed costs several times more than recycled pages), then
configurations alternated within each round, medians quoted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.backing import BackingSpec, open_backings, populate_backings, release
from ..engine.populate import PopulateResult
from ..errors import HostError, UsageError
from ..host import sysmem
from ..host.capacity import check
from ..host.facts import HostFacts
from ..model.units import GIB, format_size
from ..plan.limits import Limits

log = logging.getLogger(__name__)

Emit = Callable[[str], None]


@dataclass(frozen=True)
class BenchBacking:
    """Where bench puts its scratch memory: ``kind`` hugetlbfs, tmpfs or memfd."""

    kind: str
    size_bytes: int
    directory: str | None  # hugetlbfs mount or tmpfs directory; None for memfd
    page_size_kib: int | None  # huge page size for hugetlbfs (and memfd with huge pages)

    def spec(self, tag: str) -> BackingSpec:
        if self.directory is None:
            return BackingSpec(None, self.size_bytes, page_size_kib=self.page_size_kib,
                               name=f"kvmaccel-bench-{tag}")
        path = os.path.join(self.directory, f"kvmaccel-bench-{os.getpid()}-{tag}")
        return BackingSpec(path, self.size_bytes)

    def describe(self) -> str:
        page = f"{self.page_size_kib} KiB pages" if self.page_size_kib else "base pages"
        where = self.directory or "memfd"
        return f"{format_size(self.size_bytes)} on {self.kind} ({where}, {page})"


def choose_backing(kind: str, size_bytes: int, page_size_kib: int | None, directory: str | None,
                   host: HostFacts) -> BenchBacking:
    """Resolve the bench's backing; ``auto`` is hugetlbfs when a mount of the page size has
    enough free huge pages, else tmpfs.  Raises :class:`UsageError` or :class:`HostError`."""
    if kind == "auto":
        page = page_size_kib or host.default_hugepage_kib or 2048
        fits = check(host, None, page, size_bytes).ok
        mounted = any(m.page_size_kib == page for m in host.hugetlbfs_mounts)
        kind = "hugetlbfs" if fits and mounted else "tmpfs"
    if kind == "hugetlbfs":
        page = page_size_kib or host.default_hugepage_kib or 2048
        if directory is None:
            mounts = [m for m in host.hugetlbfs_mounts if m.page_size_kib == page]
            if not mounts:
                raise HostError(
                    f"no hugetlbfs mount with {page} KiB pages; mount one: mount -t hugetlbfs "
                    f"-o pagesize={page // 1024}M none /dev/hugepages")
            directory = mounts[0].path
        return BenchBacking(kind, size_bytes, directory, page)
    if kind == "tmpfs":
        return BenchBacking(kind, size_bytes, directory or "/dev/shm", None)
    if kind == "memfd":
        return BenchBacking(kind, size_bytes, None, page_size_kib)
    raise UsageError(f"unknown backing {kind!r}; use hugetlbfs, tmpfs or memfd")


def bench_limits(threads: int, nice: int, idle_cpus_only: bool = False) -> Limits:
    """``threads`` threads: bench measures scaling, so the default caps are lifted, and
    helpers start whatever the load unless ``idle_cpus_only``."""
    return Limits(threads=threads, nice=nice, max_helpers_host=threads - 1,
                  max_helpers_per_node=threads - 1, min_chunk_bytes=32 << 20,
                  idle_cpus_only=idle_cpus_only)


def run_once(backing: BenchBacking, host: HostFacts, limits: Limits, tag: str
             ) -> PopulateResult:
    """Populate a fresh scratch backing, free it, return the engine's result."""
    backings, result = populate_backings([backing.spec(tag)], host, limits)
    for b in backings:
        b.close()
        if b.path:
            release(b.path)
    return result


def bare_madvise_once(backing: BenchBacking, host: HostFacts) -> float:
    """Seconds for one MADV_POPULATE_WRITE call over the whole range, nothing else."""
    (b,) = open_backings([backing.spec("bare")], host)
    try:
        addr = sysmem.mmap_shared(b.fd, backing.size_bytes)
        try:
            t0 = time.monotonic()
            sysmem.madvise(addr, backing.size_bytes, sysmem.MADV_POPULATE_WRITE)
            return time.monotonic() - t0
        finally:
            sysmem.munmap(addr, backing.size_bytes)
    finally:
        b.discard()


@dataclass(frozen=True)
class Row:
    label: str
    seconds: tuple[float, ...]
    size_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0

    @property
    def gib_per_s(self) -> float:
        return self.size_bytes / GIB / self.median


def format_table(rows: Sequence[Row], baseline: Row, extra: dict[str, tuple[str, ...]] | None
                 = None) -> str:
    """The seed's table: threads, speedup (medians), average seconds with spread, GiB/s."""
    head = ["config", "speedup", "avg s", "stdev", "median s", "GiB/s"]
    extra = extra or {}
    extra_heads = list(extra)
    lines = [head + extra_heads]
    for i, row in enumerate(rows):
        lines.append([row.label, f"{baseline.median / row.median:.2f}x", f"{row.mean:.3f}",
                      f"{row.stdev:.3f}", f"{row.median:.3f}", f"{row.gib_per_s:.2f}"]
                     + [extra[h][i] for h in extra_heads])
    widths = [max(len(line[c]) for line in lines) for c in range(len(head) + len(extra_heads))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
                     for line in lines)


# --- QEMU's own preallocation -------------------------------------------------------------

def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_prealloc_once(qemu: str, backing: BenchBacking, threads: int, prealloc: bool,
                       tag: str) -> float:
    """Seconds from spawning QEMU (``-machine none -daemonize``) until its parent exits, which
    is after every backend is created and, with ``prealloc``, preallocated."""
    size = backing.size_bytes
    opts = [f"id=mem0,size={size}", "share=on",
            f"prealloc={'on' if prealloc else 'off'}", f"prealloc-threads={threads}"]
    path = None
    if backing.directory is None:
        obj = "memory-backend-memfd," + ",".join(opts)
        if backing.page_size_kib:
            obj += f",hugetlb=on,hugetlbsize={backing.page_size_kib * 1024}"
    else:
        path = os.path.join(backing.directory, f"kvmaccel-bench-qemu-{os.getpid()}-{tag}")
        obj = f"memory-backend-file,mem-path={path}," + ",".join(opts)
    with tempfile.TemporaryDirectory(prefix="kvmaccel-bench-") as tmp:
        pidfile = os.path.join(tmp, "qemu.pid")
        cmd = [qemu, "-machine", "none", "-display", "none", "-nodefaults", "-daemonize",
               "-pidfile", pidfile, "-object", obj]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - t0
        try:
            if proc.returncode != 0:
                raise HostError(f"QEMU failed ({proc.returncode}): "
                                f"{proc.stderr.strip().splitlines()[-1:]}")
            with open(pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        finally:
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return seconds


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


# --- competing load -----------------------------------------------------------------------

def _burn(rounds: int, ready: Any, go: Any) -> None:
    """A CPU-bound loop of fixed work (hashing a small buffer), like ktask's usemem runs."""
    data = b"x" * 4096
    ready.set()
    go.wait()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest() * 128


def run_competitor(cpus: int, rounds: int,
                   during: Callable[[], contextlib.AbstractContextManager[None]] | None = None
                   ) -> float:
    """Seconds for ``cpus`` processes (nice 0) to each finish ``rounds`` of work, while the
    context ``during()`` is entered.  The processes are forked before ``during`` starts any
    thread."""
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    procs = []
    readies = []
    for _ in range(cpus):
        ready = ctx.Event()
        p = ctx.Process(target=_burn, args=(rounds, ready, go), daemon=True)
        p.start()
        procs.append(p)
        readies.append(ready)
    try:
        for ready in readies:
            ready.wait()
        with during() if during else contextlib.nullcontext():
            t0 = time.monotonic()
            go.set()
            for p in procs:
                p.join()
            return time.monotonic() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


@contextlib.contextmanager
def populating_loop(backing: BenchBacking, host: HostFacts, limits: Limits | None,
                    results: list[PopulateResult]) -> Iterator[None]:
    """Populate and free over and over in a background thread while the block runs,
    appending each result to ``results``.  ``limits`` None: do nothing (the load alone)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        n = 0
        try:
            while not stop.is_set() and limits is not None:
                results.append(run_once(backing, host, limits, f"loop{n}"))
                n += 1
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    thread = threading.Thread(target=loop, name="kvmaccel-bench-loop")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


# --- the three benchmarks -----------------------------------------------------------------

def scaling(backing: BenchBacking, host: HostFacts, threads: Sequence[int], runs: int,
            nice: int, vs_qemu: bool, emit: Emit) -> dict[str, Any]:
    """Threads vs time, with the bare-madvise floor and, optionally, QEMU's prealloc."""
    qemu = qemu_binary() if vs_qemu else None
    if vs_qemu and qemu is None:
        emit("qemu-system-x86_64 is not installed: skipping --vs-qemu "
             "(apt-get install qemu-system-x86)")
    emit(f"bench: {backing.describe()}, {runs} run(s), threads {','.join(map(str, threads))}")
    run_once(backing, host, bench_limits(max(threads), nice), "warmup")  # untimed
    # Every configuration runs once per round; the order rotates from round to round so
    # that no configuration always inherits the page state its predecessor left.
    configs: list[tuple[str, Callable[[], float]]] = [
        ("bare", lambda: bare_madvise_once(backing, host))]
    def engine_run(t: int) -> float:
        return run_once(backing, host, bench_limits(t, nice), f"t{t}").seconds

    for t in threads:
        configs.append((f"t{t}", functools.partial(engine_run, t)))
    if qemu:
        configs.append(("startup", functools.partial(qemu_prealloc_once, qemu, backing, 1,
                                                     False, "s")))
        for t in threads:
            configs.append((f"qemu{t}", functools.partial(qemu_prealloc_once, qemu, backing, t,
                                                          True, f"q{t}")))
    times: dict[str, list[float]] = {key: [] for key, _ in configs}
    for r in range(runs):
        shift = r % len(configs)
        for key, measure in configs[shift:] + configs[:shift]:
            times[key].append(measure())
        emit(f"  run {r + 1}/{runs}: " + ", ".join(
            f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    qemu_times = times
    size = backing.size_bytes
    bare = Row("bare madvise", tuple(times["bare"]), size)
    rows = [Row(f"{t} thread{'s' if t > 1 else ''}", tuple(times[f"t{t}"]), size)
            for t in threads]
    one = next((row for t, row in zip(threads, rows, strict=True) if t == 1), rows[0])
    extra: dict[str, tuple[str, ...]] = {}
    report: dict[str, Any] = {
        "backing": backing.describe(), "size_bytes": size, "runs": runs,
        "bare_madvise_s": times["bare"],
        "threads": {str(t): {"seconds": times[f"t{t}"],
                             "median_s": statistics.median(times[f"t{t}"]),
                             "speedup": one.median / row.median}
                    for t, row in zip(threads, rows, strict=True)},
    }
    if qemu:
        startup = statistics.median(qemu_times["startup"])
        nets, ratios = [], []
        for t, row in zip(threads, rows, strict=True):
            net = max(statistics.median(qemu_times[f"qemu{t}"]) - startup, 1e-9)
            nets.append(f"{net:.3f}")
            ratios.append(f"{net / row.median:.2f}x")
            report["threads"][str(t)].update(
                qemu_seconds=qemu_times[f"qemu{t}"], qemu_net_median_s=net,
                vs_qemu=net / row.median)
        extra = {"qemu s": tuple(nets), "vs qemu": tuple(ratios)}
        report["qemu_startup_s"] = qemu_times["startup"]
    emit(format_table([bare, *rows], one, {k: ("-", *v) for k, v in extra.items()}))
    overhead = one.median / bare.median - 1
    emit(f"1 thread vs one bare madvise call: {overhead * 100:+.1f}%")
    report["one_thread_overhead"] = overhead
    if qemu:
        emit(f"qemu s: QEMU's prealloc=on,prealloc-threads=N start minus its prealloc=off start "
             f"({startup:.3f} s), medians; vs qemu > 1 means kvmaccel is faster")
    return report


def competitor(backing: BenchBacking, host: HostFacts, threads: int, seconds: float,
               emit: Emit) -> dict[str, Any]:
    """Disturbance: a CPU-bound load on every CPU, alone and while kvmaccel populates over and
    over with the caller only, with helpers at nice 19, and with helpers at nice 0."""
    cpus = len(os.sched_getaffinity(0))
    calib = 2000
    rate = calib / run_competitor(1, calib)
    rounds = max(1000, int(rate * seconds))
    emit(f"competitor: {cpus} CPU-bound process(es), {rounds} rounds each (~{seconds:.0f} s); "
         f"kvmaccel populating {backing.describe()} over and over")
    run_once(backing, host, bench_limits(threads, 19), "warmup")
    scenarios: list[tuple[str, Limits | None]] = [
        ("load alone", None),
        ("caller only", bench_limits(1, 19)),
        ("helpers nice 19", bench_limits(threads, 19, idle_cpus_only=True)),
        ("nice 19, ungated", bench_limits(threads, 19)),
        ("helpers nice 0", bench_limits(threads, 0)),
    ]
    out: dict[str, Any] = {}
    lines = [("scenario", "load s", "load slowdown", "vs caller only", "populate GiB/s",
              "helpers")]
    for name, limits in scenarios:
        results: list[PopulateResult] = []
        load_s = run_competitor(cpus, rounds, functools.partial(
            populating_loop, backing, host, limits, results))
        gibs = (sum(r.bytes_total for r in results) / GIB / sum(r.seconds for r in results)
                if results else 0.0)
        helpers = statistics.fmean(r.threads - 1 for r in results) if results else 0.0
        out[name] = {"load_s": load_s, "populate_gib_per_s": gibs, "populations": len(results),
                     "mean_helpers": helpers}
        emit(f"  {name}: load {load_s:.2f} s, {len(results)} population(s), {gibs:.2f} GiB/s, "
             f"{helpers:.2f} helper(s) on average")
    alone = out["load alone"]["load_s"]
    base = out["caller only"]["load_s"]
    for name, data in out.items():
        data["slowdown"] = data["load_s"] / alone - 1
        data["vs_caller_only"] = data["load_s"] / base - 1
        lines.append((name, f"{data['load_s']:.2f}", f"{data['slowdown'] * 100:+.1f}%",
                      "-" if name == "load alone" else f"{data['vs_caller_only'] * 100:+.1f}%",
                      "-" if name == "load alone" else f"{data['populate_gib_per_s']:.2f}",
                      "-" if name == "load alone" else f"{data['mean_helpers']:.2f}"))
    widths = [max(len(line[c]) for line in lines) for c in range(6)]
    emit("\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                   for line in lines))
    emit("vs caller only: what the helpers add to the load beyond single-threaded population; "
         "helpers: mean helpers per population (the gate starts niced helpers on idle CPUs only)")
    return out
