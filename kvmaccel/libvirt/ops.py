"""The libvirt hook's operations that plan and serve (``prepare``, the full ``start``, ``stop``).

Each turns what libvirt hands the hook (the domain XML) into what :mod:`kvmaccel.serve`
takes: a :class:`~kvmaccel.serve.job.StartJob` from the guest's plan, or from the plan cache
when the same XML was planned before (:func:`cached_job`: then neither the planner nor the
domain parser is imported), and the guest's key for the stop.

:mod:`kvmaccel.libvirt.full` imports this module only when an operation needs it: a start
that the warm pool serves runs without it (see :func:`write_recipe`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ..host.capacity import require
from ..host.facts import read_host
from ..model.units import format_size
from ..plan.config import HookConfig
from ..plan.limits import Limits
from ..serve import room
from ..serve.job import StartJob, job_from_plan
from ..serve.pool import pool_for
from ..serve.state import guest_key, recipe_path
from ..serve.take import write_recipe_if_clean
from .cache import CachedBackend, CachedPlan, PlanCache, write_cache
from .warm import cached_plan, plan_inputs

if TYPE_CHECKING:  # prepare needs neither the engine nor the backings: not imported then
    from ..model.domain import Domain
    from ..plan.planner import DomainPlan

log = logging.getLogger(__name__)


def cached_job(xml: bytes, config: HookConfig) -> StartJob | None:
    """The job of the cached plan when it still holds for ``xml``, else None (and why not,
    in a debug line)."""
    found = cached_plan(xml, config.qemu_conf, config.source)
    if isinstance(found, str):
        log.debug("planning again: %s", found)
        return None
    try:
        limits = Limits.from_json(found.cache.limits)
    except ValueError as e:
        log.debug("planning again: the cached plan's limits are not this kvmaccel's (%s)", e)
        return None
    return StartJob(found.uuid, found.cache.name, found.domain_id, found.shortname, limits,
                    tuple(b.backend for b in found.backends))


def write_recipe(plan: DomainPlan, limits: Limits, config: HookConfig, xml: bytes) -> None:
    """Leave what the next calls need so that they do not plan again:

    * ``<uuid>.plan-cache.json``: the part of this plan a start needs, for the next
      ``prepare`` of the same XML (:func:`kvmaccel.libvirt.warm.prepare_from_cache`);
    * ``<uuid>.prepared.json`` when a clean pool file waits for every backend, for this
      start (:func:`kvmaccel.libvirt.warm.start_from_pool`).
    """
    if not (plan.uuid and plan.populated):
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(recipe_path(plan.uuid))
    host = read_host()
    backends = []
    for b in job_from_plan(plan, limits).backends:
        pool = pool_for(b.mem_path, host, config)
        head, sep, tail = b.mem_path.partition(f"/{plan.shortname}/")
        if not sep:
            return
        backends.append(CachedBackend(b, (head, tail), pool.directory if pool else None,
                                      pool.state_dir if pool else None))
    cache = PlanCache(plan_inputs(xml, config.qemu_conf, config.source), plan.name,
                      limits.to_json(), plan.shortname[len(str(plan.domain_id)) + 1:],
                      tuple(backends))
    write_cache(plan.uuid, cache)
    if config.pool_enabled:
        found = CachedPlan(plan.uuid, plan.domain_id, plan.shortname, cache, cache.backends)
        write_recipe_if_clean(plan.uuid, plan.domain_id, plan.name, plan.shortname,
                              found.recipe_backends())


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
    room.room_for_everything(plan, read_host(), config)
    if not plan.populated:
        reasons = "; ".join(f"{b.backend_id}: {b.skip_reason}" for b in plan.backends)
        log.info("nothing for kvmaccel to populate (%s)", reasons or "no memory backends")
        return
    require(room.capacity_after_pool(plan, read_host(), config), who=f"guest {plan.name}")
    write_recipe(plan, limits, config, xml)
    log.info("plan: populate %s with %d thread(s)",
             ", ".join(f"{b.file_path} ({format_size(b.file_size_bytes)})"
                       for b in plan.populated), plan.helpers.threads)


def op_start(xml: bytes, config: HookConfig, cancel: threading.Event | None = None) -> None:
    """The full ``start begin``: serve the guest (:func:`kvmaccel.serve.start.serve`) from
    its cached plan when that still holds, else from a new plan."""
    from ..serve.start import serve

    t0 = time.monotonic()
    job = cached_job(xml, config)
    if job is None:
        plan, limits = make_plan(xml, config)
        job = job_from_plan(plan, limits)
    owner = None
    if any(b.make_dir for b in job.backends):  # a memfd guest's directory is made here
        from ..host.owner import qemu_owner
        from ..model.qemuconf import read_qemu_conf

        conf = read_qemu_conf(config.qemu_conf)
        owner = qemu_owner(conf.user, conf.group)
    serve(job, config, cancel, dir_owner=owner, t0=t0)


def op_stop(xml: bytes, config: HookConfig) -> None:
    """``stopped end`` / ``release end``: take back what the guest's start made
    (:func:`kvmaccel.serve.stop.stop`)."""
    from ..model.domain import parse_domain
    from ..serve.stop import stop

    domain = parse_domain(xml)
    stop(_domain_key(domain), domain.name, domain.uuid, config)


def _domain_key(domain: Domain) -> str:
    return guest_key(domain.uuid, domain.name)
