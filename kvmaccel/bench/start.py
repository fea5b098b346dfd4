"""``kvmaccel hook bench-start``: how long ``virsh start`` takes under each memory setup.

One guest size, every configuration in the same run, rounds in rotated order, medians
reported (the test machines are VMs whose memory timings drift; see FACTS.md).  The time is
wall time until ``virsh start`` returns: libvirt's work, the hooks, QEMU's start and its
preallocation, everything a user waits for.

Configurations (``T`` is ``--threads``):

* ``qemu-hugepages``: ``<hugepages/>``; QEMU preallocates with its default single thread.
* ``qemu-hugepages-T``: ``<hugepages/>`` + ``<allocation mode='immediate' threads='T'/>``.
* ``qemu-shm-T``: a shared file on /dev/shm, ``<allocation mode='immediate' threads='T'/>``.
* ``kvmaccel-hugetlbfs``, ``kvmaccel-shm``: a shared file (``<source type='file'/>``,
  ``<access mode='shared'/>``) under ``memory_backing_dir`` on the hugetlbfs mount or on
  /dev/shm, and kvmaccel's hook populating it with T threads (``[limits] threads``) before
  QEMU starts.  No ``<allocation>``: the file is already fully populated, so QEMU's prealloc
  would only walk pages that are there.
* ``kvmaccel-pool-hugetlbfs``, ``kvmaccel-pool-shm``: the same, with the warm pool: before
  each timed start a clean pool file is made (``Pool.fill``, untimed), the hook links it at
  the guest's path, nothing is populated on the start path; after the guest is destroyed
  the bench waits for the hook's detached scrub and drains the pool, so the pool never
  holds more than one guest's memory.  ``@2G`` (``--pool-sizes``) repeats them for another
  guest size, to show the pool start does not grow with the guest.
* ``kvmaccel-front``, ``kvmaccel-front-pool``: ``<hugepages/>`` as in ``qemu-hugepages``, the
  guest started through kvmaccel's emulator front (installed for the run if it is not), so
  the hook populates ``kvmaccel-pc.ram`` in the guest's hugepage directory (or links a clean
  pool file there) and the front hands it to QEMU.  ``hugetlbfs_mount`` names the private
  mount for every hugepage configuration.  QEMU preallocates ``<hugepages/>`` itself, so a
  fresh file is filled by the hook's detached filler alongside QEMU's start (``overlap``).
* ``kvmaccel-front-T``: the same with ``<allocation mode='immediate' threads='T'/>``, the
  same XML as ``qemu-hugepages-T``: QEMU preallocates with T threads and the filler runs T.
* ``kvmaccel-front-before``: ``kvmaccel-front`` with ``overlap = false``: the hook
  populates the whole file before QEMU starts (the fresh path before the filler).
* ``kvmaccel-front-restart``: ``kvmaccel-front-pool`` started again right after it stopped;
  ``-spare``: with one more clean file in the pool (a keeper target of count 2), which the
  restart takes instead of waiting for its own file's scrub.
* ``-1g``: the same on 1G pages.
* each also ``+locked``: all guest memory locked, which pins every page at start as VFIO
  does.  libvirt's ``<locked/>`` cannot start on the test machines (root lacks
  CAP_SYS_RESOURCE, memlock hard limit 8 MiB), so the stand-in is qemu.conf ``user`` and
  ``group`` ``root``, ``clear_emulator_capabilities = 0`` and ``-overcommit mem-lock=on``
  through ``<qemu:commandline>``.  QEMU then calls ``mlockall(MCL_CURRENT|MCL_FUTURE)``
  before it creates guest memory, so every mapping is faulted in by one thread at ``mmap``
  and ``prealloc-threads`` no longer help.

Guest memory goes to a private 2M hugetlbfs and a private tmpfs mounted for the run (not the
host's /dev/hugepages and /dev/shm, nor any pool there).  The hook is installed in
``/etc/libvirt/hooks/qemu.d/`` for the run (libvirtd lists that
directory at every call, so it is moved aside for the QEMU-only configurations);
``/etc/libvirt/qemu.conf`` is rewritten per configuration and libvirtd restarted.  Both are put
back at the end, whatever happens.  Raises :class:`~kvmaccel.errors.VirshError`,
:class:`~kvmaccel.errors.CapacityError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from ..errors import UsageError, VirshError
from ..host.capacity import capacity_checks, require
from ..host.facts import HostFacts, read_host
from ..model.units import format_size
from ..plan.limits import Limits
from ..pool.manage import POOL_DIRNAME, Pool, PoolKey, key_for
from ..serve.state import GuestState
from ..setup import front as hook_front
from ..setup import install as hook_install
from . import virsh

Emit = Callable[[str], None]
PREFIX = "kvmaccel-bench-"
QEMU = hook_front.DEFAULT_QEMU
FRONT = hook_front.front_path(QEMU)


@dataclass(frozen=True)
class StartConfig:
    name: str
    hugepages: bool  # <hugepages/>: QEMU fills a temporary file in the hugetlbfs directory
    backing_dir: str | None  # memory_backing_dir for a shared <source type='file'/>
    threads: int | None  # <allocation mode='immediate' threads=N/>
    hook: bool
    locked: bool
    pool: bool = False  # the hook starts the guest from a clean pool file
    restart: bool = False  # timed: a start right after the guest ran from the pool and stopped
    hugetlbfs_mount: str | None = None  # qemu.conf hugetlbfs_mount for <hugepages/>
    size_bytes: int | None = None  # another guest size than the run's
    front: bool = False  # <emulator> is kvmaccel's front (with hugepages: a directory)
    page_kib: int | None = None  # <hugepages><page size=.../>: 1G configurations
    overlap: bool = True  # the hook's ``overlap``: a fresh file is filled alongside QEMU
    spares: int = 0  # clean pool files beyond the guest's own (what a keeper count adds)

    def guest_files(self) -> int:
        """How many guest-sized files of huge pages the configuration holds at once."""
        return 1 + self.spares

    def guest_bytes(self, default: int) -> int:
        return self.size_bytes or default

    def qemu_conf(self) -> dict[str, str | int]:
        settings: dict[str, str | int] = {}
        if self.backing_dir:
            settings["memory_backing_dir"] = self.backing_dir
        if self.hugepages and self.hugetlbfs_mount:
            settings["hugetlbfs_mount"] = self.hugetlbfs_mount
        if self.locked:
            settings.update(user="root", group="root", clear_emulator_capabilities=0)
        return settings


@dataclass
class StartResult:
    config: StartConfig
    seconds: list[float] = field(default_factory=list)
    hook_seconds: list[float] = field(default_factory=list)
    scrub_seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


GIB_KIB = 1 << 20


def configurations(threads: int, hugetlbfs_dir: str, shm_dir: str = "/dev/shm",
                   pool_sizes: Sequence[int] = (), gig_dir: str = "-") -> list[StartConfig]:
    """Every configuration; ``gig_dir``, the 1G hugetlbfs mount of the ``-1g`` ones."""
    pool_h = StartConfig("kvmaccel-pool-hugetlbfs", False, hugetlbfs_dir, None, True, False,
                         pool=True)
    pool_s = StartConfig("kvmaccel-pool-shm", False, shm_dir, None, True, False, pool=True)
    h = hugetlbfs_dir
    base = [
        StartConfig("qemu-hugepages", True, None, None, False, False, hugetlbfs_mount=h),
        StartConfig(f"qemu-hugepages-{threads}", True, None, threads, False, False,
                    hugetlbfs_mount=h),
        StartConfig(f"qemu-shm-{threads}", False, shm_dir, threads, False, False),
        StartConfig("kvmaccel-hugetlbfs", False, hugetlbfs_dir, None, True, False),
        StartConfig("kvmaccel-shm", False, shm_dir, None, True, False),
        pool_h, pool_s,
        replace(pool_h, name="kvmaccel-restart-hugetlbfs", restart=True),
        replace(pool_s, name="kvmaccel-restart-shm", restart=True),
        StartConfig("kvmaccel-front", True, None, None, True, False, hugetlbfs_mount=h,
                    front=True),
        StartConfig(f"kvmaccel-front-{threads}", True, None, threads, True, False,
                    hugetlbfs_mount=h, front=True),
        StartConfig("kvmaccel-front-before", True, None, None, True, False, hugetlbfs_mount=h,
                    front=True, overlap=False),
        StartConfig("kvmaccel-front-pool", True, None, None, True, False, pool=True,
                    hugetlbfs_mount=h, front=True),
        StartConfig("kvmaccel-front-restart", True, None, None, True, False, pool=True,
                    restart=True, hugetlbfs_mount=h, front=True),
        StartConfig("kvmaccel-front-restart-spare", True, None, None, True, False, pool=True,
                    restart=True, hugetlbfs_mount=h, front=True, spares=1),
        *(StartConfig(name, True, None, t, hook, False, pool=pool, front=hook,
                      hugetlbfs_mount=gig_dir, page_kib=GIB_KIB)
          for name, t, hook, pool in (("qemu-hugepages-1g", None, False, False),
                                      (f"qemu-hugepages-1g-{threads}", threads, False, False),
                                      ("kvmaccel-front-1g", None, True, False),
                                      (f"kvmaccel-front-1g-{threads}", threads, True, False),
                                      ("kvmaccel-front-pool-1g", None, True, True))),
    ]
    sized = [replace(c, name=f"{c.name}@{format_size(size)}", size_bytes=size)
             for size in pool_sizes for c in (pool_h, pool_s)]
    return base + sized + [replace(c, name=c.name + "+locked", locked=True) for c in base]


def domain_xml(cfg: StartConfig, name: str, size_bytes: int) -> str:
    """A diskless 2-vCPU KVM guest of ``size_bytes`` memory set up as ``cfg`` says."""
    backing = []
    if cfg.hugepages and cfg.page_kib:
        backing.append(f"<hugepages><page size='{cfg.page_kib}' unit='KiB'/></hugepages>")
    elif cfg.hugepages:
        backing.append("<hugepages/>")
    else:
        backing += ["<source type='file'/>", "<access mode='shared'/>"]
    if cfg.threads:
        backing.append(f"<allocation mode='immediate' threads='{cfg.threads}'/>")
    cmdline = ("<qemu:commandline><qemu:arg value='-overcommit'/>"
               "<qemu:arg value='mem-lock=on'/></qemu:commandline>") if cfg.locked else ""
    return f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name + '.kvmaccel')}</uuid>
  <memory unit='KiB'>{size_bytes // 1024}</memory>
  <memoryBacking>{''.join(backing)}</memoryBacking>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>{FRONT if cfg.front else QEMU}</emulator><memballoon model='none'/></devices>
  {cmdline}
</domain>
"""


