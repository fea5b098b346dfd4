"""The pool's files and their states: what a start from the pool needs, and nothing more.

A warm start runs this module twice, in the two hook calls that precede QEMU (see
:mod:`kvmaccel.libvirt.warm`), and every millisecond of those is the guest's.  So it imports only
what ``json`` already loads; :mod:`kvmaccel.pool.manage` builds filling, scrubbing and draining on
top (:class:`kvmaccel.pool.manage.Pool` is a :class:`PoolFiles`).

The pool directory, ``<mount>/.kvmaccel-pool``, is root's, 0700, opened ``O_NOFOLLOW`` and
checked at every use; anything else (one a user made first on a world-writable tmpfs, a
symlink) is refused (:class:`~kvmaccel.errors.UnsafePathError`).  File work here follows
:mod:`kvmaccel.safefs`.  Each file has a state, kept crash-safe under
``<run dir>/pool/<pool id>/``, apart from the file (hugetlbfs files cannot be ``write()``-n):

* ``filling``: being populated (a live process holds the file's lock; rare: fills populate
  unnamed files and link them in clean);
* ``clean``: every page is zero, nobody else links it, it is root's and of its named size;
* ``in_use``: linked into a guest's path (``domain_uuid``, ``backend_id``, ``link_path``);
* ``dirty``: a guest used it; must be scrubbed;
* ``scrubbing``: being zeroed (a live process holds the file's lock).

What is read is checked against the file itself: a missing or unreadable state, a state for
another inode, ``filling`` or ``scrubbing`` whose process is gone, ``in_use`` whose guest's
link is gone, and ``clean`` with a second link are all *dirty*.  A file that is not a regular
file of the size its name says (a guest can ``ftruncate`` the file it was given), or a
``clean`` one that is not root's, is *bad*: never scrubbed as it is, never served, removed by
the next scrub or drain.  Only ``clean`` is ever linked into a guest, never a file with another
link, and never one that any other process still has open or mapped (a write lease proves it:
:func:`kvmaccel.safefs.nobody_else_holds`); such a file is *held* (``pool list``) and waits.

Every change of state happens under the pool's lock, with the file's inode, link count and
size checked again at that moment, so two scrubs, a scrub and a take, or a fill and a drain
never act on a stale view.

Files are interchangeable when their :class:`PoolKey` matches: size, page size, host nodes
and policy (and, optionally, the uuid of the one guest a file is reserved for).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from .. import safefs
from ..errors import BackingError, UnsafePathError
from ..paths import run_dir
from ..safefs import private_dirs, write_json_atomic

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
    reason: str | None = None
    dev: int = 0
    ino: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "state": self.state, "size_bytes": self.key.size_bytes,
                "page_size_kib": self.key.page_size_kib, "host_nodes": list(self.key.host_nodes),
                "policy": self.key.policy, "reserved_uuid": self.key.reserved_uuid,
                "domain_uuid": self.domain_uuid, "backend_id": self.backend_id,
                "link_path": self.link_path, "age_s": round(time.time() - self.updated_unix, 1),
                "links": self.nlink, "reason": self.reason}


def state_dir_for(directory: str, state_root: str | None = None) -> str:
    """``<state_root or run dir/pool>/<first 16 hex digits of sha256(directory)>``."""
    import hashlib  # loads OpenSSL: only when the caller does not know the state dir

    digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:16]
    return os.path.join(state_root or os.path.join(run_dir(), "pool"), digest)


class PoolFiles:
    """The files of the pool in ``directory`` and their states in ``state_dir`` (by default
    :func:`state_dir_for` the directory).

    Every operation opens the pool directory anew (``O_NOFOLLOW``) and checks it is a
    directory of our own user with mode 0700 (:class:`~kvmaccel.errors.UnsafePathError`
    otherwise); names in it are reached only relative to that descriptor."""

    def __init__(self, directory: str, *, state_root: str | None = None,
                 state_dir: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.state_dir = state_dir or state_dir_for(self.directory, state_root)

    # --- the directory --------------------------------------------------------------------

    @contextlib.contextmanager
    def _dir(self, create: bool = False) -> Iterator[int | None]:
        """The pool directory's descriptor, checked; None when it does not exist (unless
        ``create``: then it is made, 0700)."""
        parent, name = os.path.split(self.directory)
        parent_fd = safefs.open_dir(parent, follow=True)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
            try:
                fd = os.open(name, safefs.O_DIR_NOFOLLOW, dir_fd=parent_fd)
            except FileNotFoundError:
                fd = -1
            except OSError as e:  # ELOOP: a symlink; ENOTDIR: a file
                raise UnsafePathError(
                    f"pool directory {self.directory} is not a directory ({e.strerror}): "
                    "kvmaccel did not make it; remove it and run again",
                    path=self.directory) from None
        finally:
            os.close(parent_fd)
        if fd < 0:
            yield None
            return
        try:
            safefs.check_private_dir(fd, self.directory, what="pool directory")
            yield fd
        finally:
            os.close(fd)

    # --- state files -------------------------------------------------------------------

    def _state_path(self, path: str) -> str:
        return os.path.join(self.state_dir, os.path.basename(path) + ".json")

    def _write_state(self, path: str, state: str, st: os.stat_result | None = None,
                     **fields: object) -> None:
        """Record ``state`` for the pool file named like ``path``, for the inode ``st`` (by
        default the one that name has now)."""
        assert state in STATES
        if st is None:
            with self._dir() as dfd:
                st = os.stat(os.path.basename(path), dir_fd=dfd, follow_symlinks=False)
        record = {"state": state, "dev": st.st_dev, "ino": st.st_ino,
                  "updated_unix": time.time(), **fields}
        write_json_atomic(self._state_path(path), record, durable=True)

    def _read_state(self, name: str, st: os.stat_result) -> dict[str, object]:
        """The state recorded for ``name`` if it is of the inode ``st``, else {}."""
        try:  # only kvmaccel's own file in its own directory: a planted "clean" serves
            record = safefs.read_own_json(self._state_path(name))  # a dirty file to a guest
        except (OSError, ValueError, UnsafePathError):
            return {}
        if not isinstance(record, dict) or record.get("state") not in STATES:
            return {}
        if (record.get("dev"), record.get("ino")) != (st.st_dev, st.st_ino):
            return {}
        return record

    def _forget_state(self, name: str) -> None:
        for suffix in ("", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._state_path(name) + suffix)

    @contextlib.contextmanager
    def _file_lock(self, path: str, wait: bool = True) -> Iterator[bool]:
        """Hold ``path``'s lock (True) or, with ``wait`` False, say it is held elsewhere."""
        private_dirs(self.state_dir)
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
        """Every change of a pool file's state happens under this lock, re-checked then."""
        private_dirs(self.state_dir)
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

    def entries(self, *, probe_holders: bool = False) -> list[PoolEntry]:
        """Every pool file with its effective state, oldest first.  ``probe_holders`` also
        tells a dirty file some other process still has open or mapped (``held``)."""
        with self._dir() as dfd, (self._pool_lock() if probe_holders  # a probe takes a lease:
                                  else contextlib.nullcontext()):  # not while a take holds one
            return [] if dfd is None else self._entries(dfd, probe_holders)

    def _entries(self, dfd: int, probe_holders: bool = False) -> list[PoolEntry]:
        out = []
        for name in sorted(os.listdir(dfd)):
            key = PoolKey.from_filename(name)
            if key is not None:
                entry = self._entry(dfd, name, key, probe_holders)
                if entry is not None:
                    out.append(entry)
        return sorted(out, key=lambda e: e.updated_unix)

    def _entry(self, dfd: int, name: str, key: PoolKey, probe_holders: bool = False,
               we_hold_its_lock: bool = False) -> PoolEntry | None:
        """One pool file as it is now (None when the name is gone).  ``we_hold_its_lock``: the
        caller holds the file's lock, so a ``filling`` or ``scrubbing`` state is a dead
        process's."""
        st = safefs.lstat_at(dfd, name)
        if st is None:
            return None
        record = self._read_state(name, st)
        recorded = record.get("state")
        linked = recorded == "in_use" and st.st_nlink > 1
        # A file back from a guest is the guest's until a scrub takes it back; a clean one
        # must be ours.
        reason = None if linked else _unfit(st, key, owner_ok=recorded != "clean")
        state = "dirty"
        if recorded in ("filling", "scrubbing"):
            busy = not we_hold_its_lock and self._busy(name)
            state = str(recorded) if busy else (
                "bad" if reason else "dirty")
        elif reason:
            state = "bad"
        elif recorded == "in_use":
            state = "in_use" if linked else "dirty"
        elif recorded == "clean":
            state = "clean" if st.st_nlink == 1 else "dirty"
        if state == "dirty" and probe_holders and st.st_nlink == 1 and not self._free(dfd, name,
                                                                                      st):
            state, reason = "held", "another process still has it open or mapped"
        updated = record.get("updated_unix", st.st_mtime)
        return PoolEntry(
            path=os.path.join(self.directory, name), key=key, state=state,
            recorded_state=str(recorded) if recorded else None,
            domain_uuid=_opt_str(record.get("domain_uuid")),
            backend_id=_opt_str(record.get("backend_id")),
            link_path=_opt_str(record.get("link_path")),
            updated_unix=float(updated) if isinstance(updated, int | float) else 0.0,
            nlink=st.st_nlink, reason=reason, dev=st.st_dev, ino=st.st_ino)

    def _free(self, dfd: int, name: str, st: os.stat_result) -> bool:
        """No process but us has the file open or mapped (see
        :func:`kvmaccel.safefs.nobody_else_holds`)."""
        fd = self._open_entry(dfd, name, st, os.O_RDONLY)
        if fd is None:
            return False
        try:
            return safefs.nobody_else_holds(fd)
        finally:
            os.close(fd)

    def _open_entry(self, dfd: int, name: str, st: os.stat_result, flags: int) -> int | None:
        """Open pool file ``name`` if it is still the inode ``st``, a regular file of the
        size its name says with no other link; else None."""
        key = PoolKey.from_filename(name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError:
            return None
        now = os.fstat(fd)
        if (key is None or not safefs.same_inode(now, st) or now.st_nlink != 1
                or _unfit(now, key, owner_ok=True)):
            os.close(fd)
            return None
        return fd

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
        unreserved one) at ``target`` and mark it in use; None when there is none.

        Owner (default: the target directory's) and mode are set on the file's descriptor
        before it is linked, by descriptor, into the target directory (opened
        ``O_NOFOLLOW``); a file some other process still holds is never handed over."""
        directory, name = os.path.split(os.path.abspath(target))
        with self._dir() as dfd, self._pool_lock():
            if dfd is None:
                return None
            try:
                tfd = safefs.open_dir(directory)
            except OSError as e:
                raise BackingError(f"cannot open {directory} for a pool file: {e.strerror}",
                                   path=target) from None
            try:
                tst = os.fstat(tfd)
                owner = (tst.st_uid if uid is None else uid, tst.st_gid if gid is None else gid)
                for entry in reserved_first([e for e in self._entries(dfd) if e.state == "clean"
                                             and e.key.serves(key, domain_uuid)]):
                    taken = self._hand_over(dfd, entry, tfd, name, owner, mode,
                                            domain_uuid=domain_uuid, backend_id=backend_id,
                                            link_path=os.path.join(directory, name))
                    if taken is not None:
                        return taken
            finally:
                os.close(tfd)
        return None

    def _hand_over(self, dfd: int, entry: PoolEntry, tfd: int, name: str,
                   owner: tuple[int, int], mode: int, **fields: str) -> PoolEntry | None:
        pool_name = os.path.basename(entry.path)
        st = os.stat(pool_name, dir_fd=dfd, follow_symlinks=False)
        if not _is(entry, st):
            return None
        fd = self._open_entry(dfd, pool_name, st, os.O_RDONLY)
        if fd is None:
            return None
        try:
            if not self._placed_right(dfd, entry, fd, st):
                return None
            if not safefs.nobody_else_holds(fd):
                from ..host.proc import holders

                self._write_state(pool_name, "dirty", st)
                log_warning(f"pool: {entry.path} is still open or mapped by "
                            f"{', '.join(map(str, holders(st))) or 'another process'}; "
                            "not handed out, and not scrubbed while it is")
                return None
            self._write_state(pool_name, "in_use", st, **fields)
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            try:
                safefs.link_fd(fd, tfd, name)
            except OSError as e:
                own(fd)
                self._write_state(pool_name, "clean", st)
                raise BackingError(f"cannot link pool file to {fields['link_path']}: "
                                   f"{e.strerror}", path=fields["link_path"]) from e
            if os.fstat(fd).st_nlink != 2:  # linked elsewhere meanwhile: not ours to give
                safefs.unlink_if_same(tfd, name, st)
                own(fd)
                self._write_state(pool_name, "dirty", st)
                return None
        finally:
            os.close(fd)
        return entry._replace(state="in_use", domain_uuid=fields["domain_uuid"],
                              backend_id=fields["backend_id"], link_path=fields["link_path"],
                              nlink=2)

    def _placed_right(self, dfd: int, entry: PoolEntry, fd: int, st: os.stat_result) -> bool:
        """A bound file's pages must all be on its nodes: QEMU's mbind would not move them.
        A file that is wrong is removed from the pool (scrubbing would not move them either).
        Checked on the descriptor, with no mapping left when it returns (the lease of
        :meth:`_hand_over` comes next)."""
        key = entry.key
        if not key.host_nodes or key.policy not in ("bind", "interleave"):
            return True  # unbound, or preferred: pages may be anywhere
        from ..engine.placement import placement  # only for bound files: the warm path stays light

        try:
            found = placement(fd, key.size_bytes, key.page_size_kib * 1024, key.host_nodes)
            if not found.misplaced:
                return True
            why = (f"has {found.misplaced} page(s) off node(s) "
                   f"{','.join(map(str, key.host_nodes))} ({found.describe()})")
        except BackingError as e:  # not complete: a clean file always is
            why = str(e)
        log_warning(f"pool: {entry.path} {why}; removed from the pool, not handed out")
        safefs.unlink_if_same(dfd, os.path.basename(entry.path), st)
        self._forget_state(os.path.basename(entry.path))
        return False

    def give_back(self, entry: PoolEntry, target: str) -> None:
        """Undo :meth:`take` before any guest ran on the file: unlink ``target`` (if it is
        still that file) and mark the file clean again, unless someone opened it meanwhile."""
        directory, name = os.path.split(os.path.abspath(target))
        pool_name = os.path.basename(entry.path)
        with self._dir() as dfd, self._pool_lock():
            if dfd is None:
                return
            st = safefs.lstat_at(dfd, pool_name)
            if st is None or not _is(entry, st):
                return
            with contextlib.suppress(OSError), safefs.opened_dir(directory) as tfd:
                safefs.unlink_if_same(tfd, name, st)
            fd = os.open(pool_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
            try:
                own(fd)
                free = os.fstat(fd).st_nlink == 1 and safefs.nobody_else_holds(fd)
                self._write_state(pool_name, "clean" if free else "dirty", st)
            finally:
                os.close(fd)


def entry_stat(entry: PoolEntry) -> os.stat_result:
    """A stat result that carries the entry's device and inode, as it was listed (what
    :func:`kvmaccel.safefs.same_inode` and the state files compare)."""
    return os.stat_result((0, entry.ino, entry.dev, 0, 0, 0, 0, 0, 0, 0))


def _is(entry: PoolEntry, st: os.stat_result) -> bool:
    """``st`` is the inode the entry was listed with."""
    return (st.st_dev, st.st_ino) == (entry.dev, entry.ino)


def _unfit(st: os.stat_result, key: PoolKey, owner_ok: bool = False) -> str | None:
    """Why a pool file may not be scrubbed or served as it is (None: it may)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != key.size_bytes:
        return f"holds {st.st_size} bytes, its name says {key.size_bytes}"
    if not owner_ok and st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    return None


def own(fd: int) -> None:
    """Take a pool file back: our user's, mode 0600."""
    os.fchown(fd, os.geteuid(), os.getegid())
    os.fchmod(fd, 0o600)


def log_warning(message: str) -> None:
    """A warning without importing logging here (the warm path must stay light): the full
    modules' loggers handle it when they are loaded."""
    import logging

    logging.getLogger("kvmaccel.pool").warning("%s", message)


def reserved_first(entries: list[PoolEntry]) -> list[PoolEntry]:
    return sorted(entries, key=lambda e: e.key.reserved_uuid is None)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
