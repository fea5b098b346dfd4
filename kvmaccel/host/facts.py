"""Facts about the host, read from ``/sys`` and ``/proc`` under an injectable root.

This is the only module that reads sysfs and procfs for host facts.  Every reader takes
``root`` (default ``/``) so tests can point it at a fake tree shaped exactly like a real one
(see ``tests/data/sysfs/``).  Nothing here decides policy: it only reports.

Missing optional facts (no cpufreq, no NUMA directory on a kernel built without NUMA) are a
debug line and a sensible default, not an error; an unreadable required fact raises
:class:`~kvmaccel.errors.HostError`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import HostError
from ..model.units import parse_cpu_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HugePagePool:
    """One huge page size on one node (or host-wide when ``node_id`` is None)."""

    page_size_kib: int
    nr_pages: int
    free_pages: int
    surplus_pages: int = 0
    reserved_pages: int = 0  # host-wide only: promised to mappings, not yet faulted

    @property
    def page_size_bytes(self) -> int:
        return self.page_size_kib * 1024

    @property
    def available_pages(self) -> int:
        """Free pages not already promised to an existing mapping."""
        return max(0, self.free_pages - self.reserved_pages)


@dataclass(frozen=True)
class NumaNode:
    node_id: int
    cpus: frozenset[int]
    hugepages: dict[int, HugePagePool] = field(default_factory=dict)  # by page_size_kib
    mem_total_kib: int = 0
    mem_free_kib: int = 0


@dataclass(frozen=True)
class Mount:
    path: str
    fs_type: str
    page_size_kib: int | None  # hugetlbfs: its pagesize option; None otherwise
    options: str = ""


@dataclass(frozen=True)
class CpuFreq:
    """The cpufreq driver and governor of the online CPUs (``governors``: each distinct
    governor in use, sorted).  A guest start populating memory is CPU-bound: ``powersave``
    on ``intel_pstate`` or a slow ``schedutil`` ramp shows up in the timings."""

    driver: str
    governors: tuple[str, ...]


@dataclass(frozen=True)
class CpuQuota:
    """The CPU bandwidth limit of the cgroup the calling process runs in, the tightest along
    its path: ``cpus`` = quota / period (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``), and ``source``, the file that sets it."""

    cpus: float
    source: str


@dataclass(frozen=True)
class HostFacts:
    nodes: dict[int, NumaNode]
    online_cpus: frozenset[int]
    mem_available_kib: int
    base_page_size_kib: int
    hugepages: dict[int, HugePagePool]  # host-wide pools by page_size_kib
    default_hugepage_kib: int | None
    mounts: tuple[Mount, ...]
    cpufreq: CpuFreq | None = None  # None: no cpufreq (VMs, some kernels)
    cpu_quota: CpuQuota | None = None  # None: no CPU quota on the caller's cgroup

    @property
    def hugetlbfs_mounts(self) -> tuple[Mount, ...]:
        return tuple(m for m in self.mounts if m.fs_type == "hugetlbfs")

    def mount_of(self, path: str) -> Mount | None:
        """The mount that holds ``path``: see :func:`mount_of`."""
        return mount_of(path, self.mounts)

    def node_cpus(self, node_id: int) -> frozenset[int]:
        return self.nodes[node_id].cpus

    def free_bytes(self, node: int | None, page_kib: int) -> int:
        """What a new allocation of ``page_kib`` pages on ``node`` (None: anywhere) can get
        now: for base pages, ``MemAvailable`` host-wide and the node's ``MemFree``; for huge
        pages, the pool's free pages less those reserved (host-wide) or its free pages (on a
        node: the kernel reserves per pool, not per node).  0 for a size with no pool."""
        if page_kib == self.base_page_size_kib:
            if node is None:
                return self.mem_available_kib * 1024
            return self.nodes[node].mem_free_kib * 1024
        pools = self.hugepages if node is None else self.nodes[node].hugepages
        pool = pools.get(page_kib)
        if pool is None:
            return 0
        return (pool.available_pages if node is None else pool.free_pages) * page_kib * 1024


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is ``path`` itself or a
    prefix of it ending at a ``/`` (so ``/dev/hugepages1G`` is not on ``/dev/hugepages``),
    after resolving ``path``'s symlinks (``/var/run/x`` is on ``/run``); of two mounts on the
    same point, the later one in /proc/mounts (the one on top).  None: no mount holds it
    (a list without ``/``)."""
    resolved = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts:
        point = m.path.rstrip("/") or "/"
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.path.rstrip("/") or "/")):
            best = m
    return best


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel.lstrip("/"))