def _check_room(size_bytes: int, configs: Sequence[StartConfig], hugetlbfs_dir: str,
                host: HostFacts | None = None) -> None:
    """Raise :class:`CapacityError` unless the host has room for the biggest guest of
    ``configs`` (on tmpfs, half as much again), counted as every start counts it
    (:mod:`kvmaccel.host.capacity`): free huge pages less those promised to mappings."""
    host = read_host() if host is None else host
    needs: dict[tuple[int | None, int], int] = {
        (None, 2048): max((c.guest_bytes(size_bytes) * c.guest_files() for c in configs
                           if (c.hugepages and not c.page_kib) or c.backing_dir == hugetlbfs_dir),
                          default=0),
        (None, GIB_KIB): max((c.guest_bytes(size_bytes) for c in configs
                              if c.page_kib == GIB_KIB), default=0),
    }
    if any(c.backing_dir and c.backing_dir != hugetlbfs_dir for c in configs):
        needs[(None, host.base_page_size_kib)] = size_bytes * 3 // 2
    require(capacity_checks(host, needs), who=f"a {format_size(size_bytes)} bench guest",
            hint="or choose a smaller --size")


@dataclass
class _Bench:
    """What one bench run shares: its work directory, the hook's config, the mounts."""

    workdir: str
    threads: int
    hugetlbfs_dir: str
    enable: Callable[[bool], None]

    @property
    def run_dir(self) -> str:
        return os.path.join(self.workdir, "run")

    def config_path(self, pool: bool, overlap: bool = True) -> str:
        return os.path.join(self.workdir, f"kvmaccel{'-pool' if pool else ''}"
                                          f"{'' if overlap else '-before'}.toml")

    def use_config(self, pool: bool, overlap: bool = True) -> None:
        """Point the installed hook at the config with the pool on or off (and ``overlap``).
        Each config file is written once and stays put, as an operator's does: the hook
        trusts what it learned from a config only while the file is unchanged."""
        path = self.config_path(pool, overlap)
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(f'strict = true\nsyslog = false\nlog_file = "{self.workdir}/hook.log"\n'
                        f'run_dir = "{self.run_dir}"\noverlap = {str(overlap).lower()}\n'
                        f'record_file = "{self.workdir}/records.jsonl"\n'
                        f'[limits]\nthreads = {self.threads}\n'
                        f'[pool]\nenabled = {"true" if pool else "false"}\n')
        if (hook_install.status(virsh.LIBVIRT_DIR).info or {}).get("config") != path:
            hook_install.install(virsh.LIBVIRT_DIR, config_path=path)

    def pool(self, cfg: StartConfig) -> Pool:
        directory = cfg.backing_dir or cfg.hugetlbfs_mount
        assert directory is not None
        return Pool(os.path.join(directory, POOL_DIRNAME),
                    state_root=os.path.join(self.run_dir, "pool"))

    def key(self, cfg: StartConfig, size_bytes: int) -> PoolKey:
        page_kib = cfg.page_kib or (
            2048 if self.hugetlbfs_dir in (cfg.backing_dir, cfg.hugetlbfs_mount) else 4)
        return key_for(cfg.guest_bytes(size_bytes), page_kib)


