"""Plan a guest: which memory backends libvirt will hand QEMU, and what kvmaccel does about each.

:func:`plan_domain` is pure: (domain model, host facts, qemu.conf, limits) -> :class:`DomainPlan`.
It reads no files and mutates none of its inputs.  For every memory backend it reproduces what
libvirt's ``qemuBuildMemoryBackendProps`` generates (id, QOM type, ``mem-path``, size, share,
host-nodes, policy, prealloc and prealloc-threads), then decides whether kvmaccel populates it
and, when not, says why.  For the populated backends it asks :func:`kvmaccel.plan.limits.
distribute_helpers` (the engine's own rule) how many helper threads serve each node, and checks
free memory per node and page size.

libvirt rules reproduced here and, for names, sizes and paths, in :mod:`kvmaccel.plan.libvirt`
(``src/qemu/qemu_command.c``, ``qemu_conf.c``, ``qemu_domain.c``):

* shortname ``<id>-<first 20 characters of the name>``; aliases ``pc.ram`` (no guest NUMA),
  ``ram-node<N>`` per cell, the device alias (``dimm0``) for memory devices, whose backend id is
  ``mem<alias>``;
* sizes: NUMA cells and boot memory rounded up to 1 MiB, memory devices to 2 MiB; with NUMA
  cells the cells' sum wins over ``<memory>``;
* huge pages: a ``<page>`` whose nodeset holds the cell, else the one without a nodeset; a
  bare ``<hugepages/>`` takes the default mount's size; a size equal to the base page means none;
  mem-path ``<mount>/libvirt/qemu/<shortname>``, a *directory*;
* ``<source type='file'/>`` or any access mode: ``<memory_backing_dir>/<shortname>/<alias>``;
  ``memfd``: no path; otherwise ``memory-backend-ram``, no path;
* share from the device's access, else the cell's ``memAccess``, else ``<memoryBacking>``'s;
* prealloc with ``<allocation mode='immediate'/>``, huge pages or an nvdimm; never on a
  virtio-mem backend (QEMU preallocates plugged blocks through the device);
* host-nodes and policy from a device's ``<nodemask>`` or ``<numatune>`` (memnode, else memory;
  ``placement='auto'`` uses numad's nodeset); none in ``mode='restrictive'``.

Through kvmaccel's emulator front (``front=True``: the domain's ``<emulator>`` is the front,
:mod:`kvmaccel.setup.front`), a huge page backend's directory and a ``hugetlb`` memfd are
populated too: kvmaccel prepares ``<mount>/libvirt/qemu/<shortname>/.kvmaccel/kvmaccel-<id>`` on the
mount of the backend's page size (``.kvmaccel``: a directory of root's the hook makes at each
start, what proves to the front that the file is the hook's), and the front hands QEMU that
file, shared.  ``file`` is then that
path and ``mem_path`` stays what libvirt passes (the directory, or none for a memfd).

The plan as JSON is :func:`kvmaccel.plan.planjson.plan_to_json` (its shape is documented there).

Errors: :class:`~kvmaccel.errors.PlanError` for a nodeset naming nodes the host lacks, a huge
page size no hugetlbfs mount serves, or a path that would leave its directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
from dataclasses import dataclass, field

from ..errors import PlanError
from ..host.capacity import CapacityCheck, capacity_checks
from ..host.facts import HostFacts
from ..model.domain import Domain
from ..model.qemuconf import QemuConf
from ..model.units import align_up, format_cpu_spec, format_size
from .energy import EnergyDecision, apply_energy
from .libvirt import (
    HugetlbfsMount,
    _join,
    _Source,
    _sources,
    libvirt_hugetlbfs,
    shortname,
)
from .limits import HelperPlan, Limits, distribute_helpers, split_across_nodes
from .tuning import TunedDefault

log = logging.getLogger(__name__)

POLICY = {"strict": "bind", "preferred": "preferred", "interleave": "interleave"}
POPULATABLE_FS = ("hugetlbfs", "tmpfs")
FRONT_PREFIX = "kvmaccel-"  # the front's file for backend <id>: <dir>/.kvmaccel/kvmaccel-<id>
FRONT_DIR = ".kvmaccel"  # root's, made by the hook in the guest's directory at each start


@dataclass(frozen=True)
class BackendPlan:
    """One ``-object memory-backend-*`` and kvmaccel's decision about it."""

    backend_id: str
    alias: str
    kind: str
    guest_node: int | None
    qom_type: str
    mem_path: str | None
    mem_path_is_dir: bool
    size_bytes: int
    file_size_bytes: int
    page_size_kib: int
    filesystem: str | None  # of mem_path: "hugetlbfs", "tmpfs", "ext4"...; None without one
    share: bool | None
    prealloc: bool
    prealloc_threads: int | None
    host_nodes: tuple[int, ...] | None
    policy: str | None
    populate: bool
    skip_reason: str | None
    file_path: str | None = None  # the file kvmaccel populates (mem_path, or the front's)
    front: bool = False  # the front hands QEMU ``file_path`` in place of what libvirt passes


