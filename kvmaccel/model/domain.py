"""Domain XML -> a read-only, typed model of what matters for guest memory.

Layering rule: this module turns XML into objects and nothing else.  It applies no policy
(no paths, no alignment, no backend choice; that is :mod:`kvmaccel.plan.planner`), and it is the
only module in kvmaccel that parses domain XML (with :mod:`kvmaccel.model.domxml`, the
element-level reading underneath, and :mod:`kvmaccel.model.domedit`, which finds where to
edit ``<emulator>``).

Sizes are bytes, converted with libvirt's own unit rules (``virScaleInteger``):
``b``/``byte``/``bytes``; ``KB``/``MB``/``GB``/``TB``/``PB``/``EB`` are powers of 1000;
``k``/``KiB``, ``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB``, ``P``/``PiB``, ``E``/``EiB`` powers
of 1024; case-insensitive; KiB when ``unit`` is absent.  Like libvirt, a size is then
rounded up to whole KiB.

Every error is a :class:`~kvmaccel.errors.DomainError` whose ``element`` and ``line`` point at the
offending XML element.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import DomainError
from .domxml import _alias, _choice, _err, _int, _nodes, _parse_tree, _size, _yesno

log = logging.getLogger(__name__)

ACCESS_MODES = ("shared", "private")
SOURCE_TYPES = ("file", "anonymous", "memfd")
NUMATUNE_MODES = ("strict", "preferred", "interleave", "restrictive")
MEMORY_MODELS = ("dimm", "nvdimm", "virtio-mem", "virtio-pmem", "sgx-epc")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class NumaCell:
    """``<cpu><numa><cell>``: one guest NUMA node."""

    cell_id: int
    cpus: frozenset[int]
    size_bytes: int
    mem_access: str | None  # "shared" | "private" | None (inherit)
    discard: bool | None
    line: int | None = None


@dataclass(frozen=True)
class HugePageSpec:
    """``<memoryBacking><hugepages><page>``; ``size_kib`` None is a bare ``<hugepages/>``
    (libvirt's default huge page size); ``nodeset`` None applies to every guest cell."""

    size_kib: int | None
    nodeset: frozenset[int] | None


@dataclass(frozen=True)
class MemoryBacking:
    """``<memoryBacking>``.  ``hugepages`` is None without a ``<hugepages>`` element."""

    hugepages: tuple[HugePageSpec, ...] | None = None
    nosharepages: bool = False
    locked: bool = False
    source_type: str | None = None  # "file" | "anonymous" | "memfd"
    access_mode: str | None = None  # "shared" | "private"
    allocation_mode: str | None = None  # "immediate" | "ondemand"
    allocation_threads: int | None = None
    discard: bool = False


@dataclass(frozen=True)
class NumatuneMemory:
    """``<numatune><memory>``: ``placement`` is resolved as libvirt does (``auto`` when there
    is no nodeset and ``<vcpu placement='auto'>``); ``nodeset`` is None with ``auto``."""

    mode: str
    placement: str  # "static" | "auto"
    nodeset: frozenset[int] | None


@dataclass(frozen=True)
class MemNode:
    """``<numatune><memnode>``: the host nodes of one guest cell."""

    cell_id: int
    mode: str
    nodeset: frozenset[int]
    line: int | None = None


@dataclass(frozen=True)
class Numatune:
    memory: NumatuneMemory | None
    memnodes: tuple[MemNode, ...] = ()

    def memnode(self, cell_id: int) -> MemNode | None:
        return next((m for m in self.memnodes if m.cell_id == cell_id), None)


@dataclass(frozen=True)
class MemoryDevice:
    """``<devices><memory>``: dimm, nvdimm, virtio-mem, virtio-pmem, sgx-epc."""

    model: str
    alias: str | None
    access_mode: str | None
    discard: bool | None
    source_page_size_kib: int | None
    source_nodemask: frozenset[int] | None
    source_path: str | None
    target_size_bytes: int
    target_node: int | None
    requested_bytes: int | None = None
    block_bytes: int | None = None
    line: int | None = None


@dataclass(frozen=True)
class HostDev:
    """A PCI ``<hostdev>`` (VFIO pass-through): address as ``dddd:bb:ss.f``."""

    pci_address: str
    managed: bool
    line: int | None = None


@dataclass(frozen=True)
class Domain:
    """The memory-relevant parts of one libvirt domain."""

    name: str
    uuid: str | None
    domain_id: int | None  # the live id (``<domain id=...>``), None for a defined domain
    domain_type: str
    memory_bytes: int
    current_memory_bytes: int | None
    max_memory_bytes: int | None
    max_memory_slots: int | None
    cells: tuple[NumaCell, ...]
    memory_backing: MemoryBacking
    numatune: Numatune | None
    memory_devices: tuple[MemoryDevice, ...]
    hostdevs: tuple[HostDev, ...]
    vcpus: int
    vcpu_placement: str  # "static" | "auto"
    vcpu_cpuset: frozenset[int] | None
    emulatorpin_cpuset: frozenset[int] | None
    emulator: str | None = None  # ``<devices><emulator>``: the program libvirt runs as QEMU

    @property
    def cells_bytes(self) -> int:
        return sum(c.size_bytes for c in self.cells)


# --------------------------------------------------------------------------- sections


def _parse_name(root: ET.Element) -> str:
    el = root.find("name")
    if el is None or not (el.text or "").strip():
        raise _err(root, "missing <name>")
    name = (el.text or "").strip()
    # libvirt refuses '/' in names (virDomainDefParseXML); kvmaccel builds file paths from the
    # name, so it also refuses the components that would climb out of a directory.
    if "/" in name or "\0" in name or name in (".", ".."):
        raise _err(el, f"domain name {name!r} cannot be used in a path: "
                       "it must not be '.' or '..' nor contain '/' or NUL")
    return name


def _parse_cells(root: ET.Element) -> tuple[NumaCell, ...]:
    cells: list[NumaCell] = []
    for el in root.findall("cpu/numa/cell"):
        cell_id = _int(el, el.get("id", str(len(cells))), "cell id")
        memory = el.get("memory")
        if memory is None or not _int(el, memory, "memory"):
            raise _err(el, "a cell needs a memory attribute greater than zero")
        cells.append(NumaCell(
            cell_id=cell_id,
            cpus=_nodes(el, el.get("cpus"), "cpus") if el.get("cpus") else frozenset(),
            size_bytes=_size(el, value=memory),
            mem_access=_choice(el, "memAccess", ACCESS_MODES),
            discard=_yesno(el, "discard"),
            line=getattr(el, "line", None),
        ))
    ids = [c.cell_id for c in cells]
    if sorted(ids) != list(range(len(cells))):
        numa = root.find("cpu/numa")
        assert numa is not None
        raise _err(numa, f"cell ids {ids} must be 0 to {len(cells) - 1}, each once")
    return tuple(sorted(cells, key=lambda c: c.cell_id))


def _parse_backing(root: ET.Element) -> MemoryBacking:
    el = root.find("memoryBacking")
    if el is None:
        return MemoryBacking()
    hugepages: tuple[HugePageSpec, ...] | None = None
    hp = el.find("hugepages")
    if hp is not None:
        pages = []
        for page in hp.findall("page"):
            # libvirt 9.0: "hugepage size can't be zero"
            size = _size(page, value=page.get("size"), positive=True)
            nodeset = page.get("nodeset")
            pages.append(HugePageSpec(
                size_kib=size // 1024,
                nodeset=_nodes(page, nodeset, "nodeset") if nodeset is not None else None,
            ))
        hugepages = tuple(pages) if pages else (HugePageSpec(None, None),)
    source = el.find("source")
    access = el.find("access")
    alloc = el.find("allocation")
    threads = alloc.get("threads") if alloc is not None else None
    return MemoryBacking(
        hugepages=hugepages,
        nosharepages=el.find("nosharepages") is not None,
        locked=el.find("locked") is not None,
        source_type=_choice(source, "type", SOURCE_TYPES) if source is not None else None,
        access_mode=_choice(access, "mode", ACCESS_MODES) if access is not None else None,
        allocation_mode=(
            _choice(alloc, "mode", ("immediate", "ondemand")) if alloc is not None else None
        ),
        allocation_threads=(
            _int(alloc, threads, "threads") if alloc is not None and threads is not None else None
        ),
        discard=el.find("discard") is not None,
    )


def _parse_numatune(root: ET.Element, vcpu_placement: str) -> Numatune | None:
    el = root.find("numatune")
    if el is None:
        if vcpu_placement == "auto":  # libvirt implies <memory placement='auto'/>
            return Numatune(NumatuneMemory("strict", "auto", None))
        return None
    memory: NumatuneMemory | None = None
    mem_el = el.find("memory")
    if mem_el is not None:
        mode = _choice(mem_el, "mode", NUMATUNE_MODES) or "strict"
        placement = _choice(mem_el, "placement", ("static", "auto"))
        text = mem_el.get("nodeset")
        nodeset = _nodes(mem_el, text, "nodeset") if text is not None else None
        if placement is None:
            placement = "static" if nodeset is not None or vcpu_placement == "static" else "auto"
        if placement == "static" and nodeset is None:
            raise _err(mem_el, "placement 'static' needs a nodeset")
        memory = NumatuneMemory(mode, placement, nodeset if placement == "static" else None)
    elif vcpu_placement == "auto":
        memory = NumatuneMemory("strict", "auto", None)
    memnodes = []
    for node in el.findall("memnode"):
        memnodes.append(MemNode(
            cell_id=_int(node, node.get("cellid"), "cellid"),
            mode=_choice(node, "mode", NUMATUNE_MODES) or "strict",
            nodeset=_nodes(node, node.get("nodeset"), "nodeset"),
            line=getattr(node, "line", None),
        ))
    return Numatune(memory, tuple(memnodes))


def _parse_memory_device(el: ET.Element) -> MemoryDevice:
    model = _choice(el, "model", MEMORY_MODELS)
    if model is None:
        raise _err(el, "missing model attribute")
    source = el.find("source")
    target = el.find("target")
    if target is None or target.find("size") is None:
        raise _err(el, "missing <target><size>")
    size_el = target.find("size")
    node_el = target.find("node")
    pagesize = source.find("pagesize") if source is not None else None
    nodemask = source.find("nodemask") if source is not None else None
    path = source.find("path") if source is not None else None
    requested = target.find("requested")
    block = target.find("block")
    assert size_el is not None
    return MemoryDevice(
        model=model,
        alias=_alias(el),
        access_mode=_choice(el, "access", ACCESS_MODES),
        discard=_yesno(el, "discard"),
        source_page_size_kib=_size(pagesize) // 1024 if pagesize is not None else None,
        source_nodemask=(
            _nodes(nodemask, nodemask.text, "nodemask") if nodemask is not None else None
        ),
        source_path=(path.text or "").strip() if path is not None else None,
        # QEMU refuses a backend of size 0 ("can't create backend with size 0").
        target_size_bytes=_size(size_el, positive=True),
        target_node=_int(node_el, node_el.text, "node") if node_el is not None else None,
        requested_bytes=_size(requested) if requested is not None else None,
        block_bytes=_size(block) if block is not None else None,
        line=getattr(el, "line", None),
    )


def _parse_hostdevs(root: ET.Element) -> tuple[HostDev, ...]:
    result = []
    for el in root.findall("devices/hostdev"):
        if el.get("type") != "pci":
            continue
        addr = el.find("source/address")
        if addr is None:
            raise _err(el, "PCI hostdev without <source><address>")
        try:
            parts = [int(addr.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")]
        except ValueError:
            raise _err(addr, "PCI address fields must be numbers like 0x41") from None
        result.append(HostDev(
            pci_address="{:04x}:{:02x}:{:02x}.{:x}".format(*parts),
            managed=el.get("managed", "no") == "yes",
            line=getattr(el, "line", None),
        ))
    return tuple(result)


def parse_domain(data: bytes | str) -> Domain:
    """Parse domain XML (bytes or text) into a :class:`Domain`.

    Checks what libvirt itself refuses and what kvmaccel cannot plan around: malformed XML,
    unknown units, sizes above 8 EiB, a missing or 0 ``<memory>`` (without NUMA cells), a 0
    huge page size or memory device, NUMA cells adding up to more
    than ``<memory>``, a ``<memnode>`` or memory device naming a missing cell, and names
    that are unsafe in a path.  Raises :class:`DomainError`.
    """
    root = _parse_tree(data.encode() if isinstance(data, str) else data)
    if root.tag != "domain":
        raise _err(root, "the root element must be <domain>")
    name = _parse_name(root)
    cells = _parse_cells(root)
    mem_el = root.find("memory")
    if mem_el is None and not cells:
        raise _err(root, "missing <memory>: give the guest's size there or in NUMA cells")
    # Without NUMA cells the guest's size is <memory>; libvirt 9.0 refuses 0 there ("Memory
    # size must be specified via <memory> or in the <numa> configuration").
    memory_bytes = (_size(mem_el, positive=not cells) if mem_el is not None
                    else sum(c.size_bytes for c in cells))
    cur_el = root.find("currentMemory")
    max_el = root.find("maxMemory")
    vcpu_el = root.find("vcpu")
    vcpu_placement = "static"
    vcpu_cpuset: frozenset[int] | None = None
    vcpus = 1
    if vcpu_el is not None:
        vcpu_placement = _choice(vcpu_el, "placement", ("static", "auto")) or "static"
        if vcpu_el.get("cpuset"):
            vcpu_cpuset = _nodes(vcpu_el, vcpu_el.get("cpuset"), "cpuset")
        vcpus = _int(vcpu_el, vcpu_el.text, "vcpu count")
    pin_el = root.find("cputune/emulatorpin")
    devices = tuple(_parse_memory_device(el) for el in root.findall("devices/memory"))
    domain_id = root.get("id")
    domain = Domain(
        name=name,
        uuid=(root.findtext("uuid") or "").strip() or None,
        domain_id=int(domain_id) if domain_id and re.fullmatch(r"-?\d+", domain_id) else None,
        domain_type=root.get("type", "kvm"),
        memory_bytes=memory_bytes,
        current_memory_bytes=_size(cur_el) if cur_el is not None else None,
        max_memory_bytes=_size(max_el) if max_el is not None else None,
        max_memory_slots=(
            _int(max_el, max_el.get("slots"), "slots")
            if max_el is not None and max_el.get("slots") is not None else None
        ),
        cells=cells,
        memory_backing=_parse_backing(root),
        numatune=_parse_numatune(root, vcpu_placement),
        memory_devices=devices,
        hostdevs=_parse_hostdevs(root),
        vcpus=vcpus,
        vcpu_placement=vcpu_placement,
        vcpu_cpuset=vcpu_cpuset,
        emulatorpin_cpuset=(
            _nodes(pin_el, pin_el.get("cpuset"), "cpuset") if pin_el is not None else None
        ),
        emulator=(root.findtext("devices/emulator") or "").strip() or None,
    )
    _check(root, domain)
    return domain


def _check(root: ET.Element, domain: Domain) -> None:
    """Consistency checks that need more than one element (libvirt's
    ``virDomainDefPostParseMemory`` and numatune parsing refuse the same things)."""
    mem_el = root.find("memory")
    devices = sum(d.target_size_bytes for d in domain.memory_devices)
    if domain.cells:
        # libvirt replaces <memory> by the cells' sum plus the memory devices, in either
        # direction: its own tests have cells below <memory> (hugepages-numa-default) and above
        # it (fd-memory-numa-topology2).  kvmaccel does the same and only says so.
        if domain.cells_bytes + devices != domain.memory_bytes:
            log.info("<memory> is %d KiB; libvirt uses the cells (%d KiB) plus devices (%d KiB)",
                     domain.memory_bytes >> 10, domain.cells_bytes >> 10, devices >> 10)
        total = domain.cells_bytes + devices
    else:
        assert mem_el is not None
        if devices > domain.memory_bytes:
            raise _err(mem_el, f"the memory devices add up to {devices >> 10} KiB, more than "
                               f"<memory> {domain.memory_bytes >> 10} KiB")
        total = domain.memory_bytes
    if domain.max_memory_bytes is not None and total > domain.max_memory_bytes:
        el = root.find("maxMemory")
        assert el is not None
        what = "the NUMA cells and memory devices" if domain.cells else "<memory>"
        raise _err(el, f"{what} add up to {total >> 10} KiB, more than <maxMemory> "
                       f"{domain.max_memory_bytes >> 10} KiB; make them agree")
    ncells = len(domain.cells)
    if domain.numatune:
        for mn in domain.numatune.memnodes:
            if mn.cell_id >= ncells:
                raise DomainError(
                    f"<memnode> at line {mn.line}: cellid {mn.cell_id} names no guest NUMA cell "
                    f"(the guest has {ncells})", element="memnode", line=mn.line)
    for dev in domain.memory_devices:
        if dev.target_node is not None and ncells and dev.target_node >= ncells:
            raise DomainError(
                f"<memory model='{dev.model}'> at line {dev.line}: target node "
                f"{dev.target_node} names no guest NUMA cell (the guest has {ncells})",
                element="memory", line=dev.line)
    if domain.memory_backing.hugepages is not None and (
            domain.memory_backing.allocation_mode == "ondemand"):
        el = root.find("memoryBacking/allocation")
        assert el is not None
        raise _err(el, "hugepages cannot be allocated 'ondemand' (libvirt refuses it)")