@contextlib.contextmanager
def _bench_hook(workdir: str) -> Iterator[Callable[[bool], None]]:
    """Install the hook (config in ``workdir``) for the run; yield ``enable(bool)``."""
    with virsh.temporary_hook(os.path.join(workdir, "kvmaccel.toml"), workdir) as enable:
        yield enable


def _state(bench: _Bench, name: str) -> GuestState:
    key = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name + ".kvmaccel"))
    try:
        with open(os.path.join(bench.run_dir, "domains", f"{key}.json"), encoding="utf-8") as f:
            return GuestState.from_json(json.load(f))
    except (OSError, ValueError):
        raise VirshError(f"{name}: the hook left no state; see {bench.workdir}/hook.log"
                         ) from None


def _hook_seconds(bench: _Bench, cfg: StartConfig, name: str) -> float | None:
    """Seconds the hook populated (0 for a start from the pool); raises when the hook did not
    do what the configuration is about."""
    if not cfg.hook:
        return None
    state = _state(bench, name)
    if cfg.pool:
        if state.files or not state.pool_links:
            raise VirshError(f"{cfg.name}: the start did not come from the pool; see "
                             f"{bench.workdir}/hook.log")
        return 0.0
    if state.filler is not None:  # filled alongside QEMU: the hook itself populated nothing
        return 0.0
    if state.populated is None:
        raise VirshError(f"{cfg.name}: the hook did not populate the guest; see "
                         f"{bench.workdir}/hook.log")
    return state.populated.seconds


