"""The warm pool at a guest's start and stop: what a start does with :mod:`kvmaccel.pool.manage`.

* before the start (libvirt's ``prepare begin``): a backend a clean pool file can serve needs
  no free pages; the capacity check counts only the rest (:mod:`.room`).
* at the start: for each backend the plan populates, link a clean pool file of the same
  :class:`~kvmaccel.pool.manage.PoolKey` at the path libvirt hands QEMU (owner, group and mode as
  the hook's own files); the backends no pool file serves are populated fresh, and each fresh
  file then joins the pool, in use by this guest (within the pool's limits), so that the
  guest's next start comes from the pool.
* at the stop: the guest's pool files still hold its memory: mark them
  dirty and start a detached scrub at nice 19.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import safefs
from ..errors import UnsafePathError, UsageError
from ..pool.discovery import refused_line
from ..pool.manage import (
    Pool,
    PoolEntry,
    PoolKey,
    pool_dir_for,
    spawn_scrub,
)
from .job import Fresh
from .state import PoolLink

if TYPE_CHECKING:  # a start from a cached plan imports neither the planner nor the config
    from ..engine.backing import Backing, BackingSpec
    from ..host.facts import HostFacts
    from ..plan.config import HookConfig

log = logging.getLogger(__name__)


def pool_for(path: str, host: HostFacts, config: HookConfig) -> Pool | None:
    """The pool on ``path``'s filesystem, or None (pool disabled, not a pool filesystem, or
    a pool directory that is not kvmaccel's: :func:`refused`)."""
    if not config.pool_enabled:
        return None
    try:
        directory = pool_dir_for(path, host.mounts)
    except UsageError:
        return None
    pool = Pool(directory, max_bytes=config.pool_max_bytes,
                max_node_bytes=config.pool_max_node_bytes)
    try:
        pool.check()
    except UnsafePathError as e:
        refused(e)
        return None
    return pool


_refused: set[str] = set()


def refused(e: UnsafePathError) -> None:
    """A start never fails because of a pool, not even under ``strict`` (which is about
    room for the guest): a pool directory that is not kvmaccel's (one another user made
    first on a world-writable tmpfs, a symlink, a file) is not used, with one warning line
    per hook call.  Its guests start as if it were not there."""
    if e.path not in _refused:
        _refused.add(str(e.path))
        log.warning("%s", refused_line(e))


def take(domain_uuid: str | None, backends: Sequence[Fresh], host: HostFacts,
         config: HookConfig) -> tuple[list[PoolLink], list[Fresh]]:
    """Link clean pool files for what they can serve; return (linked, still to populate)."""
    linked: list[PoolLink] = []
    fresh: list[Fresh] = []
    for backend_id, key, spec in backends:
        assert spec.path is not None
        pool = pool_for(spec.path, host, config) if domain_uuid else None
        entry = None
        if pool is not None and domain_uuid:
            try:
                entry = _take_one(pool, key, spec, domain_uuid, backend_id, host, config)
            except UnsafePathError as e:  # made by another user since pool_for looked
                refused(e)
        if entry is None or pool is None:
            fresh.append((backend_id, key, spec))
            continue
        linked.append(PoolLink(backend_id, spec.path, entry.path, pool.directory))
        log.info("%s: from the pool (%s)", spec.path, entry.path)
    return linked, fresh


def _take_one(pool: Pool, key: PoolKey, spec: BackingSpec, domain_uuid: str, backend_id: str,
              host: HostFacts, config: HookConfig) -> PoolEntry | None:
    assert spec.path is not None
    entry = pool.take(key, spec.path, domain_uuid=domain_uuid, backend_id=backend_id,
                      uid=spec.uid, gid=spec.gid, mode=spec.mode)
    t0 = time.monotonic()
    if entry is None and pool.own_file_after_scrub(
            key, domain_uuid, host, config.limits, own_file_wait_s(config)):
        log.info("%s: waited %.2f s for the scrub of this guest's own last file",
                 spec.path, time.monotonic() - t0)
        entry = pool.take(key, spec.path, domain_uuid=domain_uuid, backend_id=backend_id,
                          uid=spec.uid, gid=spec.gid, mode=spec.mode)
    return entry


