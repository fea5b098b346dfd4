"""Backings: files on hugetlbfs or tmpfs, and memfds, that guest memory lives in.

:func:`open_backings` checks capacity for every requested backing first (free huge pages of
the right size on each target node, or MemAvailable for base pages), and only then creates
anything.  A new file is created unnamed (``O_TMPFILE``) in its directory, opened once and
checked on its descriptor (``fstatfs``: hugetlbfs or tmpfs), populated, and only then linked
under its name by descriptor and recorded under ``<run dir>/files/`` (see
:mod:`kvmaccel.safefs` for why: a guest's directory belongs to the qemu user).  So nobody can
reach a file before it is complete, two runs for one path cannot both succeed, and a run
that fails or is cancelled leaves nothing.  ``kvmaccel release`` only removes a file kvmaccel's
record names; an existing file is used only when that record says kvmaccel created it, and
any other is refused.  :func:`populate_backings` is the whole job of the CLI and the hook:
open, populate, name the memory, and on failure remove exactly what this run created.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import safefs
from ..errors import BackingError, CapacityError, KvmaccelError, TargetError, UsageError
from ..host import sysmem
from ..host.capacity import capacity_checks, require
from ..host.facts import HostFacts
from ..model.units import format_cpu_spec, format_size
from ..paths import run_dir
from ..plan.limits import Limits, split_across_nodes
from ..safefs import write_json_atomic
from .populate import EngineOps, PopulateResult, ProgressFn, WorkItem, populate
from .report import annotate

log = logging.getLogger(__name__)

MFD_HUGE_SHIFT = 26


@dataclass(frozen=True)
class BackingSpec:
    """What to create.  ``path`` None means an anonymous memfd named ``name``, or, with
    ``tmpfile_dir``, an unlinked file in that directory (``O_TMPFILE``, Linux 3.11; hugetlbfs
    and tmpfs support it): it has no name, is never recorded, and its memory returns when the
    last descriptor or mapping goes, whatever happens to the process holding it.

    ``nodes``: the host NUMA nodes the memory is split across, in equal contiguous parts
    (empty: any node).  ``page_size_kib``: for a memfd, the huge page size (None: base
    pages); for a file it is the filesystem's and is detected.
    """

    path: str | None
    size_bytes: int
    nodes: tuple[int, ...] = ()
    policy: str = "bind"
    page_size_kib: int | None = None
    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None
    name: str = "kvmaccel"
    tmpfile_dir: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None and self.tmpfile_dir is not None:
            raise ValueError("give a BackingSpec either a path or a tmpfile_dir, not both")

    @property
    def label(self) -> str:
        if self.tmpfile_dir is not None:
            return f"tmpfile:{self.tmpfile_dir}"
        return self.path or f"memfd:{self.name}"


@dataclass
class Backing:
    """An open backing.  ``created`` is True when this run created the file.

    A new file is created unnamed (``O_TMPFILE``) in its directory, held as ``dir_fd``, and
    gets its name (:meth:`publish`) only when it is populated: nobody, the qemu user who owns a
    guest's directory included, can reach it before, and a run that fails leaves nothing."""

    spec: BackingSpec
    fd: int
    fs_kind: str  # "hugetlbfs", "tmpfs" or "memfd"
    page_size_bytes: int
    created: bool
    dir_fd: int = -1
    name: str | None = None
    published: bool = True

    @property
    def path(self) -> str | None:
        return self.spec.path

    def work_items(self) -> list[WorkItem]:
        return [
            WorkItem(self.fd, offset, length, self.page_size_bytes, node, self.spec.policy,
                     self.spec.label)
            for node, offset, length in split_across_nodes(
                self.spec.size_bytes, self.spec.nodes, self.page_size_bytes)
        ]

    def publish(self) -> None:
        """Give a new file its name, by its descriptor (``linkat``), and record it as
        kvmaccel's.  Raises :class:`BackingError` when the name was taken meanwhile."""
        if self.published or self.name is None or self.spec.path is None:
            return
        try:
            safefs.link_fd(self.fd, self.dir_fd, self.name)
        except FileExistsError:
            raise BackingError(
                f"{self.spec.path} appeared while kvmaccel populated it (another run, or "
                "someone else); kept nothing of this run: choose another path or remove it",
                path=self.spec.path) from None
        except OSError as e:
            raise BackingError(f"cannot name {self.spec.path}: {e.strerror}",
                               path=self.spec.path) from e
        self.published = True
        try:
            remember(self.spec.path, self.fd, self.spec.size_bytes)
        except (OSError, KvmaccelError) as e:  # unrecorded, it could never be released
            self.discard()
            raise BackingError(f"cannot record {self.spec.path} as kvmaccel's under "
                               f"{run_dir()}: {e}; run as root or set KVMACCEL_RUN_DIR to a "
                               "directory of yours", path=self.spec.path) from None

    def close(self) -> None:
        for attr in ("fd", "dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def discard(self) -> None:
        """Close; if this run created and named the file, remove that name (if it is still
        this file) and its record."""
        if self.created and self.published and self.name and self.fd >= 0:
            safefs.unlink_if_same(self.dir_fd, self.name, os.fstat(self.fd))
            forget(self.spec.path or "")
        self.close()


# --- records of files kvmaccel created ---------------------------------------------------

def canonical(path: str) -> str:
    """``path`` with its directory resolved as the kernel resolves it (symlinks first, then
    ``..``; a lexical ``abspath`` would get ``dir/symlink/../name`` wrong)."""
    directory, name = os.path.split(path)
    return os.path.join(os.path.realpath(directory or "."), name)


def _record_path(path: str) -> str:
    digest = hashlib.sha256(canonical(path).encode()).hexdigest()[:32]
    return os.path.join(run_dir(), "files", f"{digest}.json")


def remember(path: str, fd: int, size_bytes: int) -> None:
    st = os.fstat(fd)
    record = {"path": canonical(path), "dev": st.st_dev, "ino": st.st_ino,
              "size_bytes": size_bytes, "created_unix": time.time(), "pid": os.getpid()}
    write_json_atomic(_record_path(path), record, top=run_dir())


def forget(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(path))


def _recorded(path: str, st: os.stat_result) -> bool:
    """True when kvmaccel's own creation record (:func:`kvmaccel.safefs.read_own_json`: it
    lets root remove the file) names the inode ``st``.  Raises UnsafePathError."""
    try:
        record = safefs.read_own_json(_record_path(path), top=run_dir())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and (record.get("dev"), record.get("ino")) == (
        st.st_dev, st.st_ino)


def created_by_us(path: str) -> bool:
    """True when kvmaccel's record names this very file (same device and inode; a symlink
    put in its place is not it)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return _recorded(path, st)


def release(path: str) -> int:
    """Remove ``path`` if kvmaccel created it; return the bytes it held.

    Raises :class:`BackingError` for a file kvmaccel did not create (left untouched) or one
    that does not exist.
    """
    directory, name = os.path.split(path)
    try:
        dfd = safefs.open_dir(directory or ".", follow=True)
    except OSError as e:
        raise BackingError(f"{path}: {e.strerror}; nothing to release", path=path) from None
    try:
        st = safefs.lstat_at(dfd, name)
        if st is None:
            forget(path)
            raise BackingError(f"{path} does not exist; nothing to release", path=path)
        if not _recorded(path, st):
            raise BackingError(
                f"{path} was not created by kvmaccel; refusing to remove it (remove it "
                "yourself if it is no longer used)", path=path)
        safefs.unlink_if_same(dfd, name, st)
    finally:
        os.close(dfd)
    forget(path)
    return st.st_size


# --- capacity ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    spec: BackingSpec
    fs_kind: str
    page_size_bytes: int
    fs_available_bytes: int  # -1: no filesystem limit
    existing_bytes: int  # pages the file already holds (a file kvmaccel created earlier)


_MAGIC = {"hugetlbfs": sysmem.HUGETLBFS_MAGIC, "tmpfs": sysmem.TMPFS_MAGIC}


def _fs_kind(dir_fd: int, where: str, spec: BackingSpec, host: HostFacts
             ) -> tuple[str, int, int]:
    """(kind, page size, bytes available) of the filesystem of the open directory."""
    f_type, bsize, available = sysmem.fs_info(dir_fd)
    if f_type == sysmem.HUGETLBFS_MAGIC:
        return "hugetlbfs", bsize, available
    if f_type == sysmem.TMPFS_MAGIC:
        return "tmpfs", host.base_page_size_kib * 1024, available
    raise TargetError(
        f"{spec.path or where} is not on hugetlbfs or tmpfs (filesystem magic {f_type:#x}); "
        "choose a path under a hugetlbfs mount or /dev/shm", path=spec.path)


def _directory(spec: BackingSpec) -> str:
    """The directory a file or unnamed file goes in, as given (the kernel resolves it)."""
    if spec.path is None:
        return spec.tmpfile_dir or ""
    return os.path.dirname(spec.path) or "."


def _open_directory(spec: BackingSpec) -> int:
    where = _directory(spec)
    try:
        return safefs.open_dir(where, follow=True)
    except OSError as e:
        raise BackingError(f"cannot use {spec.label}: {where}: {e.strerror}; create the "
                           "directory first", path=spec.path) from e


def _classify(spec: BackingSpec, host: HostFacts) -> _Target:
    if spec.path is None and spec.tmpfile_dir is None:
        page = (spec.page_size_kib or host.base_page_size_kib) * 1024
        kind = "hugetlbfs" if spec.page_size_kib else "memfd"
        return _Target(spec, kind, page, -1, 0)
    dir_fd = _open_directory(spec)
    try:
        kind, page, available = _fs_kind(dir_fd, _directory(spec), spec, host)
        existing = 0
        st = None if spec.path is None else safefs.lstat_at(dir_fd, os.path.basename(spec.path))
    finally:
        os.close(dir_fd)
    if st is not None:
        assert spec.path is not None
        if not stat.S_ISREG(st.st_mode) or not _recorded(spec.path, st):
            raise BackingError(
                f"{spec.path} exists and was not created by kvmaccel; refusing to reuse or "
                "truncate it (choose another path, or remove it yourself)", path=spec.path)
        if st.st_size != spec.size_bytes:
            raise BackingError(
                f"{spec.path} (created by kvmaccel) holds {format_size(st.st_size)}, not "
                f"{format_size(spec.size_bytes)}; run 'kvmaccel release {spec.path}' first",
                path=spec.path)
        existing = st.st_blocks * 512
    if spec.size_bytes % page:
        raise TargetError(
            f"size {spec.size_bytes} of {spec.label} is not a multiple of its "
            f"{page >> 10} KiB pages; round it up to {math.ceil(spec.size_bytes / page) * page}",
            path=spec.path)
    return _Target(spec, kind, page, available, existing)


def check_room(specs: Sequence[BackingSpec], host: HostFacts) -> int:
    """Bytes missing for ``specs`` to fit now (0: they fit).  Raises what
    :func:`open_backings` would for anything but capacity."""
    try:
        check_capacity([_classify(spec, host) for spec in specs], host)
    except CapacityError as e:
        return max(1, e.needed_bytes - e.available_bytes)
    return 0


def check_capacity(targets: Sequence[_Target], host: HostFacts) -> None:
    """Raise :class:`CapacityError`, with the numbers, unless every target fits at once."""
    needs: dict[tuple[int | None, int], int] = defaultdict(int)  # (node, page KiB) -> bytes
    for t in targets:
        missing = sorted(set(t.spec.nodes) - set(host.nodes))
        if missing:
            raise UsageError(
                f"NUMA node {format_cpu_spec(missing)} does not exist; this host has "
                f"node(s) {format_cpu_spec(sorted(host.nodes))}")
        need = max(0, t.spec.size_bytes - t.existing_bytes)
        if 0 <= t.fs_available_bytes < need:
            raise CapacityError(
                f"{t.spec.label}: the filesystem has {format_size(t.fs_available_bytes)} free "
                f"but {format_size(need)} is needed; raise its size= limit or free space",
                needed_bytes=need, available_bytes=t.fs_available_bytes)
        if t.fs_kind != "hugetlbfs":
            # Counted host-wide, bound or not: a node's MemFree leaves out the page cache the
            # kernel reclaims there for a bound tmpfs file or memfd.
            needs[(None, host.base_page_size_kib)] += need
            continue
        page = t.page_size_bytes
        for node, _, length in split_across_nodes(need, t.spec.nodes, page):
            needs[(node, page >> 10)] += math.ceil(length / page) * page
    require(capacity_checks(host, needs))


# --- opening -------------------------------------------------------------------------------

def _open(target: _Target) -> Backing:
    spec = target.spec
    if spec.tmpfile_dir is not None:
        return _open_tmpfile(target)
    if spec.path is not None:
        return _open_file(target, spec.path)
    flags = os.MFD_CLOEXEC
    if spec.page_size_kib:
        log2_page = (spec.page_size_kib * 1024).bit_length() - 1
        flags |= os.MFD_HUGETLB | log2_page << MFD_HUGE_SHIFT
    try:
        fd = os.memfd_create(spec.name, flags)
        os.ftruncate(fd, spec.size_bytes)
    except OSError as e:
        raise BackingError(f"cannot create memfd {spec.name}: {e.strerror}") from e
    return Backing(spec, fd, target.fs_kind, target.page_size_bytes, created=False)


def _open_file(target: _Target, path: str) -> Backing:
    """Reopen the file kvmaccel created at ``path`` earlier, or create a new one unnamed in
    its directory (named by :meth:`Backing.publish` once populated)."""
    spec = target.spec
    name = os.path.basename(path)
    dir_fd = _open_directory(spec)
    try:
        if sysmem.fs_info(dir_fd)[0] != _MAGIC[target.fs_kind]:  # resolved elsewhere now
            raise BackingError(f"{path}: its directory is no longer on {target.fs_kind}; "
                               "refusing to create it", path=path)
        if safefs.lstat_at(dir_fd, name) is not None:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                         dir_fd=dir_fd)
            if not _recorded(path, os.fstat(fd)):
                os.close(fd)
                raise BackingError(f"{path} changed while kvmaccel looked at it; refusing to "
                                   "use it", path=path)
            return Backing(spec, fd, target.fs_kind, target.page_size_bytes, created=False,
                           dir_fd=dir_fd, name=name)
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, spec.mode, dir_fd=dir_fd)
    except OSError as e:
        os.close(dir_fd)
        raise BackingError(f"cannot create {path}: {e.strerror}", path=path) from e
    except BaseException:
        os.close(dir_fd)
        raise
    backing = Backing(spec, fd, target.fs_kind, target.page_size_bytes, created=True,
                      dir_fd=dir_fd, name=name, published=False)
    try:
        os.ftruncate(fd, spec.size_bytes)
        os.fchmod(fd, spec.mode)
        if spec.uid is not None or spec.gid is not None:
            os.fchown(fd, -1 if spec.uid is None else spec.uid,
                      -1 if spec.gid is None else spec.gid)
    except OSError as e:
        backing.discard()
        raise BackingError(f"cannot size or set owner of {path}: {e.strerror}",
                           path=path) from e
    return backing


def _open_tmpfile(target: _Target) -> Backing:
    """An unlinked file in ``spec.tmpfile_dir``: nothing to record or remove, ever."""
    spec = target.spec
    directory = spec.tmpfile_dir or ""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, spec.mode)
    except OSError as e:
        raise BackingError(f"cannot create an unlinked file in {directory}: {e.strerror} "
                           "(O_TMPFILE needs Linux 3.11 and a filesystem that has it, such as "
                           "hugetlbfs or tmpfs)") from e
    try:
        os.ftruncate(fd, spec.size_bytes)
        if spec.uid is not None or spec.gid is not None:
            os.fchown(fd, -1 if spec.uid is None else spec.uid,
                      -1 if spec.gid is None else spec.gid)
    except OSError as e:
        os.close(fd)
        raise BackingError(f"cannot size or set owner of an unlinked file in {directory}: "
                           f"{e.strerror}") from e
    return Backing(spec, fd, target.fs_kind, target.page_size_bytes, created=False)


def open_backings(specs: Sequence[BackingSpec], host: HostFacts) -> list[Backing]:
    """Check capacity for all of ``specs``, then create or open each.  On error nothing this
    call created is left."""
    targets = [_classify(spec, host) for spec in specs]
    check_capacity(targets, host)
    opened: list[Backing] = []
    try:
        for target in targets:
            opened.append(_open(target))
    except BaseException:
        for backing in opened:
            backing.discard()
        raise
    return opened


def populate_backings(
    specs: Sequence[BackingSpec],
    host: HostFacts,
    limits: Limits | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    ops: EngineOps | None = None,
    keep_open: bool = False,
    on_open: Callable[[list[Backing]], None] | None = None,
) -> tuple[list[Backing], PopulateResult]:
    """Create (or reopen) and populate every backing.  Returns the backings (closed unless
    ``keep_open``; memfds are always kept open, since closing one frees it) and the result.
    ``on_open`` is called with the backings once they exist, before population.

    On any error or cancel every file this call created is removed, then the error is
    raised (a :class:`~kvmaccel.errors.KvmaccelError`).
    """
    backings = open_backings(specs, host)
    try:
        if on_open:
            on_open(backings)
        items = [item for backing in backings for item in backing.work_items()]
        done = populate(items, host, limits, progress=progress, cancel=cancel, ops=ops)
        result = annotate(done, backings)  # which memory it was: hugetlbfs 2M, tmpfs 4K
        for backing in backings:
            backing.publish()
    except BaseException as e:
        for backing in backings:
            backing.discard()
        if isinstance(e, KvmaccelError | KeyboardInterrupt):
            raise
        raise BackingError(f"population failed: {e}") from e
    for backing in backings:
        if not keep_open and backing.path is not None:
            backing.close()
    return backings, result