def _settle_pool(pool: Pool, timeout_s: float = 300) -> float:
    """Wait for the hook's detached scrub to finish; return how long it took."""
    t0 = time.monotonic()
    while any(e.state in ("in_use", "scrubbing", "dirty") for e in pool.entries()):
        if time.monotonic() - t0 > timeout_s:
            raise VirshError(f"the scrub of {pool.directory} did not finish in {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _one_start(cfg: StartConfig, size_bytes: int, bench: _Bench, result: StartResult) -> None:
    name = PREFIX + cfg.name.replace("+", "-").replace("@", "-")
    size = cfg.guest_bytes(size_bytes)
    xml = os.path.join(bench.workdir, f"{name}.xml")
    with open(xml, "w", encoding="utf-8") as f:
        f.write(domain_xml(cfg, name, size))
    virsh.remove_domain(name)
    virsh.virsh("define", xml)
    if cfg.hook:
        bench.use_config(cfg.pool, cfg.overlap)
    pool = bench.pool(cfg) if cfg.pool else None
    if pool is not None:  # untimed: one clean pool file for this guest
        pool.fill(bench.key(cfg, size_bytes), cfg.guest_files(), read_host(),
                  Limits(threads=bench.threads, idle_cpus_only=False))
    try:
        if cfg.restart:  # untimed: it runs from the pool and stops; its scrub starts
            virsh.virsh("start", name)
            virsh.virsh("destroy", name)
        t0 = time.monotonic()
        virsh.virsh("start", name)
        result.seconds.append(time.monotonic() - t0)
        hook_s = _hook_seconds(bench, cfg, name)
        if hook_s is not None:
            result.hook_seconds.append(hook_s)
    finally:
        virsh.remove_domain(name)
        if pool is not None:
            result.scrub_seconds.append(_settle_pool(pool))
            pool.drain()


def run(size_bytes: int, *, runs: int, threads: int, only: Sequence[str] | None,
        keep_going: bool, emit: Emit, pool_sizes: Sequence[int] = ()) -> list[StartResult]:
    """Time every configuration ``runs`` times, rotating the order each round."""
    if os.geteuid() != 0:
        raise UsageError("bench-start needs root: it rewrites qemu.conf and restarts libvirtd")
    names = {c.name for c in configurations(threads, "-", "-", pool_sizes)}
    wanted = [c for c in configurations(threads, "-", "-", pool_sizes)
              if not only or c.name in only]
    unknown = set(only or ()) - names
    if unknown:
        raise UsageError(f"unknown configuration(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(sorted(names))}")
    workdir = tempfile.mkdtemp(prefix="kvmaccel-bench.", dir="/run")
    os.chmod(workdir, 0o755)  # QEMU (the qemu user) must reach the mounts inside
    failed = False
    try:
        with virsh.exclusive_libvirt(), \
                virsh.private_mount("hugetlbfs", "pagesize=2M,mode=0755", "huge-",
                                    workdir) as huge, \
                virsh.private_mount("tmpfs", "mode=0755", "shm-", workdir) as shm, \
                contextlib.ExitStack() as stack:
            gig = "-"
            if any(c.page_kib == GIB_KIB for c in wanted):
                gig = stack.enter_context(virsh.private_mount(
                    "hugetlbfs", "pagesize=1G,mode=0755", "gig-", workdir))
            configs = [c for c in configurations(threads, huge, shm, pool_sizes, gig)
                       if not only or c.name in only]
            _check_room(size_bytes, configs, huge)
            virsh.daemon_ready(timeout_s=5)
            installed = any(c.front for c in configs) and not hook_front.is_front(FRONT)
            if installed:
                hook_front.install(QEMU)
            try:
                results = _run_locked(configs, size_bytes, runs, threads, keep_going, emit,
                                      workdir, huge)
            finally:
                if installed:
                    hook_front.uninstall(FRONT)
            failed = any(r.error for r in results)
            return results
    finally:
        if failed:
            emit(f"kept {workdir} (hook log and state) for the failures")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_locked(configs: Sequence[StartConfig], size_bytes: int, runs: int, threads: int,
                keep_going: bool, emit: Emit, workdir: str, huge: str) -> list[StartResult]:
    results = {c.name: StartResult(c) for c in configs}
    groups: dict[tuple[tuple[str, str | int], ...], list[StartConfig]] = {}
    for c in configs:
        groups.setdefault(tuple(sorted(c.qemu_conf().items())), []).append(c)
    order = list(groups.items())
    original = virsh.read_text(virsh.QEMU_CONF)
    try:
        with virsh.saved_file(virsh.QEMU_CONF), _bench_hook(workdir) as enable:
            bench = _Bench(workdir, threads, huge, enable)
            for r in range(runs):
                shift = r % len(order)
                for settings, members in order[shift:] + order[:shift]:
                    live = [c for c in members if results[c.name].error is None]
                    if not live:
                        continue
                    virsh.write_qemu_conf(dict(settings), original)
                    enable(True)  # libvirtd runs qemu.d/ hooks only if it found one at start
                    virsh.restart_libvirtd()
                    k = r % len(live)
                    for cfg in live[k:] + live[:k]:
                        enable(cfg.hook)
                        try:
                            _one_start(cfg, size_bytes, bench, results[cfg.name])
                        except VirshError as e:
                            if not keep_going:
                                raise
                            results[cfg.name].error = str(e)
                        res = results[cfg.name]
                        emit(f"round {r + 1}/{runs} {cfg.name}: "
                             + (f"{res.seconds[-1]:.2f} s" if res.error is None
                                else f"FAILED: {res.error}"))
    finally:
        virsh.restart_libvirtd()  # back to the original qemu.conf, out of the mounts
    return list(results.values())


def format_table(results: Sequence[StartResult], size_bytes: int, threads: int) -> str:
    """A Markdown table: median start time, hook populate time, the scrub after stop (pool),
    the ratio to QEMU's best hugepage start at the same threads and locking
    (``qemu-hugepages-T``), and for kvmaccel the ratio to QEMU on the same backing
    (``qemu-hugepages-T``, ``qemu-shm-T``); then how the pool start changes with the size."""
    by_name = {r.config.name: r for r in results}
    lines = [f"`virsh start` of a {format_size(size_bytes)} guest, median of "
             f"{max((len(r.seconds) for r in results), default=0)} run(s); T = {threads} threads",
             "", "| configuration | start (s) | of which kvmaccel populate (s) | "
             f"scrub after stop (s) | vs qemu-hugepages-{threads} | "
             "vs QEMU on the same backing |",
             "|---|---:|---:|---:|---:|---:|"]

    def ratio(med: float, name: str) -> str:
        base = by_name.get(name)
        return f"{med / base.median_s:.2f}x" if base and base.median_s else "-"

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "-"

    for r in results:
        suffix = "+locked" if r.config.locked else ""
        med = r.median_s
        if med is None:
            lines.append(f"| {r.config.name} | failed: {r.error} | | | | |")
            continue
        same = "-"
        gig = "-1g" if r.config.page_kib == GIB_KIB else ""
        if r.config.hook:
            kind = "shm" if "-shm" in r.config.name else "hugepages"
            same = ratio(med, f"qemu-{kind}{gig}-{threads}{suffix}")
        if r.config.restart:  # against the warm pool start of the same backing
            warm = r.config.name.replace("-spare", "").replace("restart", "pool")
            same = f"{ratio(med, warm)} of {warm}"
        lines.append(f"| {r.config.name} | {med:.2f} | {median(r.hook_seconds)} | "
                     f"{median(r.scrub_seconds)} | "
                     f"{ratio(med, f'qemu-hugepages{gig}-{threads}{suffix}')} | {same} |")
    for r in results:
        if r.config.size_bytes and r.median_s is not None:
            full = by_name.get(r.config.name.split("@")[0])
            if full and full.median_s is not None:
                lines.append(f"\n{full.config.name}: {format_size(size_bytes)} "
                             f"{full.median_s:.2f} s vs {format_size(r.config.size_bytes)} "
                             f"{r.median_s:.2f} s: {full.median_s - r.median_s:+.2f} s")
    return "\n".join(lines)