@dataclass(frozen=True)
class DomainPlan:
    name: str
    uuid: str | None
    domain_id: int
    shortname: str
    memory_backing_dir: str
    memory_backing_domain_dir: str
    hugepage_domain_dirs: tuple[str, ...]
    created_dirs: tuple[str, ...]
    qemu_user: str
    qemu_group: str
    backends: tuple[BackendPlan, ...]
    work_bytes: tuple[tuple[int | None, int], ...]
    helpers: HelperPlan
    capacity: tuple[CapacityCheck, ...]
    notes: tuple[str, ...]
    limits: Limits = field(default_factory=Limits)  # what the engine runs with, all caps in
    tuning: TunedDefault | None = None
    energy: EnergyDecision | None = None

    @property
    def populated(self) -> tuple[BackendPlan, ...]:
        return tuple(b for b in self.backends if b.populate)


class _Ctx:
    """What every backend decision needs; built once per plan."""

    def __init__(self, domain: Domain, host: HostFacts, qemu_conf: QemuConf,
                 mounts: tuple[HugetlbfsMount, ...], short: str,
                 auto_nodeset: frozenset[int] | None, front: bool = False) -> None:
        self.domain, self.host, self.qemu_conf, self.front = domain, host, qemu_conf, front
        self.mounts, self.short, self.auto_nodeset = mounts, short, auto_nodeset
        self.mbd_domain_dir = _join(qemu_conf.memory_backing_dir, short)

    def default_page_kib(self) -> int:
        if not self.mounts:
            raise PlanError("the guest wants huge pages but no hugetlbfs is mounted (or "
                            "qemu.conf's hugetlbfs_mount is empty)")
        return next((m for m in self.mounts if m.default), self.mounts[0]).page_size_kib

    def hugepage_dir(self, page_kib: int) -> str:
        for m in self.mounts:
            if m.page_size_kib == page_kib:
                return _join(m.path, "libvirt", "qemu", self.short)
        have = ", ".join(f"{m.path} ({m.page_size_kib} KiB)" for m in self.mounts) or "none"
        raise PlanError(f"no hugetlbfs mount serves {page_kib} KiB pages; mounts: {have}")


def _hugepage_kib(ctx: _Ctx, src: _Source) -> int | None:
    """The huge page size for ``src`` (0: the default size), or None for base pages."""
    if src.device and src.device.source_page_size_kib:
        page: int | None = src.device.source_page_size_kib
    else:
        specs = ctx.domain.memory_backing.hugepages or ()
        match = None
        if src.guest_node is not None:
            match = next((p for p in specs if p.nodeset and src.guest_node in p.nodeset), None)
        if match is None:
            match = next((p for p in specs if p.nodeset is None), None)
        if match is None:
            return None
        page = match.size_kib or 0
    if page == ctx.host.base_page_size_kib:
        return None  # libvirt: the system page size means "no huge pages"
    return page


def _numa(ctx: _Ctx, src: _Source) -> tuple[frozenset[int] | None, str, bool]:
    """(nodeset, numatune mode, nodeset unknown because numad decides) for ``src``."""
    tune = ctx.domain.numatune
    memnode = tune.memnode(src.guest_node) if tune and src.guest_node is not None else None
    mode = memnode.mode if memnode else (tune.memory.mode if tune and tune.memory else "strict")
    if src.device and src.device.source_nodemask:
        return src.device.source_nodemask, mode, False
    if tune is None:
        return None, mode, False
    if tune.memory and tune.memory.placement == "auto":
        return ctx.auto_nodeset, mode, ctx.auto_nodeset is None
    if memnode:
        return memnode.nodeset, mode, False
    return (tune.memory.nodeset if tune.memory else None), mode, False


