"""The warm pool: pre-populated, pre-zeroed backing files linked into a guest's path at start.

Populating in parallel divides the zeroing cost; the pool takes it off the start path.  A pool
lives in ``<mount>/.kvmaccel-pool/`` on each filesystem (a hugetlbfs mount, a tmpfs) so that
``link()`` can put a pool file at the path libvirt hands QEMU, which must be on the same
filesystem.  After the guest stops, the pool's own link keeps the pages; they still hold the
guest's memory, so the file is *dirty* until a scrub has zeroed every page and checked a
sample.

The files, their crash-safe states (filling, clean, in_use, dirty, scrubbing) and handing
them out live in :mod:`kvmaccel.pool.files`, which a warm start imports alone; this module
adds filling, adopting, releasing, scrubbing and draining.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import paths, safefs
from ..engine import records
from ..errors import KvmaccelError, UsageError
from ..host.facts import mount_of
from ..host.proc import holders
from ..host.process import lend_priority, own_start_ticks
from ..model.units import format_size
from ..plan.limits import Limits, split_across_nodes
from .files import (
    POOL_DIRNAME,
    PoolEntry,
    PoolFiles,
    PoolKey,
    entry_stat,
    own,
    reserved_first,
)

if TYPE_CHECKING:
    from ..engine.populate import PopulateResult
    from ..host.facts import HostFacts, Mount

__all__ = ["POOL_DIRNAME", "Pool", "PoolEntry", "PoolError", "PoolKey", "key_for",
           "pool_dir_for", "reserved_first", "spawn_scrub", "verify_zero", "zero_file"]

log = logging.getLogger(__name__)

VERIFY_SAMPLES = 64


class PoolError(KvmaccelError):
    """The pool cannot do what was asked (limit reached, file in use, bad state directory)."""


def pool_dir_for(path: str, mounts: Sequence[Mount]) -> str:
    """The pool directory on the filesystem that holds ``path`` (its mount point's
    ``.kvmaccel-pool``).  Raises :class:`UsageError` when that is not hugetlbfs or tmpfs."""
    best = mount_of(path, mounts)
    if best is None or best.fs_type not in ("hugetlbfs", "tmpfs"):
        kind = best.fs_type if best else "no mount"
        raise UsageError(f"{path} is on {kind}, not hugetlbfs or tmpfs; a pool lives on the "
                         "filesystem of the guest's memory_backing_dir")
    return os.path.join(best.path, POOL_DIRNAME)


class Pool(PoolFiles):
    """The pool on one filesystem.  ``max_bytes`` and ``max_node_bytes`` cap what it holds
    (None: no cap) so that it never starves the guests it is meant to speed up."""

    def __init__(self, directory: str, *, max_bytes: int | None = None,
                 max_node_bytes: int | None = None, state_root: str | None = None,
                 state_dir: str | None = None) -> None:
        super().__init__(directory, state_root=state_root, state_dir=state_dir)
        self.max_bytes = max_bytes
        self.max_node_bytes = max_node_bytes

    def check(self) -> None:
        """Raise :class:`UnsafePathError` when the pool directory exists but is not
        kvmaccel's (another user's, a symlink, a file); a missing one is fine (it is made
        when a file first joins the pool).  Every operation checks again; this one lets a
        caller skip such a pool before it starts."""
        with self._dir():
            pass

    def held_bytes(self) -> tuple[int, dict[int | None, int]]:
        """Bytes the pool holds in all, and per node."""
        total = 0
        per_node: dict[int | None, int] = {}
        for entry in self.entries():
            total += entry.key.size_bytes
            for node, length in entry.key.node_bytes().items():
                per_node[node] = per_node.get(node, 0) + length
        return total, per_node

    def room_for(self, key: PoolKey) -> str | None:
        """None when a file of ``key`` fits under the caps, else why not."""
        total, per_node = self.held_bytes()
        if self.max_bytes is not None and total + key.size_bytes > self.max_bytes:
            return (f"pool {self.directory} holds {format_size(total)}; another "
                    f"{format_size(key.size_bytes)} would pass its limit of "
                    f"{format_size(self.max_bytes)}")
        if self.max_node_bytes is not None:
            for node, length in key.node_bytes().items():
                held = per_node.get(node, 0)
                if node is not None and held + length > self.max_node_bytes:
                    return (f"pool {self.directory} holds {format_size(held)} on node {node}; "
                            f"another {format_size(length)} would pass its per-node limit of "
                            f"{format_size(self.max_node_bytes)}")
        return None

    # --- filling ---------------------------------------------------------------------------

    def fill(self, key: PoolKey, count: int, host: HostFacts, limits: Limits | None = None,
             *, cancel: threading.Event | None = None) -> list[PopulateResult]:
        """Add ``count`` clean files of ``key``, populating each with the engine.  Stops with
        :class:`PoolError` at the pool's limit (what was added stays).

        Each file is populated unnamed (``O_TMPFILE`` in the pool directory) and linked into
        the pool, clean, only when complete: a fill that fails, is cancelled (``cancel``,
        SIGINT/SIGTERM in the CLI) or dies leaves nothing behind.  Fills of one pool run one
        at a time, so their room checks see each other's files."""
        from ..engine.backing import BackingSpec, populate_backings

        results = []
        with self._dir(create=True):  # checked before anything is written for it
            pass
        with self._file_lock(".fill"):
            for _ in range(count):
                with self._dir(create=True), self._pool_lock():
                    why = self.room_for(key)
                    if why:
                        raise PoolError(f"{why}; not filling more (raise the pool limits in "
                                        "the config, or drain)")
                spec = BackingSpec(None, key.size_bytes, key.host_nodes, key.policy or "bind",
                                   tmpfile_dir=self.directory)
                (backing,), result = populate_backings([spec], host, limits, cancel=cancel)
                try:
                    with self._dir() as dfd, self._pool_lock():
                        if dfd is None:
                            raise PoolError(f"pool directory {self.directory} vanished while "
                                            "a file was filled for it")
                        name = key.filename(secrets.token_hex(4))
                        safefs.link_fd(backing.fd, dfd, name)
                        self._write_state(name, "clean", os.fstat(backing.fd))
                finally:
                    backing.close()
                results.append(result)
                records.fill(pool=self.directory, page_size_kib=[key.page_size_kib],
                             **records.from_result(result.as_dict()))
        return results

    # --- handing out and taking back -------------------------------------------------------

    def take(self, key: PoolKey, target: str, *, domain_uuid: str, backend_id: str,
             uid: int | None = None, gid: int | None = None, mode: int = 0o600
             ) -> PoolEntry | None:
        entry = super().take(key, target, domain_uuid=domain_uuid, backend_id=backend_id,
                             uid=uid, gid=gid, mode=mode)
        if entry is not None:
            log.info("pool: %s -> %s for %s/%s", entry.path, target, domain_uuid, backend_id)
        return entry

    def adopt(self, fd: int, key: PoolKey, *, domain_uuid: str, backend_id: str,
              link_path: str) -> PoolEntry | None:
        """Add a freshly populated guest file, held open as ``fd``, to the pool, in use by that
        guest at ``link_path``, so its next start comes from the pool.  It is linked by its
        descriptor (whatever ``link_path`` names by now).  None (and a log line) when the
        pool is at its limit or the file is not of the key's size."""
        with self._dir(create=True) as dfd, self._pool_lock():
            assert dfd is not None
            why = self.room_for(key)
            st = os.fstat(fd)
            if not why and (not stat.S_ISREG(st.st_mode) or st.st_size != key.size_bytes):
                why = f"it holds {st.st_size} bytes, not {key.size_bytes}"
            if why:
                log.info("pool: not adopting %s: %s", link_path, why)
                return None
            name = key.filename(secrets.token_hex(4))
            try:
                safefs.link_fd(fd, dfd, name)
            except FileNotFoundError:  # its last name is gone (ENOENT: no longer linkable)
                log.info("pool: not adopting %s: it was unlinked since it was populated",
                         link_path)
                return None
            self._write_state(name, "in_use", st, domain_uuid=domain_uuid,
                              backend_id=backend_id, link_path=os.path.abspath(link_path))
            return self._entry(dfd, name, key)

    def release_domain(self, domain_uuid: str) -> list[PoolEntry]:
        """Mark every file the guest used dirty (its memory is still in them)."""
        released = []
        with self._dir() as dfd, self._pool_lock():
            for entry in [] if dfd is None else self._entries(dfd):
                if entry.domain_uuid == domain_uuid and entry.recorded_state == "in_use":
                    self._write_state(entry.path, "dirty", entry_stat(entry),
                                      domain_uuid=domain_uuid, backend_id=entry.backend_id)
                    released.append(entry)
        return released

    # --- scrubbing and draining ------------------------------------------------------------

    def scrub(self, host: HostFacts, limits: Limits | None = None) -> list[PoolEntry]:
        """Zero every page of every dirty file with the engine's helpers, check a sample of
        pages, and mark the file clean; remove bad files.  Files another scrubber holds are
        skipped, and so are files another process still has open or mapped (a warning names
        it; they wait).  An interrupted scrub leaves the file dirty (its state says
        ``scrubbing`` and nobody holds its lock)."""
        done = []
        for listed in self.entries():
            if listed.state not in ("dirty", "bad"):
                continue
            with self._file_lock(listed.path, wait=False) as got:
                if got and self._scrub_one(listed, host, limits):
                    done.append(listed)
        return done

    def _scrub_one(self, listed: PoolEntry, host: HostFacts, limits: Limits | None) -> bool:
        """Scrub one file, re-checked under the pool lock as it is now (the listing may be
        stale: another scrub may have cleaned it and a guest taken it since)."""
        from time import monotonic  # the record's seconds
        name = os.path.basename(listed.path)
        with self._dir() as dfd, self._pool_lock():
            entry = None if dfd is None else self._entry(dfd, name, listed.key,
                                                         we_hold_its_lock=True)
            if dfd is None or entry is None or not _same(entry, listed):
                return False
            if entry.state == "bad":
                self._remove(dfd, entry, f"{entry.reason}; removed from the pool")
                return False
            if entry.state != "dirty" or entry.nlink != 1:
                return False
            st = entry_stat(entry)
            fd = self._open_entry(dfd, name, st, os.O_RDONLY)
            if fd is None:
                return False
            try:
                if not safefs.nobody_else_holds(fd):
                    log.warning("pool: %s is still open or mapped by %s; not scrubbed or "
                                "served until they let it go", entry.path,
                                ", ".join(map(str, holders(os.fstat(fd)))) or "another process")
                    return False
                own(fd)  # back from the guest: ours again, before anything else
                self._write_state(name, "scrubbing", st, domain_uuid=entry.domain_uuid,
                                  pid=os.getpid(), start_ticks=own_start_ticks())
            finally:
                os.close(fd)
            # Nobody else has it open, and nobody else can reach its name: this is the
            # only open file of it until we are done.
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            now = os.fstat(fd)
            if not safefs.same_inode(now, st) or now.st_size != entry.key.size_bytes:
                return False
            t0 = monotonic()
            zero_file(fd, entry.key, host, limits)
            seconds = monotonic() - t0
            with self._dir() as dfd, self._pool_lock():
                again = None if dfd is None else safefs.lstat_at(dfd, name)
                now = os.fstat(fd)
                if (again is None or not safefs.same_inode(again, st) or now.st_nlink != 1
                        or now.st_size != entry.key.size_bytes):
                    return False
                self._write_state(name, "clean", now)
        finally:
            os.close(fd)
        log.info("pool: scrubbed %s (%s)", entry.path, format_size(entry.key.size_bytes))
        records.scrub(pool=self.directory, uuid=entry.domain_uuid,
                      bytes=entry.key.size_bytes, seconds=round(seconds, 4),
                      page_size_kib=[entry.key.page_size_kib])
        return True

    def own_file_after_scrub(self, key: PoolKey, domain_uuid: str, host: HostFacts,
                             limits: Limits | None, timeout_s: float) -> bool:
        """A guest started again right after it stopped: its own file of ``key`` is dirty or
        being scrubbed.  Finish that within ``timeout_s``: scrub it here, at the caller's
        priority, or wait for the scrub that holds it, lending that scrub the caller's
        priority (the engine's rule for helpers).  True when the file is clean now (then
        :meth:`take` hands it over, zeroed: the guest never sees its own last run)."""
        deadline = time.monotonic() + timeout_s
        for listed in self.entries():
            if (listed.domain_uuid != domain_uuid or listed.state not in ("dirty", "scrubbing")
                    or listed.key._replace(reserved_uuid=None) != key._replace(
                        reserved_uuid=None)):
                continue
            while time.monotonic() < deadline:
                with self._file_lock(listed.path, wait=False) as got:
                    if got:
                        now = self._entry_now(listed)
                        if now is not None and now.state == "clean":
                            return True
                        return now is not None and self._scrub_one(listed, host, limits)
                lend_priority(*self._scrubber(listed))
                time.sleep(0.005)
        return False

    def hurry_scrub_of(self, domain_uuid: str) -> bool:
        """Lend this thread's priority to the scrub of ``domain_uuid``'s own files now: the
        guest is starting again, and its start will wait for that scrub.  True if lent."""
        lent = False
        for listed in self.entries():
            if listed.domain_uuid == domain_uuid and listed.state == "scrubbing":
                lent = lend_priority(*self._scrubber(listed)) or lent
        return lent

    def _entry_now(self, listed: PoolEntry) -> PoolEntry | None:
        with self._dir() as dfd:
            entry = None if dfd is None else self._entry(dfd, os.path.basename(listed.path),
                                                         listed.key, we_hold_its_lock=True)
        return entry if entry is not None and _same(entry, listed) else None

    def _scrubber(self, listed: PoolEntry) -> tuple[int | None, int | None]:
        """(pid, start ticks) of the process the file's state says scrubs it."""
        with self._dir() as dfd:
            st = None if dfd is None else safefs.lstat_at(dfd, os.path.basename(listed.path))
        record = self._read_state(os.path.basename(listed.path), st) if st else {}
        pid, ticks = record.get("pid"), record.get("start_ticks")
        if record.get("state") != "scrubbing" or not isinstance(pid, int) or pid <= 0:
            return None, None
        return pid, ticks if isinstance(ticks, int) else None

    def give_back_unused(self, listed: PoolEntry) -> bool:
        """Remove a clean file nobody uses (re-checked under the lock); True when removed."""
        with self._dir() as dfd, self._pool_lock():
            entry = None if dfd is None else self._entry(dfd, os.path.basename(listed.path),
                                                         listed.key)
            if dfd is None or entry is None or not _same(entry, listed) or \
                    entry.state != "clean":
                return False
            return self._remove(dfd, entry, "given back: no target needs it")

    def _remove(self, dfd: int, entry: PoolEntry, why: str) -> bool:
        """Remove a pool file's name and state (the file is the pool's own: nobody else can
        make names in its directory)."""
        removed = safefs.unlink_if_same(dfd, os.path.basename(entry.path), entry_stat(entry))
        if removed:
            self._forget_state(entry.path)
            log.log(logging.INFO if entry.state != "bad" else logging.WARNING, "pool: %s: %s",
                    entry.path, why)
        return removed

    def drain(self, at_least_bytes: int | None = None,
              matching: Callable[[PoolEntry], bool] | None = None) -> int:
        """Remove files not in use, oldest first (all of them, or until ``at_least_bytes``
        are given back; only those ``matching`` says yes to, if given); return the bytes
        given back.  Bad files go too, uncounted."""
        freed = 0
        with self._dir() as dfd, self._pool_lock():
            if dfd is None:
                return 0
            for entry in self._entries(dfd):
                if at_least_bytes is not None and freed >= at_least_bytes:
                    break
                if entry.state in ("in_use", "filling", "scrubbing") or entry.nlink > 1:
                    continue
                if matching is not None and not matching(entry):
                    continue
                bad = entry.state == "bad"
                if self._remove(dfd, entry, f"{entry.reason}; removed" if bad else "drained"
                                ) and not bad:
                    freed += entry.key.size_bytes
        return freed