def adopt(domain_uuid: str | None, fresh: Sequence[Fresh], backings: Sequence[Backing],
          host: HostFacts, config: HookConfig) -> list[PoolLink]:
    """Add freshly populated files, still open as ``backings``, to the pool, in use by this
    guest (within its limits).  Each is linked by its descriptor: the guest's directory
    belongs to the qemu user, who may have put anything at the file's path by now."""
    adopted = []
    for (backend_id, key, spec), backing in zip(fresh, backings, strict=True):
        assert spec.path is not None
        pool = pool_for(spec.path, host, config) if domain_uuid else None
        if pool is None or domain_uuid is None:
            continue
        try:
            entry = pool.adopt(backing.fd, key, domain_uuid=domain_uuid,
                               backend_id=backend_id, link_path=spec.path)
        except UnsafePathError as e:  # made by another user since pool_for looked
            refused(e)
            continue
        if entry is not None:
            adopted.append(PoolLink(backend_id, spec.path, entry.path, pool.directory))
    return adopted


OWN_FILE_WAIT_S = 300.0
"""How long a start waits for its own last file's scrub before populating a fresh one (a
scrub zeroes at about the speed a populate does, so a wait this long is already slower)."""


def own_file_wait_s(config: HookConfig) -> float:
    timeout = config.populate_timeout_s
    return min(timeout, OWN_FILE_WAIT_S) if timeout > 0 else OWN_FILE_WAIT_S


def release(domain_uuid: str, links: Sequence[PoolLink],
            config: HookConfig | None = None) -> list[str]:
    """The guest stopped: unlink its pool links that libvirt left, mark its pool files dirty
    and start a detached scrub of those pools (forked from the hook with ``config``, else
    ``kvmaccel pool scrub``).  Returns the pool directories touched."""
    pool_dirs: list[str] = []
    for _, link_path, pool_path, pool_dir in links:
        # Unlink the guest's name only if it is still the pool file (lstat, relative to the
        # directory opened O_NOFOLLOW: whatever the qemu user put there is left alone).
        with contextlib.suppress(OSError):
            pool_st = os.stat(pool_path, follow_symlinks=False)
            with safefs.opened_dir(os.path.dirname(link_path)) as dir_fd:
                safefs.unlink_if_same(dir_fd, os.path.basename(link_path), pool_st)
        if pool_dir not in pool_dirs:
            pool_dirs.append(pool_dir)
    for pool_dir in pool_dirs:
        dirty = Pool(pool_dir).release_domain(domain_uuid)
        log.info("pool %s: %d file(s) of this guest to scrub", pool_dir, len(dirty))
    if pool_dirs:
        pid = fork_scrub(pool_dirs, config) if config is not None else spawn_scrub(pool_dirs)
        log.info("scrubbing in the background (pid %d, nice 19)", pid)
    return pool_dirs


SCRUB_NICE = 19


def fork_scrub(pool_dirs: Sequence[str], config: HookConfig) -> int:
    """Scrub ``pool_dirs`` in a child of the hook, detached as ``kvmaccel pool scrub
    --detach`` is (its own session and autogroup, nice 19, the config's cgroup): forked, it
    zeroes within milliseconds of the stop instead of after an interpreter's start (about
    0.3 s at nice 19), which a guest started again at once waits for.  Returns its pid."""
    from .overlap import fork_detached

    def scrub() -> int:
        from ..host.facts import read_host

        if config.cgroup:
            from ..engine.cgroup import enter

            enter(config.cgroup)
        # Every thread of the scrub is at nice 19 in an autogroup of 19, the calling one too:
        # a busy CPU only slows it, never holds up anyone else, so no idle-CPU check (a
        # host busy at the stop would leave it one thread, and a restart waiting for it a
        # second more).
        limits = replace(config.limits, nice=SCRUB_NICE, idle_cpus_only=False)
        host = read_host()
        try:
            for directory in pool_dirs:
                Pool(directory).scrub(host, limits)
        except KeyboardInterrupt:
            log.info("pool: scrub stopped (SIGTERM); the files stay dirty")
            return 1
        return 0

    return fork_detached("kvmaccel-scrub", SCRUB_NICE, scrub)


def make_room(specs: Sequence[BackingSpec], host: HostFacts, config: HookConfig) -> int:
    """A pool must never starve the guests it serves: when the files about to be populated
    would not fit, give back pool files nobody uses (oldest first) on their filesystems
    until they do.  Returns the bytes given back."""
    from ..engine.backing import check_room

    freed = 0
    for spec in specs:
        assert spec.path is not None
        shortfall = check_room([spec], host)
        pool = pool_for(spec.path, host, config) if shortfall else None
        if pool is not None:
            try:
                got = pool.drain(at_least_bytes=shortfall)
            except UnsafePathError as e:
                refused(e)
                continue
            log.info("pool %s: gave back %d bytes to make room for %s", pool.directory, got,
                     spec.path)
            freed += got
    return freed