def _check_nodes(host: HostFacts, nodes: frozenset[int], what: str) -> None:
    missing = nodes - set(host.nodes)
    if missing:
        raise PlanError(f"{what} names host node(s) {format_cpu_spec(missing)} that this host "
                        f"lacks; it has node(s) {format_cpu_spec(set(host.nodes))}")


def _backend(ctx: _Ctx, src: _Source) -> BackendPlan:
    domain, backing, dev = ctx.domain, ctx.domain.memory_backing, src.device
    access = dev.access_mode if dev else None
    if access is None and src.guest_node is not None and src.guest_node < len(domain.cells):
        access = domain.cells[src.guest_node].mem_access
    access = access or backing.access_mode
    huge = _hugepage_kib(ctx, src)
    if huge == 0:
        huge = ctx.default_page_kib()
    nvdimm_path = dev.source_path if dev and dev.model in ("nvdimm", "virtio-pmem") else None
    page_kib = huge or ctx.host.base_page_size_kib
    mem_path: str | None = None
    is_dir = False
    if src.kind == "sgx-epc":
        qom = "memory-backend-epc"
    elif backing.source_type == "memfd" and src.kind != "nvdimm":
        qom = "memory-backend-memfd"
    elif huge or nvdimm_path or access or backing.source_type == "file":
        qom = "memory-backend-file"
        if nvdimm_path:
            mem_path = nvdimm_path
        elif huge:
            mem_path, is_dir = ctx.hugepage_dir(huge), True
        else:
            mem_path = _join(ctx.mbd_domain_dir, src.alias)
    else:
        qom = "memory-backend-ram"
    prealloc = (backing.allocation_mode == "immediate" or huge is not None
                or src.kind == "nvdimm") and src.kind != "virtio-mem"
    nodes, mode, numad = _numa(ctx, src)
    if nodes is not None:
        _check_nodes(ctx.host, nodes, f"the numatune or nodemask of backend {src.backend_id}")
    bound = nodes is not None and mode != "restrictive"
    share = {"shared": True, "private": False}.get(access or "")
    fs: str | None = None
    if mem_path and not is_dir and not nvdimm_path:
        mount = ctx.host.mount_of(mem_path)
        fs = mount.fs_type if mount else None
        if mount and mount.fs_type == "hugetlbfs" and mount.page_size_kib:
            page_kib = mount.page_size_kib
    elif is_dir:
        fs = "hugetlbfs"

    front_file = None
    if ctx.front and huge and (is_dir or qom == "memory-backend-memfd"):
        # The front rewrites this backend to the prepared file, share=on (see module doc).
        # A memfd names no mount; libvirt refuses huge pages without one (it makes the
        # per-domain directories), and then so does the plan of a file backend.
        with contextlib.suppress(PlanError):
            front_file = _join(ctx.hugepage_dir(huge), FRONT_DIR, FRONT_PREFIX + src.backend_id)
            fs = "hugetlbfs"
    enable = (f"start the guest through kvmaccel's front to populate it: kvmaccel enable "
              f"{shlex.quote(domain.name)}")
    skip = None
    if src.kind == "virtio-mem":
        skip = ("virtio-mem: QEMU plugs blocks on demand and discards unplugged ones; "
                "populating the whole region would be wasted")
    elif src.kind == "sgx-epc":
        skip = "SGX EPC memory is not ordinary RAM"
    elif nvdimm_path:
        skip = f"the {src.kind} file {nvdimm_path} holds guest data; kvmaccel never touches it"
    elif qom == "memory-backend-memfd" and not huge:
        skip = ("memfd without huge pages: QEMU creates the memory itself, and libvirt grants "
                "the guest no tmpfs directory a prepared file could be handed over in (its "
                "memory_backing_dir directory exists only for <source type='file'/>); use "
                "<source type='file'/> with memory_backing_dir on tmpfs")
    elif qom == "memory-backend-memfd" and front_file is None:
        skip = f"memfd: QEMU creates the memory itself, there is no path to populate; {enable}"
    elif qom == "memory-backend-ram":
        skip = "anonymous memory: no path, QEMU allocates it itself"
    elif is_dir and front_file is None:
        skip = (f"huge pages: mem-path {mem_path} is a directory; QEMU creates and unlinks a "
                f"temporary file in it, so it cannot be populated ahead; {enable}")
    elif share is not True and front_file is None:  # the front shares whatever libvirt says
        why = "private access" if share is False else "no shared access (QEMU's default share=off)"
        skip = (f"{why}: QEMU maps the file MAP_PRIVATE and would copy every page it writes "
                "or pins out of it; set <access mode='shared'/>")
    elif nodes is not None and mode == "restrictive":
        skip = ("numatune mode 'restrictive': libvirt limits nodes only through the cgroup's "
                "cpuset.mems, so pages populated from outside it could land on other nodes")
    elif numad:
        skip = ("placement='auto': numad picks the nodes as the guest starts; they are not "
                "known here, and pages populated elsewhere would stay on the wrong nodes")
    elif fs not in POPULATABLE_FS:
        skip = (f"memory_backing_dir {ctx.qemu_conf.memory_backing_dir} is on "
                f"{fs or 'an unknown filesystem'}, not hugetlbfs or tmpfs: populating would "
                "write guest RAM to disk")
    return BackendPlan(
        backend_id=src.backend_id, alias=src.alias, kind=src.kind, guest_node=src.guest_node,
        qom_type=qom, mem_path=mem_path, mem_path_is_dir=is_dir, size_bytes=src.size_bytes,
        file_size_bytes=align_up(src.size_bytes, page_kib * 1024), page_size_kib=page_kib,
        filesystem=fs, share=share, prealloc=prealloc,
        prealloc_threads=backing.allocation_threads if prealloc else None,
        host_nodes=tuple(sorted(nodes)) if bound and nodes is not None else None,
        policy=POLICY.get(mode) if bound else None,
        populate=skip is None, skip_reason=skip,
        file_path=(front_file or mem_path) if skip is None else None,
        front=front_file is not None and skip is None,
    )


