"""``kvmaccel run``: populate a QEMU command line's memory backends, then become QEMU.

A launch script replaces ``qemu-system-x86_64 ARGS...`` by ``kvmaccel run -- qemu-system-x86_64
ARGS...``.  :func:`plan_launch` reads the memory backends from QEMU's own arguments
(:mod:`kvmaccel.launch.qemuargs`) and decides, for each, one :class:`BackendAction`:

* ``tmpfile``: a shared ``memory-backend-file`` whose ``mem-path`` is a directory.  QEMU would
  make a temporary file in it and unlink it at once (``file_ram_open``), so nobody could
  populate it ahead.  kvmaccel creates an unlinked ``O_TMPFILE`` file in that directory,
  populates it, keeps its descriptor open across ``exec`` and hands it to QEMU as
  ``mem-path=/proc/self/fd/N``: QEMU opens the existing file through the link and maps it
  shared (checked with QEMU 7.2).  The file has no name, so nothing is left on disk when QEMU
  exits or is killed.
* ``memfd``: a ``memory-backend-memfd`` (shared, QEMU's default).  kvmaccel creates the memfd
  (huge pages as ``hugetlb``/``hugetlbsize`` say), populates it and hands it to QEMU the same
  way, as a ``memory-backend-file,share=on`` of the same id, size, host-nodes and policy.  The
  memfd is not sealed (QEMU's ``seal=on`` only guards against resizing).
* ``file``: a shared ``memory-backend-file`` whose ``mem-path`` does not exist yet (or is a file
  an earlier ``kvmaccel populate`` made).  kvmaccel creates it (``O_EXCL``, recorded, so
  ``kvmaccel release`` can remove it) and populates it; QEMU uses an existing file as it is.  As
  when QEMU creates it, the file stays after QEMU exits.
* ``skip``: everything else, with the reason: private (``share=off``) backends, whose pages
  QEMU would copy out of the file; anonymous ``memory-backend-ram``; files that exist and are
  not kvmaccel's (they may hold data); files not on hugetlbfs or tmpfs; virtio-mem backends.

Every populated backend gets an explicit ``prealloc=off`` (it wins over ``-mem-prealloc``,
which keeps serving the others).  Pages are placed on the backend's ``host-nodes`` in equal
contiguous parts; ``policy=interleave`` is populated the same way (per node, not page by page).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from ..engine.backing import Backing, BackingSpec, created_by_us, populate_backings
from ..engine.populate import PopulateResult, ProgressFn
from ..errors import UsageError
from ..host import sysmem
from ..host.facts import HostFacts
from ..model.units import align_up, format_cpu_spec, format_size
from ..plan.limits import Limits
from .objargs import FILE, MEMFD, RAM, parse_keyval
from .qemuargs import (
    MemoryBackend,
    parse_qemu_argv,
    rewrite_backend,
    set_prealloc_off,
)

log = logging.getLogger(__name__)

Action = Literal["tmpfile", "memfd", "file", "skip"]
FD_PLACEHOLDER = "N"
"""Shown instead of the descriptor number by ``--dry-run`` (no descriptor exists yet)."""


@dataclass(frozen=True)
class BackendAction:
    """What ``kvmaccel run`` does with one memory backend.

    ``size_bytes`` is what kvmaccel populates: the backend's size rounded up to whole pages of
    ``page_size_kib`` (None when skipped).  ``nodes`` and ``policy`` are those of the backend
    (``policy`` None means QEMU's ``default``).  ``reason`` says why, for every action.
    """

    backend_id: str
    qom_type: str
    action: Action
    size_bytes: int
    mem_path: str | None
    nodes: tuple[int, ...]
    policy: str | None
    page_size_kib: int | None
    reason: str

    def spec(self) -> BackingSpec:
        """The backing to create.  Raises ValueError for a skipped backend."""
        policy = "preferred" if self.policy == "preferred" else "bind"
        if self.action == "tmpfile":
            return BackingSpec(None, self.size_bytes, self.nodes, policy,
                               tmpfile_dir=self.mem_path)
        if self.action == "memfd":
            return BackingSpec(None, self.size_bytes, self.nodes, policy,
                               page_size_kib=self.page_size_kib, name=f"kvmaccel-{self.backend_id}")
        if self.action == "file":
            return BackingSpec(self.mem_path, self.size_bytes, self.nodes, policy)
        raise ValueError(f"backend {self.backend_id} is not populated")


@dataclass(frozen=True)
class LaunchPlan:
    """The command line as given, and one action per memory backend (in argv order)."""

    argv: tuple[str, ...]
    actions: tuple[BackendAction, ...]

    @property
    def populated(self) -> tuple[BackendAction, ...]:
        return tuple(a for a in self.actions if a.action != "skip")


def _virtio_mem_backends(argv: Sequence[str]) -> set[str]:
    """Ids used as ``memdev`` of a ``-device virtio-mem-*``: QEMU plugs their blocks on demand."""
    ids = set()
    for option, value in zip(argv[1:], argv[2:], strict=False):
        if option not in ("-device", "--device"):
            continue
        props: dict[str, object] = {}
        if value.startswith("{"):
            with contextlib.suppress(ValueError):
                loaded = json.loads(value)
                props = loaded if isinstance(loaded, dict) else {}
        else:
            props = dict(parse_keyval(value, "driver"))
        driver, memdev = props.get("driver"), props.get("memdev")
        if isinstance(driver, str) and driver.startswith("virtio-mem") and isinstance(memdev, str):
            ids.add(memdev)
    return ids


def _fs_page_kib(path: str) -> tuple[str | None, int]:
    """(``hugetlbfs``|``tmpfs``|None, page size in KiB) of the filesystem holding ``path``."""
    try:
        f_type, bsize, _ = sysmem.fs_info(path)
    except OSError:
        return None, 0
    if f_type == sysmem.HUGETLBFS_MAGIC:
        return "hugetlbfs", bsize >> 10
    if f_type == sysmem.TMPFS_MAGIC:
        return "tmpfs", 0
    return None, 0


def _check_policy(b: MemoryBackend) -> None:
    """QEMU's own checks (``host_memory_backend_memory_complete``), said before populating."""
    policy = b.policy or "default"
    if b.host_nodes and policy == "default":
        raise UsageError(f"memory backend {b.id!r}: host-nodes needs a policy other than "
                         "default (QEMU refuses it); add policy=bind")
    if not b.host_nodes and policy != "default":
        raise UsageError(f"memory backend {b.id!r}: policy={policy} needs host-nodes (QEMU "
                         "refuses it); add host-nodes=N")


def _action(b: MemoryBackend, host: HostFacts, virtio_mem: set[str]) -> BackendAction:
    nodes = tuple(sorted(b.host_nodes))
    base = BackendAction(b.id, b.qom_type, "skip", 0, b.mem_path, nodes, b.policy, None, "")

    def skip(reason: str) -> BackendAction:
        return dataclasses.replace(base, reason=reason)

    if b.id in virtio_mem:
        return skip("left to QEMU: memdev of a virtio-mem device, which plugs blocks on demand")
    if b.qom_type == RAM:
        return skip("left to QEMU: anonymous memory (memory-backend-ram); use memory-backend-"
                    "memfd or a shared memory-backend-file to have kvmaccel populate it")
    if not b.share_effective:
        where = ("QEMU's implicit RAM backend (-m/-mem-path) is private" if b.form == "implicit"
                 else "private (share=off)")
        return skip(f"left to QEMU: {where}; QEMU maps it MAP_PRIVATE and would copy every "
                    "page it writes out of the file; use share=on")
    _check_policy(b)
    if b.qom_type == MEMFD:
        page_kib = None
        if b.hugetlb:
            page_kib = (b.hugetlbsize_bytes >> 10 if b.hugetlbsize_bytes
                        else host.default_hugepage_kib)
            if not page_kib:
                raise UsageError(f"memory backend {b.id!r}: hugetlb=on but the host has no "
                                 "default huge page size; add hugetlbsize=2M")
        page = (page_kib or host.base_page_size_kib) * 1024
        return dataclasses.replace(
            base, action="memfd", size_bytes=align_up(b.size_bytes, page), page_size_kib=page_kib,
            reason="new memfd" + (f" of {page_kib} KiB pages" if page_kib else "")
                   + ", handed to QEMU as /proc/self/fd/N")
    assert b.qom_type == FILE and b.mem_path is not None
    path = b.mem_path
    probe = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    fs, page_kib = _fs_page_kib(probe)
    if fs is None:
        return skip(f"left to QEMU: {path} is not on hugetlbfs or tmpfs; populating would "
                    "write guest RAM to disk")
    page = (page_kib or host.base_page_size_kib) * 1024
    populate = dataclasses.replace(base, size_bytes=align_up(b.size_bytes, page),
                                   page_size_kib=page_kib or None)
    if os.path.isdir(path):
        return dataclasses.replace(
            populate, action="tmpfile",
            reason=f"directory on {fs}: an unlinked file in it, handed to QEMU as /proc/self/fd/N")
    if os.path.lexists(path) and not created_by_us(path):
        return skip(f"left to QEMU: {path} exists and was not created by kvmaccel (it may hold "
                    "data)")
    return dataclasses.replace(populate, action="file",
                               reason=f"file on {fs}, created by kvmaccel; QEMU uses it as it is")


def plan_launch(argv: Sequence[str], host: HostFacts) -> LaunchPlan:
    """Decide what to do with each memory backend of ``argv`` (``argv[0]`` the QEMU program).

    Reads the filesystems of the ``mem-path`` values (statfs, stat); creates nothing.  Raises
    :class:`UsageError` for a command line QEMU would refuse (see
    :func:`kvmaccel.launch.qemuargs.parse_qemu_argv`), host-nodes without a policy or the reverse, a
    ``hugetlb=on`` memfd on a host without huge pages.
    """
    config = parse_qemu_argv(argv)
    virtio_mem = _virtio_mem_backends(argv)
    actions = [_action(b, host, virtio_mem) for b in config.backends]
    for u in config.unsupported_backends:
        actions.append(BackendAction(u.id, u.qom_type, "skip", 0, None, (), None, None,
                                     f"left to QEMU: kvmaccel does not handle {u.qom_type}"))
    return LaunchPlan(tuple(argv), tuple(actions))


def rewrite_argv(plan: LaunchPlan, fds: Mapping[str, int | str]) -> list[str]:
    """The command line QEMU gets: populated backends with ``prealloc=off``, and those handed
    over by descriptor (``fds[backend_id]``) as shared file backends on ``/proc/self/fd/N``."""
    argv = list(plan.argv)
    for a in plan.populated:
        if a.action == "file":
            argv = set_prealloc_off(argv, [a.backend_id])
        else:
            argv = rewrite_backend(argv, a.backend_id, new_props={
                "mem-path": f"/proc/self/fd/{fds[a.backend_id]}", "share": True,
                "prealloc": False})
    return argv


def describe(plan: LaunchPlan, argv: Sequence[str]) -> str:
    """What ``--dry-run`` prints: one line per backend, then the command line."""
    lines = []
    for a in plan.actions:
        where = f" {a.mem_path}" if a.mem_path else ""
        nodes = f" host-nodes {format_cpu_spec(set(a.nodes))} {a.policy}" if a.nodes else ""
        size = f" {format_size(a.size_bytes)}" if a.size_bytes else ""
        verb = "populate" if a.action != "skip" else "skip"
        lines.append(f"{verb} {a.backend_id} ({a.qom_type}{where}{size}{nodes}): {a.reason}")
    if not plan.actions:
        lines.append("no memory backends: nothing to populate")
    lines.append("exec: " + shlex.join(argv))
    return "\n".join(lines)


def check_program(argv: Sequence[str]) -> None:
    """Raise :class:`UsageError` unless ``argv[0]`` is a program that can be executed."""
    if not argv:
        raise UsageError("no QEMU command line; give it after --, e.g. kvmaccel run -- "
                         "qemu-system-x86_64 -m 1G ...")
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]}: no such program (or not executable); give the QEMU "
                         "binary as the first word after --")