def cat(path: str) -> str:
    """Return the stripped text of ``path``; raise :class:`HostError` if it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError as e:
        raise HostError(f"cannot read {path}: {e.strerror}") from e


def cat_int(path: str) -> int:
    text = cat(path)
    try:
        return int(text)
    except ValueError:
        raise HostError(f"{path} holds {text!r}, not a number") from None


def _read_pools(directory: str, *, host_wide: bool) -> dict[int, HugePagePool]:
    pools: dict[int, HugePagePool] = {}
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        log.debug("no huge page directory %s", directory)
        return pools
    for name in entries:
        m = re.fullmatch(r"hugepages-(\d+)kB", name)
        if not m:
            continue
        d = os.path.join(directory, name)
        size_kib = int(m.group(1))
        pools[size_kib] = HugePagePool(
            page_size_kib=size_kib,
            nr_pages=cat_int(os.path.join(d, "nr_hugepages")),
            free_pages=cat_int(os.path.join(d, "free_hugepages")),
            surplus_pages=cat_int(os.path.join(d, "surplus_hugepages")),
            reserved_pages=cat_int(os.path.join(d, "resv_hugepages")) if host_wide else 0,
        )
    return pools


def read_meminfo(root: str = "/", rel: str = "proc/meminfo") -> dict[str, int]:
    """Return /proc/meminfo (or a node's meminfo) as ``{key: kib}``; HugePages_* are counts."""
    values: dict[str, int] = {}
    for line in cat(_path(root, rel)).splitlines():
        # Node files read "Node 0 MemTotal:  123 kB"; /proc/meminfo "MemTotal:  123 kB".
        m = re.match(r"^(?:Node \d+ )?([\w()]+):\s+(\d+)", line)
        if m:
            values[m.group(1)] = int(m.group(2))
    return values


def read_online_cpus(root: str = "/") -> frozenset[int]:
    return parse_cpu_spec(cat(_path(root, "sys/devices/system/cpu/online")))


def read_nodes(root: str = "/") -> dict[int, NumaNode]:
    """Return the NUMA nodes that have memory or CPUs, with their CPUs and huge page pools.

    A kernel without NUMA has no ``/sys/devices/system/node``: the host is then one node 0
    holding every online CPU.
    """
    base = _path(root, "sys/devices/system/node")
    if not os.path.isdir(base):
        log.debug("no %s: treating the host as one node", base)
        return {
            0: NumaNode(0, read_online_cpus(root), _read_pools(
                _path(root, "sys/kernel/mm/hugepages"), host_wide=False))
        }
    online = parse_cpu_spec(cat(os.path.join(base, "online")))
    nodes: dict[int, NumaNode] = {}
    for node_id in sorted(online):
        d = os.path.join(base, f"node{node_id}")
        cpus = parse_cpu_spec(cat(os.path.join(d, "cpulist")))
        mem = read_meminfo(root, os.path.relpath(os.path.join(d, "meminfo"), root))
        nodes[node_id] = NumaNode(
            node_id=node_id,
            cpus=cpus,
            hugepages=_read_pools(os.path.join(d, "hugepages"), host_wide=False),
            mem_total_kib=mem.get("MemTotal", 0),
            mem_free_kib=mem.get("MemFree", 0),
        )
    return nodes


_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount(text: str) -> str:
    return _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(root: str = "/", default_hugepage_kib: int | None = None) -> tuple[Mount, ...]:
    """Return mounts from /proc/mounts; a hugetlbfs mount's page size is its ``pagesize=``
    option, or the default huge page size when the option is absent (kernel < 4.x style)."""
    mounts: list[Mount] = []
    for line in cat(_path(root, "proc/mounts")).splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        _, path, fs_type, options = fields[:4]
        page_kib: int | None = None
        if fs_type == "hugetlbfs":
            m = re.search(r"(?:^|,)pagesize=(\d+)([KMG])", options)
            if m:
                page_kib = int(m.group(1)) << {"K": 0, "M": 10, "G": 20}[m.group(2)]
            else:
                page_kib = default_hugepage_kib
        mounts.append(Mount(_unescape_mount(path), fs_type, page_kib, options))
    return tuple(mounts)


def read_cpu_quota(root: str = "/", mounts: tuple[Mount, ...] | None = None
                   ) -> CpuQuota | None:
    """The CPU quota of this process's cgroup (``<root>/proc/self/cgroup``), checked at
    every level from its cgroup up to the hierarchy's root, v2 and v1 alike; None when no
    level has one, or the files cannot be read (no cgroup filesystem: a debug matter)."""
    try:
        lines = cat(_path(root, "proc/self/cgroup")).splitlines()
    except HostError:
        return None
    mounts = read_mounts(root) if mounts is None else mounts
    best: CpuQuota | None = None
    for line in lines:
        hierarchy, controllers, cgroup = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            bases = [m.path for m in mounts if m.fs_type == "cgroup2"]
        elif "cpu" in controllers.split(","):
            bases = [m.path for m in mounts
                     if m.fs_type == "cgroup" and "cpu" in m.options.split(",")]
        else:
            continue
        for base in bases:
            top = _path(root, base)
            level = os.path.normpath(_path(top, cgroup))
            while level.startswith(top):
                quota = _quota_at(level)
                if quota is not None and (best is None or quota.cpus < best.cpus):
                    best = quota
                if level == top:
                    break
                level = os.path.dirname(level)
    return best


def _quota_at(directory: str) -> CpuQuota | None:
    v2 = _cat_optional(os.path.join(directory, "cpu.max"))
    if v2 is not None:
        quota_text, _, period_text = v2.partition(" ")
        if quota_text == "max" or not (quota_text.isdigit() and period_text.isdigit()):
            return None
        return CpuQuota(int(quota_text) / int(period_text), os.path.join(directory, "cpu.max"))
    quota = _cat_optional(os.path.join(directory, "cpu.cfs_quota_us"))
    period = _cat_optional(os.path.join(directory, "cpu.cfs_period_us"))
    if quota is None or period is None or not quota.isdigit() or not period.isdigit():
        return None  # -1: no quota
    return CpuQuota(int(quota) / int(period), os.path.join(directory, "cpu.cfs_quota_us"))


def read_cpufreq(root: str = "/", cpus: frozenset[int] | None = None) -> CpuFreq | None:
    """Return the cpufreq driver and governors of ``cpus`` (default: the online CPUs), or None
    when the host has no cpufreq (a debug line: most VMs have none)."""
    base = _path(root, "sys/devices/system/cpu")
    ids = sorted(cpus if cpus is not None else read_online_cpus(root))
    driver = ""
    governors: set[str] = set()
    for cpu in ids:
        d = os.path.join(base, f"cpu{cpu}", "cpufreq")
        if not os.path.isdir(d):
            continue
        driver = driver or cat(os.path.join(d, "scaling_driver"))
        governors.add(cat(os.path.join(d, "scaling_governor")))
    if not driver:
        log.debug("no cpufreq under %s", base)
        return None
    return CpuFreq(driver, tuple(sorted(governors)))


def _cat_optional(path: str) -> str | None:
    """The stripped text of an optional file, None when it is missing or unreadable."""
    try:
        return cat(path)
    except HostError:
        return None


def read_cpu_model(root: str = "/") -> str:
    """The first ``model name`` in /proc/cpuinfo (x86); ``""`` when there is none (a debug line:
    arm64 kernels print no model name)."""
    text = _cat_optional(_path(root, "proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return " ".join(value.split())
    log.debug("no model name in %s", _path(root, "proc/cpuinfo"))
    return ""


def read_kernel_release(root: str = "/") -> str:
    """The running kernel's release (``/proc/sys/kernel/osrelease``, what ``uname -r`` says).
    Raises :class:`HostError` when it cannot be read."""
    return cat(_path(root, "proc/sys/kernel/osrelease"))


@dataclass(frozen=True)
class CpuEnergy:
    """One online CPU's cpufreq governor and energy_performance_preference (EPP).

    ``epp`` is None when the driver has none: EPP exists with intel_pstate on HWP CPUs
    (Linux 4.10) and amd-pstate in its active mode (Linux 6.3).  Its values are
    ``default``, ``performance``, ``balance_performance``, ``balance_power`` and ``power``.
    """

    cpu: int
    governor: str
    epp: str | None


@dataclass(frozen=True)
class PowerSupply:
    """One ``/sys/class/power_supply/<name>`` entry, as the kernel reports it.

    ``supply_type``: ``Mains``, ``Battery``, ``UPS``, ``USB``...; ``online`` (mains, USB):
    whether it supplies power; ``status`` (batteries): ``Charging``, ``Discharging``,
    ``Full``, ``Not charging`` or ``Unknown``; ``scope``: ``System``, or ``Device`` for the
    battery of a peripheral (a wireless mouse), which says nothing about the host's power.
    """

    name: str
    supply_type: str
    online: bool | None = None
    status: str | None = None
    capacity_percent: int | None = None
    scope: str | None = None


@dataclass(frozen=True)
class EnergyFacts:
    """What the energy policy looks at: every online CPU with cpufreq, and every power supply.
    A VM without cpufreq and a server without batteries have empty tuples."""

    cpus: tuple[CpuEnergy, ...] = ()
    supplies: tuple[PowerSupply, ...] = ()


def read_cpu_energy(root: str = "/", cpus: frozenset[int] | None = None
                    ) -> tuple[CpuEnergy, ...]:
    """Governor and EPP of ``cpus`` (default: the online CPUs) that have cpufreq."""
    base = _path(root, "sys/devices/system/cpu")
    out: list[CpuEnergy] = []
    for cpu in sorted(cpus if cpus is not None else read_online_cpus(root)):
        d = os.path.join(base, f"cpu{cpu}", "cpufreq")
        if not os.path.isdir(d):
            continue
        governor = _cat_optional(os.path.join(d, "scaling_governor")) or ""
        out.append(CpuEnergy(cpu, governor,
                             _cat_optional(os.path.join(d, "energy_performance_preference"))))
    return tuple(out)


def read_power_supplies(root: str = "/") -> tuple[PowerSupply, ...]:
    """Every entry of ``/sys/class/power_supply`` (symbolic links to the devices on a real
    host), sorted by name.  No such directory, or an empty one, is a host without them."""
    base = _path(root, "sys/class/power_supply")
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        log.debug("no %s", base)
        return ()
    supplies: list[PowerSupply] = []
    for name in names:
        d = os.path.join(base, name)
        online = _cat_optional(os.path.join(d, "online"))
        capacity = _cat_optional(os.path.join(d, "capacity"))
        supplies.append(PowerSupply(
            name=name,
            supply_type=_cat_optional(os.path.join(d, "type")) or "Unknown",
            online=None if online is None or not online.isdigit() else int(online) > 0,
            status=_cat_optional(os.path.join(d, "status")),
            capacity_percent=int(capacity) if capacity and capacity.isdigit() else None,
            scope=_cat_optional(os.path.join(d, "scope")),
        ))
    return tuple(supplies)


def read_energy(root: str = "/") -> EnergyFacts:
    """Governors, EPPs and power supplies, read now (they change while the host runs)."""
    return EnergyFacts(read_cpu_energy(root), read_power_supplies(root))


def read_host(root: str = "/") -> HostFacts:
    """Read every host fact kvmaccel plans with.  Raises :class:`HostError`."""
    meminfo = read_meminfo(root)
    default_huge = meminfo.get("Hugepagesize") or None
    mounts = read_mounts(root, default_huge)
    return HostFacts(
        nodes=read_nodes(root),
        online_cpus=read_online_cpus(root),
        mem_available_kib=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        base_page_size_kib=os.sysconf("SC_PAGE_SIZE") // 1024,
        hugepages=_read_pools(_path(root, "sys/kernel/mm/hugepages"), host_wide=True),
        default_hugepage_kib=default_huge,
        mounts=mounts,
        cpufreq=read_cpufreq(root),
        cpu_quota=read_cpu_quota(root, mounts),
    )


def runnable_tasks(root: str = "/") -> int:
    """Tasks runnable on the host at this instant (``procs_running`` in /proc/stat), the
    reading thread included."""
    for line in cat(_path(root, "proc/stat")).splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    raise HostError(f"no procs_running in {_path(root, 'proc/stat')}")


def allowed_cpus() -> frozenset[int]:
    """CPUs this process may run on (its affinity mask, which a cgroup cpuset narrows)."""
    return frozenset(os.sched_getaffinity(0))


@dataclass(frozen=True)
class SecurityFacts:
    """The mandatory access control modules libvirt confines QEMU with.  None: the module is
    not in this kernel (its sysfs file is missing)."""

    apparmor_enabled: bool | None
    selinux_enforcing: bool | None


def read_security(root: str = "/") -> SecurityFacts:
    """AppArmor (``/sys/module/apparmor/parameters/enabled``, ``Y``/``N``) and SELinux
    (``/sys/fs/selinux/enforce``, ``1`` enforcing, ``0`` permissive).  Never raises."""
    apparmor = _cat_optional(_path(root, "sys/module/apparmor/parameters/enabled"))
    selinux = _cat_optional(_path(root, "sys/fs/selinux/enforce"))
    return SecurityFacts(
        apparmor_enabled=None if apparmor is None else apparmor.upper().startswith("Y"),
        selinux_enforcing=None if selinux is None else selinux == "1")