def split_by_node(backend: BackendPlan) -> dict[int | None, int]:
    """Bytes of ``backend`` per host node: all on its one node, evenly (in whole pages, the
    remainder to the first nodes) over several, or ``{None: size}`` when it is not bound."""
    return {node: length for node, _, length in split_across_nodes(
        backend.file_size_bytes, backend.host_nodes or (), backend.page_size_kib * 1024)}


def _node_key(node: int | None) -> tuple[bool, int]:
    return (node is None, node or 0)


def _capacity(host: HostFacts, backends: tuple[BackendPlan, ...]) -> tuple[CapacityCheck, ...]:
    needed: dict[tuple[int | None, int], int] = {}
    for b in backends:
        huge = b.page_size_kib > host.base_page_size_kib
        if not (b.populate or b.prealloc or huge) or b.qom_type == "memory-backend-epc":
            continue
        if b.mem_path and not b.mem_path_is_dir and not b.populate and not huge:
            continue  # a file on disk or an nvdimm: not RAM kvmaccel can count
        for node, size in split_by_node(b).items():
            key = (node, b.page_size_kib)
            needed[key] = needed.get(key, 0) + size
    return capacity_checks(host, needed)


def plan_domain(
    domain: Domain,
    host: HostFacts,
    qemu_conf: QemuConf,
    limits: Limits,
    *,
    domain_id: int | None = None,
    hugetlbfs: tuple[HugetlbfsMount, ...] | None = None,
    auto_nodeset: frozenset[int] | None = None,
    tuned: TunedDefault | None = None,
    energy: EnergyDecision | None = None,
    front: bool = False,
) -> DomainPlan:
    """Plan ``domain`` on ``host``.  Pure; raises :class:`PlanError`.

    ``domain_id`` overrides the XML's id (default: the XML's, else -1 as in
    ``virsh domxml-to-native``); ``hugetlbfs`` overrides the mounts from qemu.conf and
    ``host.mounts``; ``auto_nodeset`` is numad's answer for ``placement='auto'``.
    ``<allocation threads='N'/>`` becomes ``Limits.threads`` (the smaller one when both are set).
    ``tuned`` (from :func:`kvmaccel.plan.policy.host_policy`) gives the per-node default
    helpers when used; ``energy`` (from :func:`kvmaccel.plan.energy.decide`) may lower ``threads``
    further.  The plan's ``limits`` are the result, which the engine should run with.
    ``front``: the domain's emulator is kvmaccel's front (the caller checks the file).
    """
    did = domain_id if domain_id is not None else (
        domain.domain_id if domain.domain_id is not None else -1)
    short = shortname(domain.name, did)
    mounts = hugetlbfs if hugetlbfs is not None else libvirt_hugetlbfs(qemu_conf, host)
    ctx = _Ctx(domain, host, qemu_conf, mounts, short, auto_nodeset, front)
    backends = tuple(_backend(ctx, src) for src in _sources(domain))
    for b in backends:
        # The model refuses a 0 <memory> and 0 devices; a Domain built in code may still have
        # one, and a 0-byte populate is no plan (QEMU refuses a backend of size 0).
        if b.size_bytes <= 0:
            raise PlanError(f"{domain.name}: memory backend {b.backend_id} has size 0; give "
                            "the guest's memory a size greater than zero")

    work: dict[int | None, int] = {}
    for b in backends:
        if b.populate:
            for node, size in split_by_node(b).items():
                work[node] = work.get(node, 0) + size
    threads = domain.memory_backing.allocation_threads
    eff = limits
    reasons: list[str] = []
    if threads is not None and (limits.threads is None or threads < limits.threads):
        eff = dataclasses.replace(limits, threads=threads)
        reasons.append(f"<allocation threads='{threads}'/> in the domain XML")
    if energy is not None:
        lowered = apply_energy(eff, energy)
        if lowered is not eff:
            reasons.append(f"energy policy: {energy.reason}")
        eff = lowered
    if tuned is not None:
        if tuned.status == "used" and not eff.tuned_helpers_per_node:
            eff = dataclasses.replace(eff, tuned_helpers_per_node=tuned.helpers_per_node)
        if tuned.reason:
            reasons.append(tuned.reason)
    online = host.online_cpus
    helpers = distribute_helpers(
        work, {n: len(node.cpus & online) for n, node in host.nodes.items()}, len(online), eff,
        host.cpu_quota)
    helpers = dataclasses.replace(helpers, reasons=(*reasons, *helpers.reasons))

    hp_dirs = tuple(_join(m.path, "libvirt", "qemu", short) for m in mounts)
    created = []
    if any(b.mem_path and b.mem_path.startswith(ctx.mbd_domain_dir + "/") for b in backends):
        created.append(ctx.mbd_domain_dir)
    if any(b.mem_path_is_dir for b in backends):
        created.extend(hp_dirs)  # libvirt makes the directory on every hugetlbfs mount
    return DomainPlan(
        name=domain.name, uuid=domain.uuid, domain_id=did, shortname=short,
        memory_backing_dir=qemu_conf.memory_backing_dir,
        memory_backing_domain_dir=ctx.mbd_domain_dir, hugepage_domain_dirs=hp_dirs,
        created_dirs=tuple(created), qemu_user=qemu_conf.user, qemu_group=qemu_conf.group,
        backends=backends, work_bytes=tuple(sorted(work.items(), key=lambda kv: _node_key(kv[0]))),
        helpers=helpers, capacity=_capacity(host, backends), notes=_notes(domain),
        limits=eff, tuning=tuned, energy=energy,
    )


def _notes(domain: Domain) -> tuple[str, ...]:
    notes = []
    devices = sum(d.target_size_bytes for d in domain.memory_devices)
    if domain.cells and domain.cells_bytes + devices != domain.memory_bytes:
        notes.append(f"<memory> says {format_size(domain.memory_bytes)} but the NUMA cells "
                     f"({format_size(domain.cells_bytes)}) and memory devices "
                     f"({format_size(devices)}) add up to "
                     f"{format_size(domain.cells_bytes + devices)}: libvirt uses that sum")
    if domain.hostdevs:
        addrs = ", ".join(h.pci_address for h in domain.hostdevs)
        notes.append(f"VFIO device(s) {addrs}: QEMU pins all guest RAM at start, so every page "
                     "is allocated and zeroed before the guest runs")
    if domain.memory_backing.locked:
        notes.append("<locked/>: QEMU mlocks all guest RAM at start")
    return tuple(notes)

