"""A guest's start, served: pool files linked, the rest created and populated.

:func:`serve` takes a :class:`~kvmaccel.serve.job.StartJob` (from any front) and does the
start's work before QEMU runs: link a clean pool file for each backend one serves (after a
wait for the guest's own last file's scrub), create the rest in the directories the platform
made (with a proof directory for the front's files, :mod:`.memdir`), and populate them, or
leave a filler populating them beside QEMU's own preallocation (:mod:`.overlap`); fresh files
then join the pool.  What it made is in the guest's state (:mod:`.state`) before it is made,
for the stop (:mod:`.stop`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ..engine import records
from ..errors import BackingError, CancelledError
from ..host.facts import read_cpu_quota, read_host
from ..model.units import format_size
from . import memdir, overlap, pool
from .job import Fresh, JobBackend, StartJob
from .state import GuestState, PoolLink, Populated, write_state
from .stop import remove_made_dirs
from .take import FILE_MODE

if TYPE_CHECKING:  # prepare needs neither the engine nor the backings: not imported then
    from ..engine.backing import Backing, BackingSpec
    from ..host.facts import HostFacts
    from ..plan.config import HookConfig

log = logging.getLogger(__name__)


def backing_specs(job: StartJob, dir_owner: tuple[int, int] | None = None,
                  made: list[str] | None = None,
                  proofs: list[memdir.ProofDir] | None = None) -> list[BackingSpec]:
    """One spec per backend, owned like the directory the platform made for it.

    A backend served through the front (its file is ``D/.kvmaccel/kvmaccel-<id>``) gets the
    proof directory ``D/.kvmaccel`` made afresh for this start (:mod:`kvmaccel.serve.memdir`),
    appended to ``proofs``, and its file the owner of ``D``.  A hugetlb memfd has no ``D``
    (libvirt makes none for a memfd): it is made here and appended to ``made``; one that
    exists is used only when empty, and owned by ``dir_owner`` (the qemu user and group).

    Raises :class:`BackingError` when a directory does not exist (libvirt makes it just
    before ``start begin``) or is refused.
    """
    from ..engine.backing import BackingSpec

    specs = []
    made_here: dict[str, memdir.ProofDir] = {}
    for b in job.backends:
        directory = os.path.dirname(b.mem_path)
        guest = memdir.guest_dir_of(b.mem_path)
        if guest is not None and proofs is not None:
            if guest not in made_here:
                if (b.make_dir and dir_owner is not None and made is not None
                        and memdir.is_guest_dir(guest, job.shortname)
                        and memdir.make_guest_dir(guest, dir_owner)):
                    made.append(guest)
                made_here[guest] = memdir.make_proof_dir(guest)
                proofs.append(made_here[guest])
            uid, gid = made_here[guest].uid, made_here[guest].gid
        else:
            try:
                st = os.stat(directory)
            except OSError as e:
                raise BackingError(f"{directory}: {e.strerror}; it should have been made "
                                   "before the start (libvirt makes it just before 'start "
                                   "begin')", path=b.mem_path) from None
            uid, gid = st.st_uid, st.st_gid
        specs.append(BackingSpec(
            path=b.mem_path, size_bytes=b.size_bytes, nodes=b.host_nodes, policy=b.policy,
            mode=FILE_MODE, uid=uid, gid=gid, name=b.alias))
    return specs


def check_in_proof_dirs(backings: list[Backing], proofs: list[memdir.ProofDir]) -> None:
    """Every new file of a front backend is in the proof directory this start made: the
    engine opens its directory by path, and the qemu user may have swapped a symlink or a
    directory of its own in at ``D/.kvmaccel`` since.  Raises :class:`BackingError` before
    anything is populated or named."""
    by_path = {p.path: p for p in proofs}
    for backing in backings:
        proof = by_path.get(os.path.dirname(backing.path or ""))
        if proof is not None and not proof.holds(backing.dir_fd):
            raise BackingError(f"{proof.path} is no longer the directory kvmaccel made for "
                               "this start; refusing to populate there", path=backing.path)


def serve(job: StartJob, config: HookConfig, cancel: threading.Event | None = None, *,
          dir_owner: tuple[int, int] | None = None, t0: float | None = None) -> None:
    """Serve ``job`` before QEMU starts: link what clean pool files serve, create and
    populate the rest (or leave the filler populating them beside QEMU's preallocation);
    record them in the guest's state first.  ``t0``: when the start began (monotonic), for
    its record."""
    from ..engine.backing import populate_backings
    from ..engine.populate import describe_helpers

    t0 = time.monotonic() if t0 is None else t0
    if not job.backends:
        log.info("nothing for kvmaccel to populate")
        return
    made: list[str] = []
    proofs: list[memdir.ProofDir] = []
    key = job.key
    try:
        specs = backing_specs(job, dir_owner, made, proofs)
    except BaseException:
        _remove_dirs(proofs, made)
        raise
    host = read_host()
    # Record first what this start is about to create, so that a crash leaves a trail.
    state = GuestState(job.name, job.uuid, job.domain_id, job.shortname, time.time(),
                       files=tuple(str(s.path) for s in specs), made_dirs=tuple(made),
                       proof_dirs=tuple(p.ref() for p in proofs))
    write_state(key, state)
    linked, fresh = pool.take(
        job.uuid, [(b.backend_id, b.key, spec) for b, spec in zip(job.backends, specs,
                                                                  strict=True)], host, config)
    state = state._replace(files=tuple(str(spec.path) for _, _, spec in fresh),
                           pool_links=tuple(linked))
    write_state(key, state)
    if not fresh:
        log.info("started from the pool: %s", ", ".join(link.link_path for link in linked))
        records.start(domain=job.name, uuid=job.uuid, source="pool",
                      bytes=sum(b.size_bytes for b in job.backends), helpers_per_node={},
                      seconds=round(time.monotonic() - t0, 4))
        return
    specs = [spec for _, _, spec in fresh]
    fresh_ids = {backend_id for backend_id, _, _ in fresh}
    fresh_backends = [b for b in job.backends if b.backend_id in fresh_ids]
    why = overlap.why_not([b.prealloc for b in fresh_backends], config)
    if why is None:
        start_overlapped(job, fresh, fresh_backends, linked, state, host, config, t0, proofs)
        return
    log.debug("populating before QEMU starts: %s", why)
    if config.cgroup:  # populate in kvmaccel's own cgroup: seen and limited in one place
        from ..engine.cgroup import enter

        if enter(config.cgroup):  # helpers sized by the cgroup's CPU quota, not the hook's
            host = dataclasses.replace(host, cpu_quota=read_cpu_quota())
    if config.pool_enabled and pool.make_room(specs, host, config):
        host = read_host()
    limits = job.limits
    cancel = cancel or threading.Event()
    timed_out = threading.Event()

    def out_of_time() -> None:
        timed_out.set()
        cancel.set()

    timer = None
    if config.populate_timeout_s > 0:
        timer = threading.Timer(config.populate_timeout_s, out_of_time)
        timer.daemon = True
        timer.start()
    try:
        backings, result = populate_backings(
            specs, host, limits, cancel=cancel, keep_open=True,
            on_open=lambda opened: check_in_proof_dirs(opened, proofs))
    except CancelledError:
        write_state(key, state._replace(files=(), cancelled=True))  # pool links stay
        if timed_out.is_set():
            records.start("timeout", domain=job.name, uuid=job.uuid,
                          source="fresh", seconds=round(time.monotonic() - t0, 4),
                          reason=f"populate ran past populate_timeout_s = "
                                 f"{config.populate_timeout_s:g} s")
            log.warning("populate ran past populate_timeout_s = %g s: cancelled and removed "
                        "the partly populated file(s); QEMU allocates the memory itself",
                        config.populate_timeout_s)
            return
        raise
    except BaseException:
        write_state(key, state._replace(files=()))
        raise
    finally:
        if timer is not None:
            timer.cancel()
    try:
        check_placement(backings)
    except BaseException:
        _discard(backings, key, state)
        raise
    try:
        adopted = pool.adopt(job.uuid, fresh, backings, host, config)
    finally:
        for backing in backings:
            backing.close()
    write_state(key, state._replace(pool_links=(*linked, *adopted), populated_unix=time.time(),
                                    populated=Populated(result.bytes_total, result.seconds)))
    records.start(domain=job.name, uuid=job.uuid,
                  source="mixed" if linked else "fresh",
                  **{**records.from_result(result.as_dict()),
                     "bytes": sum(b.size_bytes for b in job.backends),
                     "seconds": round(time.monotonic() - t0, 4),
                     "populated_bytes": result.bytes_total,
                     "populate_seconds": round(result.seconds, 4)})
    log.info("populated %s of %s in %.2f s (%.2f GiB/s), %d thread(s), helpers per node %s: "
             "%s", format_size(result.bytes_total), result.memory_text, result.seconds,
             result.gib_per_s, result.threads,
             describe_helpers(result), ", ".join(str(s.path) for s in specs))


def _discard(backings: list[Backing], key: str, state: GuestState) -> None:
    """Remove the files this start created and recorded; the guest's state keeps no file."""
    for backing in backings:
        backing.discard()
    write_state(key, state._replace(files=()))


def start_overlapped(job: StartJob, fresh: list[Fresh],
                     backends: list[JobBackend], linked: list[PoolLink],
                     state: GuestState, host: HostFacts, config: HookConfig,
                     t0: float, proofs: list[memdir.ProofDir] | None = None) -> None:
    """Create and name the fresh files now and leave a detached filler populating them while
    QEMU starts and preallocates them too (:mod:`kvmaccel.serve.overlap` says why that is
    safe).  On any error before the filler starts, nothing this start created is left."""
    from ..engine.backing import open_backings

    key = job.key
    specs = [spec for _, _, spec in fresh]
    if config.pool_enabled and pool.make_room(specs, host, config):
        host = read_host()
    backings = open_backings(specs, host)
    try:
        check_in_proof_dirs(backings, proofs or [])
        for backing in backings:
            backing.publish()
        adopted = pool.adopt(job.uuid, fresh, backings, host, config)
        state = state._replace(pool_links=(*linked, *adopted))
        threads = [overlap.qemu_threads(b.size_bytes, b.prealloc_threads,
                                        len(host.online_cpus)) for b in backends]
        filler = overlap.start_filler(backings, threads, host, job.limits, config, job.name,
                                      key)
        state = state._replace(filler=filler)
    except BaseException:
        _discard(backings, key, state)
        raise
    finally:
        for backing in backings:
            backing.close()
    write_state(key, state)
    size = sum(b.size_bytes for b in backends)
    records.start(domain=job.name, uuid=job.uuid,
                  source="mixed" if linked else "overlap", bytes=size,
                  seconds=round(time.monotonic() - t0, 4))
    log.info("created %s (%s) and left the filler (pid %s) populating them while QEMU "
             "preallocates them too", ", ".join(str(s.path) for s in specs), format_size(size),
             filler.pid)


def _remove_dirs(proofs: list[memdir.ProofDir], made: list[str]) -> None:
    """A start that failed before it recorded anything: what it made goes again."""
    remove_made_dirs(tuple(p.ref() for p in proofs), tuple(made))


def check_placement(backings: list[Backing]) -> None:
    """Every page of each bound file on its nodes, or :class:`BackingError` (the engine binds
    before it faults, so this only fails when something else went wrong)."""
    from ..engine.placement import check_placement as check

    for b in backings:
        if b.spec.nodes and b.spec.policy == "bind":
            check(b.fd, b.spec.size_bytes, b.page_size_bytes, b.spec.nodes, str(b.path))
