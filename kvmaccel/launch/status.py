"""``kvmaccel status``: what a running QEMU's memory backends hold, and on which nodes.

For a QEMU process it reads the backends from the process's own command line
(``/proc/PID/cmdline``, :func:`kvmaccel.launch.qemuargs.parse_qemu_argv`), finds each one's
mapping in ``/proc/PID/smaps`` and ``/proc/PID/numa_maps``, and reports:

* ``mapped_bytes``: what QEMU has in its page tables (smaps ``Rss`` plus ``Shared_Hugetlb`` and
  ``Private_Hugetlb``: hugetlb pages are not counted in ``Rss``);
* ``allocated_bytes``: for file and memfd backends, the pages the file holds (``st_blocks`` of
  ``/proc/PID/map_files/START-END``, which works for unlinked files and memfds).  A backend
  kvmaccel populated and QEMU started with ``prealloc=off`` is fully allocated but only mapped
  where the guest has touched it;
* ``pages_per_node``: numa_maps' ``N<node>=<pages>`` (of the mapped pages only: the kernel does
  not say where unmapped file pages are) and the policy it shows (``bind:0``);
* the nodes asked for (the backend's host-nodes, or a domain plan's), and whether any mapped
  page lies elsewhere.

Mappings are matched to backends by file identity (a file, ``/proc/self/fd/N``), by QEMU's name
for the temporary file in a ``mem-path`` directory (``<dir>/qemu_back_mem.*``), by ``/memfd:``
name, or (anonymous RAM) by size alone: two anonymous backends of one size may be swapped.
Needs read access to the process's /proc files (root, or the same user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import HostError, ProcessGoneError, UsageError
from ..host import proc as host_proc
from ..host.proc import PROC
from .objargs import MEMFD
from .qemuargs import MemoryBackend, parse_qemu_argv

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class VmArea:
    """One mapping of a process, from smaps (sizes in bytes) joined with numa_maps."""

    start: int
    end: int
    path: str  # as /proc shows it ("" for anonymous, "... (deleted)" for unlinked files)
    inode: int
    mapped_bytes: int
    kernel_page_kib: int
    pages_per_node: Mapping[int, int] = field(default_factory=dict)
    numa_policy: str = ""

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BackendStatus:
    """One memory backend of a running QEMU.  ``path`` None: no mapping found for it."""

    backend_id: str
    qom_type: str
    size_bytes: int
    path: str | None
    mapped_bytes: int
    allocated_bytes: int | None  # None for anonymous memory
    page_size_kib: int
    pages_per_node: Mapping[int, int]
    numa_policy: str
    requested_nodes: tuple[int, ...]

    @property
    def off_node_pages(self) -> int:
        """Mapped pages outside ``requested_nodes`` (0 when no nodes were asked for)."""
        if not self.requested_nodes:
            return 0
        return sum(p for n, p in self.pages_per_node.items() if n not in self.requested_nodes)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.backend_id, "qom_type": self.qom_type, "size_bytes": self.size_bytes,
            "path": self.path, "mapped_bytes": self.mapped_bytes,
            "allocated_bytes": self.allocated_bytes, "page_size_kib": self.page_size_kib,
            "pages_per_node": {str(n): p for n, p in sorted(self.pages_per_node.items())},
            "numa_policy": self.numa_policy, "requested_nodes": list(self.requested_nodes),
            "off_node_pages": self.off_node_pages,
        }


@contextlib.contextmanager
def _reading(pid: int, proc: str) -> Iterator[None]:
    """Errors of reading process ``pid`` as :class:`UsageError` (no such process) or
    :class:`HostError` (its files cannot be read)."""
    try:
        yield
    except ProcessGoneError:
        raise UsageError(f"{proc}/{pid}: no such process; give the pid of a running "
                         "QEMU") from None
    except OSError as e:
        raise HostError(f"cannot read {e.filename or f'{proc}/{pid}'}: {e.strerror}; run as "
                        "root or as QEMU's user") from e


def read_vm_areas(pid: int, proc: str = PROC) -> list[VmArea]:
    """Every mapping of ``pid`` with its resident bytes and per-node pages.

    Raises :class:`UsageError` for a missing process, :class:`HostError` when /proc cannot be
    read.
    """
    with _reading(pid, proc):
        areas = host_proc.smaps(pid, proc)
        numa = host_proc.numa_maps(pid, proc)
    result = []
    for a, kib in areas:
        resident = kib.get("Rss", 0) + kib.get("Shared_Hugetlb", 0) + kib.get("Private_Hugetlb", 0)
        policy, nodes = numa.get(a.start, ("", {}))
        result.append(VmArea(a.start, a.end, a.path, a.inode, resident * 1024,
                             kib.get("KernelPageSize", 4), nodes, policy))
    return result


def qemu_argv(pid: int, proc: str = PROC) -> list[str]:
    """The command line of process ``pid``.  Raises UsageError for a missing process."""
    with _reading(pid, proc):
        argv = host_proc.cmdline(pid, proc)
    if not argv:
        raise UsageError(f"process {pid} has no command line (a kernel thread?); give QEMU's pid")
    return argv


def _fd_identity(pid: int, mem_path: str, proc: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a file backend's mem-path as QEMU sees it, or None."""
    m = re.fullmatch(r"/proc/self/fd/(\d+)", mem_path)
    try:
        st = (host_proc.fd_stat(pid, int(m.group(1)), proc) if m
              else host_proc.cwd_stat(pid, mem_path, proc))
    except (ProcessGoneError, OSError):
        return None
    return None if stat.S_ISDIR(st.st_mode) else (st.st_dev, st.st_ino)