def populate_launch(
    plan: LaunchPlan,
    host: HostFacts,
    limits: Limits | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[str], list[Backing], PopulateResult | None]:
    """Create and populate every backing of ``plan``; return QEMU's command line, the open
    backings (their descriptors inheritable, to be kept across ``exec``) and the result (None
    when nothing was populated).

    Raises what :func:`kvmaccel.engine.backing.populate_backings` raises (CapacityError before
    anything is created, BackingError, PopulateError, CancelledError); on error nothing is left.
    """
    populated = plan.populated
    if not populated:
        return rewrite_argv(plan, {}), [], None
    backings, result = populate_backings([a.spec() for a in populated], host, limits,
                                         progress=progress, cancel=cancel, keep_open=True)
    fds: dict[str, int | str] = {}
    for a, backing in zip(populated, backings, strict=True):
        if a.action == "file":
            backing.close()  # QEMU opens it by name
        else:
            os.set_inheritable(backing.fd, True)
            fds[a.backend_id] = backing.fd
    return rewrite_argv(plan, fds), backings, result


def exec_qemu(argv: Sequence[str], backings: Sequence[Backing]) -> NoReturn:
    """Replace this process by QEMU.  If ``exec`` fails, remove the files this run created and
    raise :class:`UsageError`."""
    log.info("exec %s", shlex.join(argv))
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as e:
        for backing in backings:
            backing.discard()
        raise UsageError(f"cannot run {argv[0]}: {e.strerror}") from None