def _same(a: PoolEntry, b: PoolEntry) -> bool:
    return (a.dev, a.ino) == (b.dev, b.ino)


def zero_file(fd: int, key: PoolKey, host: HostFacts, limits: Limits | None = None) -> None:
    """memset every page of the open pool file ``fd`` (``key.size_bytes``, checked by the
    caller against ``fstat``) to zero over a shared mapping, in parallel, then verify a
    sample of pages.  Raises :class:`PoolError` if a sampled page is not zero.

    memset beats punching the range out and populating it again (measured here: 4 GiB of 2M
    pages 0.24 s vs 0.38 s; 2 GiB of tmpfs 0.61 s vs 1.02 s, two threads each) and keeps the
    pages in the pool instead of handing them back to whoever asks first.
    """
    from ..engine.populate import EngineOps, WorkItem, populate
    from ..host import sysmem

    page = key.page_size_kib * 1024
    label = safefs.fd_path(fd)
    items = [WorkItem(fd, offset, length, page, node, key.policy or "bind", label)
             for node, offset, length in split_across_nodes(key.size_bytes, key.host_nodes,
                                                            page)]
    populate(items, host, limits, ops=EngineOps(populate=sysmem.zero_range))
    verify_zero(fd, key.size_bytes, page)


VERIFY_WINDOW = 2 << 20
"""The most of one sampled page :func:`verify_zero` reads: a 1G page is checked at its start,
its end and one window between, not copied whole (that took 5 s for 8 GiB)."""