def _area_identity(pid: int, area: VmArea, proc: str) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, allocated bytes) of the file mapped at ``area``, or None."""
    try:
        st = host_proc.map_file_stat(pid, area.start, area.end, proc)
    except (ProcessGoneError, OSError):
        return None
    return st.st_dev, st.st_ino, st.st_blocks * 512


def _matches(b: MemoryBackend, area: VmArea, identity: tuple[int, int] | None,
             area_id: tuple[int, int, int] | None) -> bool:
    if b.qom_type == MEMFD:
        return area.path.startswith("/memfd:") and area.size_bytes >= b.size_bytes
    if b.mem_path is None:  # memory-backend-ram: anonymous, matched by size
        return area.path == "" and area.inode == 0 and area.size_bytes == b.size_bytes
    if identity is not None:
        return area_id is not None and area_id[:2] == identity
    directory = b.mem_path.rstrip("/") + "/"
    return area.path.startswith(directory + "qemu_back_mem.") and area.size_bytes >= b.size_bytes


def qemu_status(pid: int, requested: Mapping[str, Sequence[int]] | None = None,
                proc: str = PROC) -> list[BackendStatus]:
    """Status of every memory backend of the QEMU process ``pid``.

    ``requested`` maps backend ids to the host nodes asked for (a domain plan's); without it,
    each backend's ``host-nodes``.  Raises :class:`UsageError` for a missing process or one
    whose command line is not QEMU's, :class:`HostError` when /proc cannot be read.
    """
    config = parse_qemu_argv(qemu_argv(pid, proc))
    areas = read_vm_areas(pid, proc)
    used: set[int] = set()
    out = []
    for b in config.backends:
        identity = _fd_identity(pid, b.mem_path, proc) if b.mem_path else None
        found: tuple[VmArea, tuple[int, int, int] | None] | None = None
        for area in areas:
            if area.start in used:
                continue
            area_id = _area_identity(pid, area, proc) if area.inode else None
            if _matches(b, area, identity, area_id):
                found = (area, area_id)
                used.add(area.start)
                break
        nodes = tuple(sorted(requested[b.id] if requested and b.id in requested
                             else b.host_nodes))
        if found is None:
            log.info("no mapping found for backend %s of process %d", b.id, pid)
            out.append(BackendStatus(b.id, b.qom_type, b.size_bytes, None, 0, None, 0, {}, "",
                                     nodes))
            continue
        area, area_id = found
        out.append(BackendStatus(
            b.id, b.qom_type, b.size_bytes, area.path or "(anonymous)", area.mapped_bytes,
            area_id[2] if area_id else None, area.kernel_page_kib, area.pages_per_node,
            area.numa_policy, nodes))
    return out


def libvirt_qemu_pid(name: str, run_dir: str = "/run/libvirt/qemu", proc: str = PROC) -> int:
    """The pid of the QEMU libvirt runs for domain ``name``: its pidfile, else the process whose
    command line has ``-name guest=NAME``.  Raises UsageError when it is not running."""
    try:
        with open(os.path.join(run_dir, f"{name}.pid"), encoding="ascii") as f:
            pid = int(f.read().strip())
        if host_proc.exists(pid, proc):
            return pid
    except (OSError, ValueError):
        pass
    for pid in host_proc.pids(proc):
        try:
            args = host_proc.cmdline(pid, proc)
        except (ProcessGoneError, OSError):
            continue
        for option, value in zip(args, args[1:], strict=False):
            if option == "-name" and (value == f"guest={name}"
                                      or value.startswith(f"guest={name},")):
                return pid
    raise UsageError(f"domain {name!r} is not running (no QEMU process found); start it first")
