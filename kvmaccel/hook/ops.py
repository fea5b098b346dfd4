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
from ..errors import BackingError, CancelledError, CapacityError
from ..host.facts import read_cpu_quota, read_host
from ..model.units import format_size
from ..plan.config import HookConfig
from ..plan.limits import Limits
from ..pool.files import PoolKey
from ..safefs import write_json_atomic
from . import memdir, overlap
from . import pool as hook_pool
from .filler import STOP_WAIT_S, forget_record
from .filler import stop_filler as stop_the_filler
from .state import cache_path, read_state, recipe_path, state_path, write_state
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
    write_json_atomic(cache_path(plan.uuid), {
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
    from ..model.qemuconf import read_qemu_conf
    from ..plan.planner import plan_domain
    from ..plan.policy import host_policy
    from .front import is_front

    domain = parse_domain(xml)
    host = read_host()
    tuned, energy = host_policy(config.energy, host)
    if energy.max_threads is not None:
        log.info("%s", energy.reason)
    plan = plan_domain(domain, host, read_qemu_conf(config.qemu_conf), config.limits,
                       tuned=tuned, energy=energy, front=is_front(domain.emulator))
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
                  made: list[str] | None = None) -> list[BackingSpec]:
    """One spec per backend, owned like the directory libvirt made for it.  A hugetlb memfd
    served through the front has no such directory (libvirt makes none for a memfd): it is
    made here (:mod:`kvmaccel.hook.memdir`) and appended to ``made``.

    Raises :class:`BackingError` when that directory does not exist (libvirt makes it just
    before ``start begin``).
    """
    from ..engine.backing import BackingSpec

    specs = []
    for b in job.backends:
        directory = os.path.dirname(b.mem_path)
        if (b.make_dir and config is not None and made is not None
                and not os.path.lexists(directory)
                and memdir.is_guest_dir(directory, job.shortname)):
            from ..model.qemuconf import read_qemu_conf

            conf = read_qemu_conf(config.qemu_conf)
            if memdir.make_guest_dir(directory, memdir.qemu_owner(conf.user, conf.group)):
                made.append(directory)
        try:
            st = os.stat(directory)
        except OSError as e:
            raise BackingError(f"{directory}: {e.strerror}; libvirt should have created it "
                               "before 'start begin'", path=b.mem_path) from None
        specs.append(BackingSpec(
            path=b.mem_path, size_bytes=b.size_bytes, nodes=b.host_nodes, policy=b.policy,
            mode=FILE_MODE, uid=st.st_uid, gid=st.st_gid, name=b.alias))
    return specs


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
    specs = backing_specs(job, config, made)
    key = job.uuid or f"name-{job.name}"
    host = read_host()
    # Record first what this start is about to create, so that a crash leaves a trail.
    state: dict[str, object] = {
        "name": job.name, "uuid": job.uuid, "id": job.domain_id, "shortname": job.shortname,
        "files": [s.path for s in specs], "pool_links": [], "start_unix": time.time(),
        "made_dirs": made,
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
        start_overlapped(job, fresh, fresh_backends, linked, state, host, config, t0)
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
        backings, result = populate_backings(specs, host, limits, cancel=cancel, keep_open=True)
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
                     t0: float) -> None:
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
        if created_by_us(path):
            with contextlib.suppress(BackingError):
                freed += release(path)  # by its directory's descriptor, if still that file
                log.info("removed %s", path)
        elif os.path.lexists(path):
            log.warning("%s is no longer the file kvmaccel created; left alone", path)
        forget(path)
    links = state.get("pool_links")
    if domain.uuid and isinstance(links, list) and links:
        hook_pool.release(domain.uuid, [x for x in links if isinstance(x, dict)], config)
    made = state.get("made_dirs")
    for directory in made if isinstance(made, list) else []:
        if isinstance(directory, str) and memdir.remove_guest_dir(directory):
            log.info("removed %s", directory)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    records.append("stop", domain=domain.name, uuid=domain.uuid, bytes=freed,
                   pool_files=len(links) if isinstance(links, list) else 0)
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")


