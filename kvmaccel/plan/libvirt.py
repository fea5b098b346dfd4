"""What libvirt names and where it puts things: the rules the planner reproduces to know, for
a guest, exactly which files and directories libvirt hands QEMU.

From ``src/qemu/qemu_conf.c``, ``qemu_command.c`` and ``qemu_domain.c`` (and checked against
libvirt's own test output, ``tests/data/libvirt-cases/``):

* shortname ``<id>-<first 20 characters of the name>`` (:func:`shortname`);
* one backend per NUMA cell (``ram-node<N>``), or ``pc.ram`` without guest NUMA, then one per
  memory device, named after the device alias (``dimm0``; backend id ``mem<alias>``); cells
  and boot memory rounded up to 1 MiB, devices to 2 MiB (virtio-mem: its block size)
  (:func:`_sources`);
* the hugetlbfs mounts libvirt uses: qemu.conf's ``hugetlbfs_mount``, else every mounted one
  (:func:`libvirt_hugetlbfs`);
* paths are built under a directory and never leave it (:func:`_join`); a path's filesystem
  is that of the mount that holds it (:func:`kvmaccel.host.facts.mount_of`).

The underscored names are the planner's (:mod:`kvmaccel.plan.planner`), not for other layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PlanError
from ..host.facts import HostFacts
from ..model.domain import Domain, MemoryDevice
from ..model.qemuconf import QemuConf
from ..model.units import MIB, align_up

SHORTNAME_MAX_CHARS = 20


@dataclass(frozen=True)
class HugetlbfsMount:
    """A hugetlbfs mount as libvirt's QEMU driver sees it."""

    path: str
    page_size_kib: int
    default: bool


def shortname(name: str, domain_id: int) -> str:
    """libvirt's ``virDomainDefGetShortName``: ``<id>-`` and the first 20 characters.

    libvirt cuts multibyte names at 20 wide characters in a UTF-8 locale (and at 20 bytes in
    the C locale); kvmaccel follows the UTF-8 rule, which is also the byte rule for ASCII.
    """
    return f"{domain_id}-{name[:SHORTNAME_MAX_CHARS]}"


def _join(base: str, *parts: str) -> str:
    """``base/part/...``, refusing any part that would leave ``base``.  Raises PlanError."""
    for part in parts:
        if not part or "/" in part or "\0" in part or part in (".", ".."):
            raise PlanError(f"{part!r} cannot be used as a file name under {base}: it would "
                            "put guest memory outside that directory")
    return "/".join([base.rstrip("/"), *parts])


def libvirt_hugetlbfs(qemu_conf: QemuConf, host: HostFacts) -> tuple[HugetlbfsMount, ...]:
    """The hugetlbfs mounts libvirt uses: qemu.conf's ``hugetlbfs_mount``, else /proc/mounts.

    Raises :class:`PlanError` when qemu.conf names a path that is not a hugetlbfs mount.
    """
    mounts = {m.path: m for m in host.hugetlbfs_mounts}
    if qemu_conf.hugetlbfs_mount is None:
        return tuple(
            HugetlbfsMount(m.path, m.page_size_kib or 0,
                           m.page_size_kib == host.default_hugepage_kib)
            for m in host.hugetlbfs_mounts
        )
    result = []
    for i, path in enumerate(qemu_conf.hugetlbfs_mount):
        m = mounts.get(os.path.normpath(path))
        if m is None or not m.page_size_kib:
            raise PlanError(f"qemu.conf hugetlbfs_mount {path} is not a hugetlbfs mount here; "
                            f"mounted: {', '.join(mounts) or 'none'}")
        # qemu_conf.c passes `i != 0` as the default flag: with a list, the *second* entry is
        # the default (libvirt 6.x to 11.x); with one entry, that one.
        result.append(HugetlbfsMount(m.path, m.page_size_kib, i != 0))
    return tuple(result)


@dataclass(frozen=True)
class _Source:
    backend_id: str
    alias: str
    kind: str
    guest_node: int | None
    size_bytes: int
    device: MemoryDevice | None = None


def _sources(domain: Domain) -> list[_Source]:
    devices_bytes = sum(d.target_size_bytes for d in domain.memory_devices)
    if domain.cells:
        out = [_Source(f"ram-node{c.cell_id}", f"ram-node{c.cell_id}", "cell", c.cell_id,
                       align_up(c.size_bytes, MIB)) for c in domain.cells]
    else:
        out = [_Source("pc.ram", "pc.ram", "system", None,
                       align_up(domain.memory_bytes - devices_bytes, MIB))]
    counters: dict[str, int] = {}
    prefixes = {"dimm": "dimm", "nvdimm": "nvdimm", "virtio-mem": "virtiomem",
                "virtio-pmem": "virtiopmem", "sgx-epc": "epc"}
    for dev in domain.memory_devices:
        prefix = prefixes[dev.model]
        alias = dev.alias or f"{prefix}{counters.get(prefix, 0)}"
        counters[prefix] = counters.get(prefix, 0) + 1
        align = dev.block_bytes if dev.model == "virtio-mem" and dev.block_bytes else 2 * MIB
        out.append(_Source(f"mem{alias}", alias, dev.model, dev.target_node,
                           align_up(dev.target_size_bytes, align), dev))
    return out
