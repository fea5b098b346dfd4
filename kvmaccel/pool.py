"""The warm pool: pre-populated, pre-zeroed backing files linked into a guest's path at start.

Populating in parallel divides the zeroing cost; the pool takes it off the start path.  A pool
lives in ``<mount>/.kvmaccel-pool/`` on each filesystem (a hugetlbfs mount, a tmpfs) so that
``link()`` can put a pool file at the path libvirt hands QEMU, which must be on the same
filesystem.  After the guest stops, the pool's own link keeps the pages; they still hold the
guest's memory, so the file is *dirty* until a scrub has zeroed every page and checked a
sample.

Each file has a state, kept crash-safe (written to a temporary file, then renamed) under
``<run dir>/pool/<pool id>/``, apart from the file itself (hugetlbfs files cannot be
written with ``write()``):

* ``filling``: being populated (a live process holds the file's lock);
* ``clean``: every page is zero and nobody else links it;
* ``in_use``: linked into a guest's path (``domain_uuid``, ``backend_id``, ``link_path``);
* ``dirty``: a guest used it; must be scrubbed;
* ``scrubbing``: being zeroed (a live process holds the file's lock).

What is read is checked against the file itself: a missing or unreadable state, a state for
another inode, ``filling`` or ``scrubbing`` whose process is gone, ``in_use`` whose guest's
link is gone, and ``clean`` with a second link are all *dirty*.  Only ``clean`` is ever
linked into a guest, and never a file with another link.

Files are interchangeable when their :class:`PoolKey` matches: size, page size, host nodes
and policy (and, optionally, the uuid of the one guest a file is reserved for).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import BackingError, KvmaccelError, UsageError
from .limits import Limits, split_across_nodes
from .slots import run_dir
from .statefile import write_json_atomic
from .units import format_size

if TYPE_CHECKING:  # the hook's fast start path imports this module: keep it light
    from .engine import PopulateResult
    from .host import HostFacts, Mount

log = logging.getLogger(__name__)

POOL_DIRNAME = ".kvmaccel-pool"
STATES = ("filling", "clean", "in_use", "dirty", "scrubbing")
_NAME_RE = re.compile(r"^s(\d+)-p(\d+)k-n([\d_]+|any)-(\w+)(?:-u([0-9a-f-]{36}))?\.([0-9a-f]{8})$")
VERIFY_SAMPLES = 64


class PoolError(KvmaccelError):
    """The pool cannot do what was asked (limit reached, file in use, bad state directory)."""


@dataclass(frozen=True)
class PoolKey:
    """What makes two pool files interchangeable."""

    size_bytes: int
    page_size_kib: int
    host_nodes: tuple[int, ...] = ()
    policy: str | None = None
    reserved_uuid: str | None = None

    def filename(self, tag: str) -> str:
        nodes = "_".join(map(str, self.host_nodes)) or "any"
        name = f"s{self.size_bytes}-p{self.page_size_kib}k-n{nodes}-{self.policy or 'none'}"
        if self.reserved_uuid:
            name += f"-u{self.reserved_uuid}"
        return f"{name}.{tag}"

    @classmethod
    def from_filename(cls, name: str) -> PoolKey | None:
        m = _NAME_RE.match(name)
        if not m:
            return None
        size, page, nodes, policy, uuid, _ = m.groups()
        return cls(int(size), int(page),
                   () if nodes == "any" else tuple(int(n) for n in nodes.split("_")),
                   None if policy == "none" else policy, uuid)

    def serves(self, wanted: PoolKey, domain_uuid: str | None) -> bool:
        """A file of this key can back ``wanted`` (unreserved) for guest ``domain_uuid``."""
        return (replace(self, reserved_uuid=None) == replace(wanted, reserved_uuid=None)
                and self.reserved_uuid in (None, domain_uuid))

    def node_bytes(self) -> dict[int | None, int]:
        return {node: length for node, _, length in split_across_nodes(
            self.size_bytes, self.host_nodes, self.page_size_kib * 1024)}


@dataclass(frozen=True)
class PoolEntry:
    """One pool file as it is now.  ``state`` is the effective state (see the module doc)."""

    path: str
    key: PoolKey
    state: str
    recorded_state: str | None
    domain_uuid: str | None
    backend_id: str | None
    link_path: str | None
    updated_unix: float
    nlink: int

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "state": self.state, "size_bytes": self.key.size_bytes,
                "page_size_kib": self.key.page_size_kib, "host_nodes": list(self.key.host_nodes),
                "policy": self.key.policy, "reserved_uuid": self.key.reserved_uuid,
                "domain_uuid": self.domain_uuid, "backend_id": self.backend_id,
                "link_path": self.link_path, "age_s": round(time.time() - self.updated_unix, 1),
                "links": self.nlink}


def pool_dir_for(path: str, mounts: Sequence[Mount]) -> str:
    """The pool directory on the filesystem that holds ``path`` (its mount point's
    ``.kvmaccel-pool``).  Raises :class:`UsageError` when that is not hugetlbfs or tmpfs."""
    absolute = os.path.abspath(path)
    best: Mount | None = None
    for mount in mounts:
        inside = absolute == mount.path or absolute.startswith(mount.path.rstrip("/") + "/")
        if inside and (best is None or len(mount.path) >= len(best.path)):
            best = mount
    if best is None or best.fs_type not in ("hugetlbfs", "tmpfs"):
        kind = best.fs_type if best else "no mount"
        raise UsageError(f"{path} is on {kind}, not hugetlbfs or tmpfs; a pool lives on the "
                         "filesystem of the guest's memory_backing_dir")
    return os.path.join(best.path, POOL_DIRNAME)


class Pool:
    """The pool on one filesystem.  ``max_bytes`` and ``max_node_bytes`` cap what it holds
    (None: no cap) so that it never starves the guests it is meant to speed up."""

    def __init__(self, directory: str, *, max_bytes: int | None = None,
                 max_node_bytes: int | None = None, state_root: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.max_node_bytes = max_node_bytes
        digest = hashlib.sha256(self.directory.encode()).hexdigest()[:16]
        self.state_dir = os.path.join(state_root or os.path.join(run_dir(), "pool"), digest)

    # --- state files -------------------------------------------------------------------

    def _state_path(self, path: str) -> str:
        return os.path.join(self.state_dir, os.path.basename(path) + ".json")

    def _write_state(self, path: str, state: str, **fields: object) -> None:
        assert state in STATES
        st = os.stat(path)
        record = {"state": state, "dev": st.st_dev, "ino": st.st_ino,
                  "updated_unix": time.time(), **fields}
        write_json_atomic(self._state_path(path), record, durable=True)

    def _read_state(self, path: str) -> dict[str, object]:
        try:
            with open(self._state_path(path), encoding="utf-8") as f:
                record = json.load(f)
            st = os.stat(path)
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or record.get("state") not in STATES:
            return {}
        if (record.get("dev"), record.get("ino")) != (st.st_dev, st.st_ino):
            return {}
        return record

    @contextlib.contextmanager
    def _file_lock(self, path: str, wait: bool = True) -> Iterator[bool]:
        """Hold ``path``'s lock (True) or, with ``wait`` False, say it is held elsewhere."""
        fd = os.open(self._state_path(path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _pool_lock(self) -> Iterator[None]:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _busy(self, path: str) -> bool:
        with self._file_lock(path, wait=False) as got:
            return not got

    # --- reading ---------------------------------------------------------------------------

    def entries(self) -> list[PoolEntry]:
        """Every pool file with its effective state, oldest first."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        out = []
        for name in names:
            key = PoolKey.from_filename(name)
            if key is None:
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            record = self._read_state(path)
            recorded = record.get("state")
            state = "dirty"
            if recorded in ("filling", "scrubbing"):
                state = str(recorded) if self._busy(path) else "dirty"
            elif recorded == "in_use":
                state = "in_use" if st.st_nlink > 1 else "dirty"
            elif recorded == "clean":
                state = "clean" if st.st_nlink == 1 else "dirty"
            updated = record.get("updated_unix", st.st_mtime)
            out.append(PoolEntry(
                path=path, key=key, state=state,
                recorded_state=str(recorded) if recorded else None,
                domain_uuid=_opt_str(record.get("domain_uuid")),
                backend_id=_opt_str(record.get("backend_id")),
                link_path=_opt_str(record.get("link_path")),
                updated_unix=float(updated) if isinstance(updated, int | float) else 0.0,
                nlink=st.st_nlink))
        return sorted(out, key=lambda e: e.updated_unix)

    def clean_for(self, key: PoolKey, domain_uuid: str | None) -> list[PoolEntry]:
        """Clean files that can serve ``key`` for this guest: those reserved for it first,
        then unreserved ones."""
        return reserved_first([e for e in self.entries()
                                if e.state == "clean" and e.key.serves(key, domain_uuid)])

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

    def _new_path(self, key: PoolKey) -> str:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        return os.path.join(self.directory, key.filename(secrets.token_hex(4)))

    def fill(self, key: PoolKey, count: int, host: HostFacts, limits: Limits | None = None
             ) -> list[PopulateResult]:
        """Add ``count`` clean files of ``key``, populating each with the engine.  Stops with
        :class:`PoolError` at the pool's limit (what was added stays).  A file is ``filling``
        while it is populated; a fill that dies leaves it dirty, never clean."""
        from .backing import BackingSpec, populate_backings

        results = []
        for _ in range(count):
            with self._pool_lock():
                why = self.room_for(key)
                if why:
                    raise PoolError(f"{why}; not filling more (raise the pool limits in the "
                                    "config, or drain)")
                path = self._new_path(key)
            spec = BackingSpec(path, key.size_bytes, key.host_nodes, key.policy or "bind")

            def mark_filling(_backings: object, path: str = path) -> None:
                self._write_state(path, "filling")

            with self._file_lock(path):
                _, result = populate_backings([spec], host, limits, on_open=mark_filling)
                self._write_state(path, "clean")
            results.append(result)
        return results

    # --- handing out and taking back -------------------------------------------------------

    def take(self, key: PoolKey, target: str, *, domain_uuid: str, backend_id: str,
             uid: int | None = None, gid: int | None = None, mode: int = 0o600
             ) -> PoolEntry | None:
        """Link a clean file of ``key`` (one reserved for ``domain_uuid`` first, then an
        unreserved one) at ``target`` and mark it in use; None when there is none."""
        with self._pool_lock():
            for entry in self.clean_for(key, domain_uuid):
                self._write_state(entry.path, "in_use", domain_uuid=domain_uuid,
                                  backend_id=backend_id, link_path=os.path.abspath(target))
                try:
                    os.link(entry.path, target)
                except OSError as e:
                    self._write_state(entry.path, "clean")
                    raise BackingError(f"cannot link pool file to {target}: {e.strerror}",
                                       path=target) from e
                if os.stat(entry.path).st_nlink != 2:  # someone else linked it meanwhile
                    os.unlink(target)
                    self._write_state(entry.path, "dirty")
                    continue
                if uid is not None or gid is not None:
                    os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
                os.chmod(target, mode)
                log.info("pool: %s -> %s for %s/%s", entry.path, target, domain_uuid, backend_id)
                return replace(entry, state="in_use", domain_uuid=domain_uuid,
                               backend_id=backend_id, link_path=os.path.abspath(target), nlink=2)
        return None

    def give_back(self, entry: PoolEntry, target: str) -> None:
        """Undo :meth:`take` before any guest ran on the file: unlink ``target`` and mark the
        file clean again."""
        with self._pool_lock():
            with contextlib.suppress(FileNotFoundError):
                if os.path.samefile(target, entry.path):
                    os.unlink(target)
            if os.stat(entry.path).st_nlink == 1:
                self._write_state(entry.path, "clean")

    def adopt(self, source: str, key: PoolKey, *, domain_uuid: str, backend_id: str
              ) -> PoolEntry | None:
        """Add a freshly populated guest file to the pool, in use by that guest, so its next
        start comes from the pool.  None (and a log line) when the pool is at its limit."""
        with self._pool_lock():
            why = self.room_for(key)
            if why:
                log.info("pool: not adopting %s: %s", source, why)
                return None
            path = self._new_path(key)
            os.link(source, path)
            self._write_state(path, "in_use", domain_uuid=domain_uuid, backend_id=backend_id,
                              link_path=os.path.abspath(source))
        return next(e for e in self.entries() if e.path == path)

    def release_domain(self, domain_uuid: str) -> list[PoolEntry]:
        """Mark every file the guest used dirty (its memory is still in them)."""
        released = []
        with self._pool_lock():
            for entry in self.entries():
                if entry.domain_uuid == domain_uuid and entry.recorded_state == "in_use":
                    self._write_state(entry.path, "dirty", domain_uuid=domain_uuid,
                                      backend_id=entry.backend_id)
                    released.append(entry)
        return released

    # --- scrubbing and draining ------------------------------------------------------------

    def scrub(self, host: HostFacts, limits: Limits | None = None) -> list[PoolEntry]:
        """Zero every page of every dirty file with the engine's helpers, check a sample of
        pages, and mark the file clean.  Files another scrubber holds are skipped.  An
        interrupted scrub leaves the file dirty (its state says ``scrubbing`` and nobody
        holds its lock)."""
        done = []
        for entry in self.entries():
            if entry.state != "dirty" or entry.nlink > 1:
                continue
            with self._file_lock(entry.path, wait=False) as got:
                if not got:
                    continue
                self._write_state(entry.path, "scrubbing", domain_uuid=entry.domain_uuid)
                zero_file(entry.path, entry.key, host, limits)
                with self._pool_lock():
                    if os.stat(entry.path).st_nlink != 1:
                        self._write_state(entry.path, "dirty")
                        continue
                    self._write_state(entry.path, "clean")
                done.append(entry)
                log.info("pool: scrubbed %s (%s)", entry.path, format_size(entry.key.size_bytes))
        return done

    def drain(self, at_least_bytes: int | None = None) -> int:
        """Remove files not in use, oldest first (all of them, or until ``at_least_bytes``
        are given back); return the bytes given back."""
        freed = 0
        with self._pool_lock():
            for entry in self.entries():
                if at_least_bytes is not None and freed >= at_least_bytes:
                    break
                if entry.state in ("in_use", "filling", "scrubbing") or entry.nlink > 1:
                    continue
                os.unlink(entry.path)
                for suffix in ("", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._state_path(entry.path) + suffix)
                freed += entry.key.size_bytes
        return freed


def reserved_first(entries: list[PoolEntry]) -> list[PoolEntry]:
    return sorted(entries, key=lambda e: e.key.reserved_uuid is None)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def zero_file(path: str, key: PoolKey, host: HostFacts, limits: Limits | None = None) -> None:
    """memset every page of ``path`` to zero over a shared mapping, in parallel, then verify
    a sample of pages.  Raises :class:`PoolError` if a sampled page is not zero.

    memset beats punching the range out and populating it again (measured here: 4 GiB of 2M
    pages 0.24 s vs 0.38 s; 2 GiB of tmpfs 0.61 s vs 1.02 s, two threads each) and keeps the
    pages in the pool instead of handing them back to whoever asks first.
    """
    from . import sysmem
    from .engine import EngineOps, WorkItem, populate

    page = key.page_size_kib * 1024
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        items = [WorkItem(fd, offset, length, page, node, key.policy or "bind", path)
                 for node, offset, length in split_across_nodes(key.size_bytes, key.host_nodes,
                                                                page)]
        populate(items, host, limits, ops=EngineOps(populate=sysmem.zero_range))
        verify_zero(fd, key.size_bytes, page)
    finally:
        os.close(fd)


def verify_zero(fd: int, size_bytes: int, page_size_bytes: int,
                samples: int = VERIFY_SAMPLES) -> None:
    """Check the first, the last and ``samples`` random pages read as zero."""
    from . import sysmem

    pages = size_bytes // page_size_bytes
    chosen = {0, pages - 1} | {random.randrange(pages) for _ in range(min(samples, pages))}
    addr = sysmem.mmap_shared(fd, size_bytes)
    try:
        zero = bytes(page_size_bytes)
        for index in sorted(chosen):
            data = ctypes.string_at(addr + index * page_size_bytes, page_size_bytes)
            if data != zero:
                raise PoolError(f"page {index} is not zero after scrubbing; the file stays dirty")
    finally:
        sysmem.munmap(addr, size_bytes)


def key_for(size_bytes: int, page_size_kib: int, host_nodes: Sequence[int] = (),
            policy: str | None = None, reserved_uuid: str | None = None) -> PoolKey:
    if size_bytes % (page_size_kib * 1024):
        raise UsageError(f"size {size_bytes} is not a multiple of {page_size_kib} KiB pages")
    return PoolKey(size_bytes, page_size_kib, tuple(sorted(host_nodes)),
                   policy if host_nodes else None, reserved_uuid)


def spawn_scrub(directories: Sequence[str] = (), nice: int = 19) -> int:
    """Start ``kvmaccel pool scrub`` detached (its own session, at ``nice``, no terminal, no
    inherited descriptors); return its pid.  The hook calls this after a guest stops."""
    import subprocess
    args = [sys.executable, "-m", "kvmaccel", "pool", "scrub", "--nice", str(nice)]
    for d in directories:
        args += ["--dir", d]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
    return proc.pid
