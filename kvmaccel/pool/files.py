"""The pool's files and their states: what a start from the pool needs, and nothing more.

A warm start runs this module twice, in the two hook calls that precede QEMU (see
:mod:`kvmaccel.hook.warm`), and every millisecond of those is the guest's.  So it imports only
what ``json`` already loads; :mod:`kvmaccel.pool.manage` builds filling, scrubbing and draining on
top (:class:`kvmaccel.pool.manage.Pool` is a :class:`PoolFiles`).

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
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from ..errors import BackingError
from ..paths import run_dir
from ..statefile import write_json_atomic

POOL_DIRNAME = ".kvmaccel-pool"
STATES = ("filling", "clean", "in_use", "dirty", "scrubbing")
_NAME_RE = re.compile(r"^s(\d+)-p(\d+)k-n([\d_]+|any)-(\w+)(?:-u([0-9a-f-]{36}))?\.([0-9a-f]{8})$")


class PoolKey(NamedTuple):
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolKey:
        """The inverse of ``_asdict()`` after a JSON round trip (lists back to tuples)."""
        return cls(int(data["size_bytes"]), int(data["page_size_kib"]),
                   tuple(int(n) for n in data.get("host_nodes") or ()),
                   _opt_str(data.get("policy")), _opt_str(data.get("reserved_uuid")))

    def serves(self, wanted: PoolKey, domain_uuid: str | None) -> bool:
        """A file of this key can back ``wanted`` (unreserved) for guest ``domain_uuid``."""
        return (self._replace(reserved_uuid=None) == wanted._replace(reserved_uuid=None)
                and self.reserved_uuid in (None, domain_uuid))

    def node_bytes(self) -> dict[int | None, int]:
        from ..plan.limits import split_across_nodes

        return {node: length for node, _, length in split_across_nodes(
            self.size_bytes, self.host_nodes, self.page_size_kib * 1024)}


class PoolEntry(NamedTuple):
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


def state_dir_for(directory: str, state_root: str | None = None) -> str:
    """``<state_root or run dir/pool>/<first 16 hex digits of sha256(directory)>``."""
    import hashlib  # loads OpenSSL: only when the caller does not know the state dir

    digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:16]
    return os.path.join(state_root or os.path.join(run_dir(), "pool"), digest)


class PoolFiles:
    """The files of the pool in ``directory`` and their states in ``state_dir`` (by default
    :func:`state_dir_for` the directory)."""

    def __init__(self, directory: str, *, state_root: str | None = None,
                 state_dir: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.state_dir = state_dir or state_dir_for(self.directory, state_root)

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
                return entry._replace(state="in_use", domain_uuid=domain_uuid,
                                      backend_id=backend_id, link_path=os.path.abspath(target),
                                      nlink=2)
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


def reserved_first(entries: list[PoolEntry]) -> list[PoolEntry]:
    return sorted(entries, key=lambda e: e.key.reserved_uuid is None)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
