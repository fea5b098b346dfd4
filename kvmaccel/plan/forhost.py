"""Plan a domain for this host from kvmaccel's config: the one way every caller plans.

:func:`kvmaccel.plan.planner.plan_domain` is pure and takes every input as a value; this module
reads those inputs the one way the hook reads them, so that the hook, the keeper, ``doctor``,
``plan``, ``pool fill --for``, ``prealloc`` and ``status`` plan the same domain the same way:

* the host facts (``/sys``, ``/proc`` under ``root``);
* qemu.conf: the one named by the caller, else the config's ``qemu_conf``; the default path
  (``/etc/libvirt/qemu.conf``, under ``root``) may be missing (libvirt's defaults), a path the
  config or the caller names must exist;
* the config's ``[limits]`` (a command's own limit options replace them);
* the stored ``kvmaccel tune`` result and the energy policy's decision
  (:func:`kvmaccel.plan.policy.host_policy`);
* per domain, whether its ``<emulator>`` is kvmaccel's front
  (:func:`kvmaccel.host.emulator.emulator_is_front`).

:func:`for_host` reads them once (the keeper and ``doctor`` plan every guest with one);
:meth:`HostPlanning.plan` plans one domain.  Raises :class:`~kvmaccel.errors.KvmaccelError`
subclasses (:class:`~kvmaccel.errors.ConfigError` for qemu.conf, ``PlanError`` per domain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..host.emulator import emulator_is_front
from ..host.facts import HostFacts, read_host
from ..model.domain import Domain
from ..model.qemuconf import DEFAULT_PATH as DEFAULT_QEMU_CONF
from ..model.qemuconf import QemuConf, read_qemu_conf
from .config import HookConfig
from .energy import EnergyDecision
from .limits import Limits
from .planner import DomainPlan, plan_domain
from .policy import host_policy
from .tuning import TunedDefault


@dataclass(frozen=True)
class HostPlanning:
    """Everything but the domain that a plan on this host takes, read once."""

    host: HostFacts
    qemu_conf: QemuConf
    limits: Limits
    tuned: TunedDefault
    energy: EnergyDecision

    def plan(self, domain: Domain, *, domain_id: int | None = None,
             front: bool | None = None) -> DomainPlan:
        """Plan ``domain``.  ``front`` None: as its ``<emulator>`` says (a front's name that
        is not installed here is planned as the front, with a note); ``False``: as if no
        front were there (``prealloc`` makes the files libvirt names, not the front's)."""
        note = None
        if front is None:
            front, note = emulator_is_front(domain.emulator)
        plan = plan_domain(domain, self.host, self.qemu_conf, self.limits, domain_id=domain_id,
                           tuned=self.tuned, energy=self.energy, front=front)
        return dataclasses.replace(plan, notes=(*plan.notes, note)) if note else plan


def host_qemu_conf(config: HookConfig, path: str | None = None, root: str = "/") -> QemuConf:
    """qemu.conf as every plan reads it: ``path``, else the config's ``qemu_conf``; only the
    default path may be missing.  Raises :class:`~kvmaccel.errors.ConfigError`."""
    path = path if path is not None else config.qemu_conf
    return read_qemu_conf(None if path == DEFAULT_QEMU_CONF else path, root)


def for_host(config: HookConfig, *, root: str = "/", host: HostFacts | None = None,
             qemu_conf: str | None = None, limits: Limits | None = None) -> HostPlanning:
    """Read the plan inputs of this host (under ``root``) for ``config``.  ``host``: facts
    already read; ``qemu_conf``: a qemu.conf path that replaces the config's; ``limits``: a
    command's limit options, replacing the config's ``[limits]``."""
    host = host if host is not None else read_host(root)
    tuned, energy = host_policy(config.energy, host, root)
    return HostPlanning(host, host_qemu_conf(config, qemu_conf, root),
                        config.limits if limits is None else limits, tuned, energy)
