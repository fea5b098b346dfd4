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
* each also ``+locked``: all guest memory locked, which pins every page at start as VFIO
  does.  libvirt's ``<locked/>`` cannot start on the test machines (root lacks
  CAP_SYS_RESOURCE, memlock hard limit 8 MiB), so the stand-in is qemu.conf ``user`` and
  ``group`` ``root``, ``clear_emulator_capabilities = 0`` and ``-overcommit mem-lock=on``
  through ``<qemu:commandline>``.  QEMU then calls ``mlockall(MCL_CURRENT|MCL_FUTURE)``
  before it creates guest memory, so every mapping is faulted in by one thread at ``mmap``
  and ``prealloc-threads`` no longer help.

The hook is installed in ``/etc/libvirt/hooks/qemu.d/`` for the run (libvirtd lists that
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
from dataclasses import dataclass, field

from . import virsh
from .errors import CapacityError, UsageError, VirshError
from .host import read_host
from .units import format_size

Emit = Callable[[str], None]
PREFIX = "kvmaccel-bench-"


@dataclass(frozen=True)
class StartConfig:
    name: str
    hugepages: bool  # <hugepages/>: QEMU fills a temporary file in the hugetlbfs directory
    backing_dir: str | None  # memory_backing_dir for a shared <source type='file'/>
    threads: int | None  # <allocation mode='immediate' threads=N/>
    hook: bool
    locked: bool

    def qemu_conf(self) -> dict[str, str | int]:
        settings: dict[str, str | int] = {}
        if self.backing_dir:
            settings["memory_backing_dir"] = self.backing_dir
        if self.locked:
            settings.update(user="root", group="root", clear_emulator_capabilities=0)
        return settings


@dataclass
class StartResult:
    config: StartConfig
    seconds: list[float] = field(default_factory=list)
    hook_seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def configurations(threads: int, hugetlbfs_dir: str) -> list[StartConfig]:
    base = [
        StartConfig("qemu-hugepages", True, None, None, False, False),
        StartConfig(f"qemu-hugepages-{threads}", True, None, threads, False, False),
        StartConfig(f"qemu-shm-{threads}", False, "/dev/shm", threads, False, False),
        StartConfig("kvmaccel-hugetlbfs", False, hugetlbfs_dir, None, True, False),
        StartConfig("kvmaccel-shm", False, "/dev/shm", None, True, False),
    ]
    return base + [StartConfig(c.name + "+locked", c.hugepages, c.backing_dir, c.threads,
                               c.hook, True) for c in base]


def domain_xml(cfg: StartConfig, name: str, size_bytes: int) -> str:
    """A diskless 2-vCPU KVM guest of ``size_bytes`` memory set up as ``cfg`` says."""
    backing = []
    if cfg.hugepages:
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
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
  {cmdline}
</domain>
"""


def _check_room(size_bytes: int, configs: Sequence[StartConfig]) -> None:
    host = read_host()
    pool = host.hugepages.get(2048)
    needs_huge = any(c.hugepages or (c.backing_dir or "").startswith("/dev/hugepages")
                     for c in configs)
    have = pool.free_pages * 2048 * 1024 if pool else 0
    if needs_huge and have < size_bytes:
        raise CapacityError(f"a {format_size(size_bytes)} guest needs {size_bytes >> 21} free "
                            f"2M huge pages; {have >> 21} are free; choose a smaller --size",
                            page_size_kib=2048, needed_bytes=size_bytes, available_bytes=have)
    if host.mem_available_kib * 1024 < size_bytes * 3 // 2:
        raise CapacityError(f"MemAvailable {format_size(host.mem_available_kib * 1024)} is "
                            f"too little for a {format_size(size_bytes)} guest on /dev/shm")


@contextlib.contextmanager
def _bench_hook(workdir: str, threads: int) -> Iterator[Callable[[bool], None]]:
    """Install the hook (config in ``workdir``) for the run; yield ``enable(bool)``."""
    config = os.path.join(workdir, "kvmaccel.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(f'strict = true\nsyslog = false\nlog_file = "{workdir}/hook.log"\n'
                f'run_dir = "{workdir}/run"\n[limits]\nthreads = {threads}\n')
    with virsh.temporary_hook(config, workdir) as enable:
        yield enable


def _hook_seconds(workdir: str, cfg: StartConfig, name: str) -> float | None:
    if not cfg.hook:
        return None
    key = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name + ".kvmaccel"))
    try:
        with open(os.path.join(workdir, "run", "domains", f"{key}.json"), encoding="utf-8") as f:
            state = json.load(f)
        return float(state["result"]["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        raise VirshError(f"{cfg.name}: the hook did not populate the guest; see "
                         f"{workdir}/hook.log") from None


def _one_start(cfg: StartConfig, size_bytes: int, workdir: str,
               result: StartResult) -> None:
    name = PREFIX + cfg.name.replace("+", "-")
    xml = os.path.join(workdir, f"{name}.xml")
    with open(xml, "w", encoding="utf-8") as f:
        f.write(domain_xml(cfg, name, size_bytes))
    virsh.remove_domain(name)
    virsh.virsh("define", xml)
    try:
        t0 = time.monotonic()
        virsh.virsh("start", name)
        result.seconds.append(time.monotonic() - t0)
        hook_s = _hook_seconds(workdir, cfg, name)
        if hook_s is not None:
            result.hook_seconds.append(hook_s)
    finally:
        virsh.remove_domain(name)


def run(size_bytes: int, *, runs: int, threads: int, only: Sequence[str] | None,
        hugetlbfs_dir: str, keep_going: bool, emit: Emit) -> list[StartResult]:
    """Time every configuration ``runs`` times, rotating the order each round."""
    if os.geteuid() != 0:
        raise UsageError("bench-start needs root: it rewrites qemu.conf and restarts libvirtd")
    configs = configurations(threads, hugetlbfs_dir)
    if only:
        unknown = set(only) - {c.name for c in configs}
        if unknown:
            raise UsageError(f"unknown configuration(s) {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(c.name for c in configs)}")
        configs = [c for c in configs if c.name in only]
    with virsh.exclusive_libvirt():
        _check_room(size_bytes, configs)
        virsh.daemon_ready(timeout_s=5)
        return _run_locked(configs, size_bytes, runs, threads, keep_going, emit)


def _run_locked(configs: Sequence[StartConfig], size_bytes: int, runs: int, threads: int,
                keep_going: bool, emit: Emit) -> list[StartResult]:
    results = {c.name: StartResult(c) for c in configs}
    groups: dict[tuple[tuple[str, str | int], ...], list[StartConfig]] = {}
    for c in configs:
        groups.setdefault(tuple(sorted(c.qemu_conf().items())), []).append(c)
    order = list(groups.items())
    workdir = tempfile.mkdtemp(prefix="kvmaccel-bench.", dir="/run")
    original = virsh.read_text(virsh.QEMU_CONF)
    try:
        with virsh.saved_file(virsh.QEMU_CONF), _bench_hook(workdir, threads) as enable:
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
                            _one_start(cfg, size_bytes, workdir, results[cfg.name])
                        except VirshError as e:
                            if not keep_going:
                                raise
                            results[cfg.name].error = str(e)
                        res = results[cfg.name]
                        emit(f"round {r + 1}/{runs} {cfg.name}: "
                             + (f"{res.seconds[-1]:.2f} s" if res.error is None
                                else f"FAILED: {res.error}"))
    finally:
        virsh.restart_libvirtd()  # back to the original qemu.conf
        if all(r.error is None for r in results.values()):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            emit(f"kept {workdir} (hook log and state) for the failures")
    return list(results.values())


def format_table(results: Sequence[StartResult], size_bytes: int, threads: int) -> str:
    """A Markdown table: median start time, hook populate time, the ratio to QEMU's best
    hugepage start at the same threads and locking (``qemu-hugepages-T``), and for
    kvmaccel the ratio to QEMU on the same backing (``qemu-hugepages-T``, ``qemu-shm-T``)."""
    by_name = {r.config.name: r for r in results}
    lines = [f"`virsh start` of a {format_size(size_bytes)} guest, median of "
             f"{max((len(r.seconds) for r in results), default=0)} run(s); T = {threads} threads",
             "", "| configuration | start (s) | of which kvmaccel populate (s) | "
             f"vs qemu-hugepages-{threads} | vs QEMU on the same backing |",
             "|---|---:|---:|---:|---:|"]

    def ratio(med: float, name: str) -> str:
        base = by_name.get(name)
        return f"{med / base.median_s:.2f}x" if base and base.median_s else "-"

    for r in results:
        suffix = "+locked" if r.config.locked else ""
        med = r.median_s
        if med is None:
            lines.append(f"| {r.config.name} | failed: {r.error} | | | |")
            continue
        same = "-"
        if r.config.hook:
            kind = "shm" if r.config.backing_dir == "/dev/shm" else "hugepages"
            same = ratio(med, f"qemu-{kind}-{threads}{suffix}")
        hook = f"{statistics.median(r.hook_seconds):.2f}" if r.hook_seconds else "-"
        lines.append(f"| {r.config.name} | {med:.2f} | {hook} | "
                     f"{ratio(med, f'qemu-hugepages-{threads}{suffix}')} | {same} |")
    return "\n".join(lines)
