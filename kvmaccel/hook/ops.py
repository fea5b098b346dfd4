"""The hook's operations that plan and populate (``prepare``, the full ``start``, ``stop``).

:mod:`kvmaccel.hook.full` imports this module only when an operation needs it: a start that the
warm pool serves runs without it (see :func:`write_recipe`).  A start of a guest planned
before with the same XML populates from the cached plan (:func:`cached_job`) and imports
neither the planner nor the domain parser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ..engine import records
from ..errors import BackingError, CancelledError, CapacityError, KvmaccelError
from ..host.facts import read_cpu_quota, read_host
from ..model.units import format_size
from ..plan.config import HookConfig
from ..plan.limits import Limits
from ..pool.files import PoolKey
from . import memdir, overlap
from . import pool as hook_pool
from .filler import STOP_WAIT_S, forget_record
from .filler import stop_filler as stop_the_filler
from .state import cache_path, read_state, recipe_path, state_path, write_json, write_state
from .warm import FILE_MODE, cached_plan, plan_inputs, write_recipe_if_clean

if TYPE_CHECKING:  # prepare needs neither the engine nor the backings: not imported then
    from ..engine.backing import Backing, BackingSpec
    from ..host.facts import HostFacts
    from ..model.domain import Domain
    from ..plan.planner import DomainPlan

log = logging.getLogger(__name__)


def _domain_key(domain: Domain) -> str:
    return domain.uuid or f"name-{domain.name}"


@dataclasses.dataclass(frozen=True)
class JobBackend:
    """One file a start creates and populates (or takes from the pool)."""

    backend_id: str
    mem_path: str
    size_bytes: int
    host_nodes: tuple[int, ...]
    policy: str  # bind or preferred: how the engine binds the pages
    alias: str
    key: PoolKey
    make_dir: bool = False  # a hugetlb memfd through the front: libvirt makes no directory
    prealloc: bool = False  # QEMU preallocates it itself: a fresh file can overlap that
    prealloc_threads: int | None = None


@dataclasses.dataclass(frozen=True)
class StartJob:
    """What ``start begin`` does for one guest: from its plan, or from the cached plan."""

    uuid: str | None
    name: str
    domain_id: int
    shortname: str
    limits: Limits
    backends: tuple[JobBackend, ...]


def job_from_plan(plan: DomainPlan, limits: Limits) -> StartJob:
    backends = []
    for b in plan.populated:
        assert b.file_path is not None  # populated backends always have a file
        backends.append(JobBackend(
            b.backend_id, b.file_path, b.file_size_bytes, tuple(b.host_nodes or ()),
            "preferred" if b.policy == "preferred" else "bind", b.alias,
            hook_pool.backend_key(b), b.front and b.qom_type == "memory-backend-memfd",
            b.prealloc, b.prealloc_threads))
    return StartJob(plan.uuid, plan.name, plan.domain_id, plan.shortname, limits,
                    tuple(backends))


def cached_job(xml: bytes, config: HookConfig) -> StartJob | None:
    """The job of the cached plan when it still holds for ``xml``, else None."""
    found = cached_plan(xml, config.qemu_conf, config.source)
    if found is None:
        return None
    uuid, domain_id, shortname, cache, backends = found
    try:
        limits = dict(cache["limits"])
        limits["tuned_helpers_per_node"] = tuple(
            (int(n), int(h)) for n, h in limits.get("tuned_helpers_per_node", ()))
        return StartJob(uuid, cache["name"], domain_id, shortname, Limits(**limits), tuple(
            JobBackend(b["backend_id"], b["mem_path"], int(b["size_bytes"]),
                       tuple(int(n) for n in b["host_nodes"]), b["policy"], b["alias"],
                       PoolKey.from_dict(b["key"]), bool(b.get("make_dir")),
                       bool(b.get("prealloc")), _int_or_none(b.get("prealloc_threads")))
            for b in backends))
    except (KeyError, TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write_recipe(plan: DomainPlan, limits: Limits, config: HookConfig, xml: bytes) -> None:
    """Leave what the next calls need so that they do not plan again:

    * ``<uuid>.plan-cache.json``: the part of this plan a start needs, for the next
      ``prepare`` of the same XML (:func:`kvmaccel.hook.warm.prepare_from_cache`);
    * ``<uuid>.prepared.json`` when a clean pool file waits for every backend, for this
      start (:func:`kvmaccel.hook.warm.start_from_pool`).
    """
    if not (plan.uuid and plan.populated):
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(recipe_path(plan.uuid))
    host = read_host()
    backends = []
    for b in job_from_plan(plan, limits).backends:
        pool = hook_pool.pool_for(b.mem_path, host, config)
        head, sep, tail = b.mem_path.partition(f"/{plan.shortname}/")
        if not sep:
            return
        backends.append({**dataclasses.asdict(b), "key": b.key._asdict(),
                         "path_around_shortname": [head, tail],
                         "pool_dir": pool.directory if pool else None,
                         "state_dir": pool.state_dir if pool else None})
    id_text = str(plan.domain_id)
    write_json(cache_path(plan.uuid), {
        "inputs": plan_inputs(xml, config.qemu_conf, config.source),
        "name": plan.name, "limits": dataclasses.asdict(limits),
        "shortname_tail": plan.shortname[len(id_text) + 1:], "backends": backends})
    if config.pool_enabled:
        write_recipe_if_clean(plan.uuid, plan.domain_id, plan.name, plan.shortname, backends)


def make_plan(xml: bytes, config: HookConfig) -> tuple[DomainPlan, Limits]:
    """Parse and plan the guest on this host; also return the limits the engine runs with:
    the config's, with ``<allocation threads='N'/>``, the energy policy and the tuned
    per-node counts applied exactly as the planner applies them (the plan's ``limits``).
    Raises :class:`KvmaccelError` subclasses."""
    from ..model.domain import parse_domain
    from ..plan.forhost import for_host

    domain = parse_domain(xml)
    planning = for_host(config)
    if planning.energy.max_threads is not None:
        log.info("%s", planning.energy.reason)
    plan = planning.plan(domain)
    return plan, plan.limits


def op_prepare(xml: bytes, config: HookConfig) -> None:
    """Plan and check capacity.  Raises :class:`CapacityError` with the numbers."""
    plan, limits = make_plan(xml, config)
    hook_pool.room_for_everything(plan, read_host(), config)
    if not plan.populated:
        reasons = "; ".join(f"{b.backend_id}: {b.skip_reason}" for b in plan.backends)
        log.info("nothing for kvmaccel to populate (%s)", reasons or "no memory backends")
        return
    for check in hook_pool.capacity_after_pool(plan, read_host(), config):
        if not check.ok:
            where = "host-wide" if check.node is None else f"on node {check.node}"
            raise CapacityError(
                f"guest {plan.name} needs {format_size(check.needed_bytes)} of "
                f"{format_size(check.page_size_kib * 1024)} pages {where} but only "
                f"{format_size(check.available_bytes)} is free ({check.source}); reserve more "
                "huge pages or free memory",
                node_id=check.node, page_size_kib=check.page_size_kib,
                needed_bytes=check.needed_bytes, available_bytes=check.available_bytes)
    write_recipe(plan, limits, config, xml)
    log.info("plan: populate %s with %d thread(s)",
             ", ".join(f"{b.file_path} ({format_size(b.file_size_bytes)})"
                       for b in plan.populated), plan.helpers.threads)


def backing_specs(job: StartJob, config: HookConfig | None = None,
                  made: list[str] | None = None,
                  proofs: list[memdir.ProofDir] | None = None) -> list[BackingSpec]:
    """One spec per backend, owned like the directory libvirt made for it.

    A backend served through the front (its file is ``D/.kvmaccel/kvmaccel-<id>``) gets the
    proof directory ``D/.kvmaccel`` made afresh for this start (:mod:`kvmaccel.hook.memdir`),
    appended to ``proofs``, and its file the owner of ``D``.  A hugetlb memfd has no ``D``
    (libvirt makes none for a memfd): it is made here and appended to ``made``; one that
    exists is used only when empty.

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
                if (b.make_dir and config is not None and made is not None
                        and memdir.is_guest_dir(guest, job.shortname)):
                    from ..model.qemuconf import read_qemu_conf

                    conf = read_qemu_conf(config.qemu_conf)
                    if memdir.make_guest_dir(guest, memdir.qemu_owner(conf.user, conf.group)):
                        made.append(guest)
                made_here[guest] = memdir.make_proof_dir(guest)
                proofs.append(made_here[guest])
            uid, gid = made_here[guest].uid, made_here[guest].gid
        else:
            try:
                st = os.stat(directory)
            except OSError as e:
                raise BackingError(f"{directory}: {e.strerror}; libvirt should have created "
                                   "it before 'start begin'", path=b.mem_path) from None
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


def start_populating(xml: bytes, config: HookConfig, cancel: threading.Event | None = None
                     ) -> None:
    """Link what clean pool files serve, create and populate the rest; record them by uuid
    first.  The guest is planned again only when its cached plan no longer holds."""
    from ..engine.backing import populate_backings
    from ..engine.populate import describe_helpers

    t0 = time.monotonic()
    job = cached_job(xml, config)
    if job is None:
        plan, limits = make_plan(xml, config)
        job = job_from_plan(plan, limits)
    if not job.backends:
        log.info("nothing for kvmaccel to populate")
        return
    made: list[str] = []
    proofs: list[memdir.ProofDir] = []
    key = job.uuid or f"name-{job.name}"
    try:
        specs = backing_specs(job, config, made, proofs)
    except BaseException:
        _remove_dirs(proofs, made)
        raise
    host = read_host()
    # Record first what this start is about to create, so that a crash leaves a trail.
    state: dict[str, object] = {
        "name": job.name, "uuid": job.uuid, "id": job.domain_id, "shortname": job.shortname,
        "files": [s.path for s in specs], "pool_links": [], "start_unix": time.time(),
        "made_dirs": made, "proof_dirs": [p.as_dict() for p in proofs],
    }
    write_state(key, state)
    linked, fresh = hook_pool.take(
        job.uuid, [(b.backend_id, b.key, spec) for b, spec in zip(job.backends, specs,
                                                                  strict=True)], host, config)
    state["files"] = [spec.path for _, _, spec in fresh]
    state["pool_links"] = [dataclasses.asdict(link) for link in linked]
    write_state(key, state)
    if not fresh:
        log.info("started from the pool: %s", ", ".join(link.link_path for link in linked))
        records.append("start", domain=job.name, uuid=job.uuid, source="pool",
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
    if config.pool_enabled and hook_pool.make_room(specs, host, config):
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
        write_state(key, {**state, "files": [], "cancelled": True})  # pool links stay
        if timed_out.is_set():
            records.append("start", "timeout", domain=job.name, uuid=job.uuid,
                           source="fresh", seconds=round(time.monotonic() - t0, 4),
                           reason=f"populate ran past populate_timeout_s = "
                                  f"{config.populate_timeout_s:g} s")
            log.warning("populate ran past populate_timeout_s = %g s: cancelled and removed "
                        "the partly populated file(s); QEMU allocates the memory itself",
                        config.populate_timeout_s)
            return
        raise
    except BaseException:
        write_state(key, {**state, "files": []})
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
        adopted = hook_pool.adopt(job.uuid, fresh, backings, host, config)
    finally:
        for backing in backings:
            backing.close()
    state["pool_links"] = [dataclasses.asdict(link) for link in [*linked, *adopted]]
    write_state(key, {**state, "populated_unix": time.time(), "result": result.as_dict()})
    records.append("start", domain=job.name, uuid=job.uuid,
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


def _discard(backings: list[Backing], key: str, state: dict[str, object]) -> None:
    """Remove the files this start created and recorded; the guest's state keeps no file."""
    for backing in backings:
        backing.discard()
    write_state(key, {**state, "files": []})


def start_overlapped(job: StartJob, fresh: list[hook_pool.Fresh],
                     backends: list[JobBackend], linked: list[hook_pool.Linked],
                     state: dict[str, object], host: HostFacts, config: HookConfig,
                     t0: float, proofs: list[memdir.ProofDir] | None = None) -> None:
    """Create and name the fresh files now and leave a detached filler populating them while
    QEMU starts and preallocates them too (:mod:`kvmaccel.hook.overlap` says why that is
    safe).  On any error before the filler starts, nothing this start created is left."""
    from ..engine.backing import open_backings

    key = job.uuid or f"name-{job.name}"
    specs = [spec for _, _, spec in fresh]
    if config.pool_enabled and hook_pool.make_room(specs, host, config):
        host = read_host()
    backings = open_backings(specs, host)
    try:
        check_in_proof_dirs(backings, proofs or [])
        for backing in backings:
            backing.publish()
        adopted = hook_pool.adopt(job.uuid, fresh, backings, host, config)
        state["pool_links"] = [dataclasses.asdict(link) for link in [*linked, *adopted]]
        threads = [overlap.qemu_threads(b.size_bytes, b.prealloc_threads,
                                        len(host.online_cpus)) for b in backends]
        filler = overlap.start_filler(backings, threads, host, job.limits, config, job.name,
                                      key)
        state["filler"] = filler
    except BaseException:
        _discard(backings, key, state)
        raise
    finally:
        for backing in backings:
            backing.close()
    write_state(key, state)
    size = sum(b.size_bytes for b in backends)
    records.append("start", domain=job.name, uuid=job.uuid,
                   source="mixed" if linked else "overlap", bytes=size,
                   seconds=round(time.monotonic() - t0, 4))
    log.info("created %s (%s) and left the filler (pid %s) populating them while QEMU "
             "preallocates them too", ", ".join(str(s.path) for s in specs), format_size(size),
             filler["pid"])


def _remove_dirs(proofs: list[memdir.ProofDir], made: list[str]) -> None:
    """A start that failed before it recorded anything: what it made goes again."""
    remove_made_dirs({"proof_dirs": [p.as_dict() for p in proofs], "made_dirs": made})


def remove_made_dirs(state: dict[str, object]) -> None:
    """The proof directories and the memfd guests' directories a start recorded, each
    removed whole (libvirt has usually removed the guest's directories already)."""
    proofs = state.get("proof_dirs")
    for proof in proofs if isinstance(proofs, list) else []:
        if not isinstance(proof, dict) or not isinstance(proof.get("path"), str):
            continue
        dev, ino = proof.get("dev"), proof.get("ino")
        if memdir.remove_proof_dir(proof["path"], dev if isinstance(dev, int) else None,
                                   ino if isinstance(ino, int) else None):
            log.info("removed %s", proof["path"])
    made = state.get("made_dirs")
    for directory in made if isinstance(made, list) else []:
        if isinstance(directory, str) and memdir.remove_guest_dir(directory):
            log.info("removed %s", directory)


def check_placement(backings: list[Backing]) -> None:
    """Every page of each bound file on its nodes, or :class:`BackingError` (the engine binds
    before it faults, so this only fails when something else went wrong)."""
    from ..engine.placement import check_placement as check

    for b in backings:
        if b.spec.nodes and b.spec.policy == "bind":
            check(b.fd, b.spec.size_bytes, b.page_size_bytes, b.spec.nodes, str(b.path))


def _stop_filler(filler: object) -> None:
    """Stop the guest's filler if it still runs (SIGTERM, then SIGKILL) and say so."""
    outcome = stop_the_filler(filler)
    pid = filler.get("pid") if isinstance(filler, dict) else None
    if outcome == "stopped":
        log.info("stopped the filler (pid %s)", pid)
    elif outcome == "stuck":
        log.warning("the filler (pid %s) did not stop within %g s of SIGKILL; its files are "
                    "released when it exits", pid, STOP_WAIT_S)


def op_stop(xml: bytes, config: HookConfig) -> None:
    """Remove the files kvmaccel created for this guest that are still there; forget them."""
    from ..engine.backing import created_by_us, forget, release
    from ..model.domain import parse_domain

    domain = parse_domain(xml)
    key = _domain_key(domain)
    state = read_state(key)
    forget_record(key)
    if state is None:
        log.debug("no kvmaccel state for %s", key)
        return
    _stop_filler(state.get("filler"))  # it maps the files: stopped before they go
    freed = 0
    files = state.get("files")
    for path in files if isinstance(files, list) else []:
        if not isinstance(path, str):
            continue
        try:
            ours = created_by_us(path)
        except KvmaccelError as e:  # a creation record another user could have written
            log.warning("%s; %s left alone", e, path)
            continue
        if ours:
            with contextlib.suppress(BackingError):
                freed += release(path)  # by its directory's descriptor, if still that file
                log.info("removed %s", path)
        elif os.path.lexists(path):
            log.warning("%s is no longer the file kvmaccel created; left alone", path)
        forget(path)
    links = state.get("pool_links")
    if domain.uuid and isinstance(links, list) and links:
        hook_pool.release(domain.uuid, [x for x in links if isinstance(x, dict)], config)
    remove_made_dirs(state)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    records.append("stop", domain=domain.name, uuid=domain.uuid, bytes=freed,
                   pool_files=len(links) if isinstance(links, list) else 0)
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")


