"""The hook's operations that plan and populate (``prepare``, the full ``start``, ``stop``).

:mod:`kvmaccel.hook` imports this module only when an operation needs it: a start that the
warm pool serves runs without it (see :func:`write_recipe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from . import hook_pool
from .config import HookConfig
from .domain import Domain, parse_domain
from .errors import BackingError, CancelledError, CapacityError
from .hook_fast import (
    FILE_MODE,
    cache_path,
    file_identity,
    plan_inputs,
    read_state,
    recipe_path,
    state_path,
    write_recipe_if_clean,
    write_state,
)
from .host import read_host
from .limits import Limits
from .plan import DomainPlan, plan_domain
from .policy import host_policy
from .qemuconf import read_qemu_conf
from .statefile import write_json_atomic
from .units import format_size

if TYPE_CHECKING:  # prepare needs neither the engine nor the backings: not imported then
    from .backing import BackingSpec

log = logging.getLogger(__name__)


def _domain_key(domain: Domain) -> str:
    return domain.uuid or f"name-{domain.name}"


def write_recipe(plan: DomainPlan, config: HookConfig, xml: bytes) -> None:
    """Leave what a start from the pool needs, so that it does not plan again:

    * ``<uuid>.plan-cache.json``: the pool-related part of this plan, for the next
      ``prepare`` of the same XML (:func:`kvmaccel.hook_fast.prepare_from_cache`);
    * ``<uuid>.prepared.json`` when a clean pool file waits for every backend, for this
      start (:func:`kvmaccel.hook_fast.start_from_pool`).
    """
    if not (config.pool_enabled and plan.uuid and plan.populated):
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(recipe_path(plan.uuid))
    host = read_host()
    backends = []
    for b in plan.populated:
        assert b.mem_path is not None
        pool = hook_pool.pool_for(b.mem_path, host, config)
        head, sep, tail = b.mem_path.partition(f"/{plan.shortname}/")
        if pool is None or not sep:
            return
        backends.append({"backend_id": b.backend_id, "mem_path": b.mem_path,
                         "path_around_shortname": [head, tail], "pool_dir": pool.directory,
                         "state_dir": pool.state_dir,
                         "key": hook_pool.backend_key(b)._asdict()})
    id_text = str(plan.domain_id)
    write_json_atomic(cache_path(plan.uuid), {
        "inputs": plan_inputs(xml, config.qemu_conf,
                              file_identity(config.path) if config.path else None),
        "name": plan.name,
        "shortname_tail": plan.shortname[len(id_text) + 1:], "backends": backends})
    write_recipe_if_clean(plan.uuid, plan.domain_id, plan.name, plan.shortname, backends)


def make_plan(xml: bytes, config: HookConfig) -> tuple[DomainPlan, Limits]:
    """Parse and plan the guest on this host; also return the limits the engine runs with:
    the config's, with ``<allocation threads='N'/>``, the energy policy and the tuned
    per-node counts applied exactly as the planner applies them (the plan's ``limits``).
    Raises :class:`KvmaccelError` subclasses."""
    domain = parse_domain(xml)
    host = read_host()
    tuned, energy = host_policy(config.energy, host)
    if energy.max_threads is not None:
        log.info("%s", energy.reason)
    plan = plan_domain(domain, host, read_qemu_conf(config.qemu_conf), config.limits,
                       tuned=tuned, energy=energy)
    return plan, plan.limits


def op_prepare(xml: bytes, config: HookConfig) -> None:
    """Plan and check capacity.  Raises :class:`CapacityError` with the numbers."""
    plan, _ = make_plan(xml, config)
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
    write_recipe(plan, config, xml)
    log.info("plan: populate %s with %d thread(s)",
             ", ".join(f"{b.mem_path} ({format_size(b.file_size_bytes)})"
                       for b in plan.populated), plan.helpers.threads)


def backing_specs(plan: DomainPlan) -> list[BackingSpec]:
    """One spec per populated backend, owned like the directory libvirt made for it.

    Raises :class:`BackingError` when that directory does not exist (libvirt makes it just
    before ``start begin``).
    """
    from .backing import BackingSpec

    specs = []
    for b in plan.populated:
        assert b.mem_path is not None  # populated backends always have a file
        directory = os.path.dirname(b.mem_path)
        try:
            st = os.stat(directory)
        except OSError as e:
            raise BackingError(f"{directory}: {e.strerror}; libvirt should have created it "
                               "before 'start begin'", path=b.mem_path) from None
        specs.append(BackingSpec(
            path=b.mem_path, size_bytes=b.file_size_bytes, nodes=b.host_nodes or (),
            policy="preferred" if b.policy == "preferred" else "bind", mode=FILE_MODE,
            uid=st.st_uid, gid=st.st_gid, name=b.alias))
    return specs


def start_populating(xml: bytes, config: HookConfig, cancel: threading.Event | None = None
                     ) -> None:
    """Link what clean pool files serve, create and populate the rest; record them by uuid
    first."""
    from .backing import populate_backings
    from .engine import describe_helpers

    plan, limits = make_plan(xml, config)
    if not plan.populated:
        log.info("nothing for kvmaccel to populate")
        return
    specs = backing_specs(plan)
    key = plan.uuid or f"name-{plan.name}"
    host = read_host()
    # Record first what this start is about to create, so that a crash leaves a trail.
    state: dict[str, object] = {
        "name": plan.name, "uuid": plan.uuid, "id": plan.domain_id, "shortname": plan.shortname,
        "files": [s.path for s in specs], "pool_links": [], "start_unix": time.time(),
    }
    write_state(key, state)
    linked, fresh = hook_pool.take(plan, specs, host, config)
    state["files"] = [spec.path for _, spec in fresh]
    state["pool_links"] = [dataclasses.asdict(link) for link in linked]
    write_state(key, state)
    if not fresh:
        log.info("started from the pool: %s", ", ".join(link.link_path for link in linked))
        return
    specs = [spec for _, spec in fresh]
    if config.pool_enabled and hook_pool.make_room(specs, host, config):
        host = read_host()
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
        _, result = populate_backings(specs, host, limits, cancel=cancel)
    except CancelledError:
        write_state(key, {**state, "files": [], "cancelled": True})  # pool links stay
        if timed_out.is_set():
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
    adopted = hook_pool.adopt(plan, fresh, host, config)
    state["pool_links"] = [dataclasses.asdict(link) for link in [*linked, *adopted]]
    write_state(key, {**state, "populated_unix": time.time(), "result": result.as_dict()})
    log.info("populated %s in %.2f s (%.2f GiB/s), %d thread(s), helpers per node %s: %s",
             format_size(result.bytes_total), result.seconds, result.gib_per_s, result.threads,
             describe_helpers(result), ", ".join(str(s.path) for s in specs))


def op_stop(xml: bytes, config: HookConfig) -> None:
    """Remove the files kvmaccel created for this guest that are still there; forget them."""
    from .backing import created_by_us, forget

    domain = parse_domain(xml)
    key = _domain_key(domain)
    state = read_state(key)
    if state is None:
        log.debug("no kvmaccel state for %s", key)
        return
    freed = 0
    files = state.get("files")
    for path in files if isinstance(files, list) else []:
        if not isinstance(path, str):
            continue
        if os.path.lexists(path) and created_by_us(path):
            freed += os.stat(path).st_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("removed %s", path)
        elif os.path.lexists(path):
            log.warning("%s is no longer the file kvmaccel created; left alone", path)
        forget(path)
    links = state.get("pool_links")
    if domain.uuid and isinstance(links, list) and links:
        hook_pool.release(domain.uuid, [x for x in links if isinstance(x, dict)])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")