def verify_zero(fd: int, size_bytes: int, page_size_bytes: int,
                samples: int = VERIFY_SAMPLES) -> None:
    """Check the first, the last and ``samples`` random pages read as zero (a page larger than
    :data:`VERIFY_WINDOW`: its first and last window and one at random)."""
    from ..host import sysmem

    pages = size_bytes // page_size_bytes
    chosen = {0, pages - 1} | {random.randrange(pages) for _ in range(min(samples, pages))}
    window = min(page_size_bytes, VERIFY_WINDOW)
    slots = page_size_bytes // window
    zero = bytes(window)
    addr = sysmem.mmap_shared(fd, size_bytes)
    try:
        for index in sorted(chosen):
            for slot in sorted({0, slots - 1, random.randrange(slots)}):
                start = addr + index * page_size_bytes + slot * window
                if ctypes.string_at(start, window) != zero:
                    raise PoolError(f"page {index} is not zero after scrubbing; the file "
                                    "stays dirty")
    finally:
        sysmem.munmap(addr, size_bytes)


def key_for(size_bytes: int, page_size_kib: int, host_nodes: Sequence[int] = (),
            policy: str | None = None, reserved_uuid: str | None = None) -> PoolKey:
    if size_bytes % (page_size_kib * 1024):
        raise UsageError(f"size {size_bytes} is not a multiple of {page_size_kib} KiB pages")
    return PoolKey(size_bytes, page_size_kib, tuple(sorted(host_nodes)),
                   policy if host_nodes else None, reserved_uuid)


def spawn_scrub(directories: Sequence[str] = (), nice: int = 19) -> int:
    """Start ``kvmaccel pool scrub`` detached (its own session, at ``nice``, its scheduler
    autogroup too, no terminal, no inherited descriptors:
    :func:`kvmaccel.host.process.spawn_detached`); return its pid.  The hook calls this
    after a guest stops."""
    from ..host.process import spawn_detached

    args = [sys.executable, "-m", "kvmaccel", "pool", "scrub", "--nice", str(nice)]
    for d in directories:
        args += ["--dir", d]
    env = {**os.environ, **paths.places().environment()}  # this process's places, resolved
    return spawn_detached(args, nice, env)
