"""What a start serves: a guest's backends, the files they need, and the limits to fill them.

A :class:`StartJob` (its backends are :class:`~kvmaccel.serve.state.JobBackend`, which the
caches keep) is front-neutral: a backend's id, the file QEMU is handed, its size,
nodes, policy and pool key, and whether QEMU preallocates it.  An adapter builds it (the
libvirt hook from its plan or its plan cache, :mod:`kvmaccel.libvirt.ops`); everything
:mod:`kvmaccel.serve` does at a start or a stop takes it, or the guest's state, as it is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..plan.limits import Limits
from ..pool.manage import key_for
from .state import JobBackend, guest_key

if TYPE_CHECKING:  # a start from a cached plan does not import the planner
    from ..engine.backing import BackingSpec
    from ..plan.planner import BackendPlan, DomainPlan
    from ..pool.files import PoolKey


@dataclasses.dataclass(frozen=True)
class StartJob:
    """What a start does for one guest."""

    uuid: str | None
    name: str
    domain_id: int
    shortname: str
    limits: Limits
    backends: tuple[JobBackend, ...]

    @property
    def key(self) -> str:
        """The name of the guest's state: its uuid, else ``name-<name>``."""
        return guest_key(self.uuid, self.name)


Fresh = tuple[str, "PoolKey", "BackingSpec"]
"""A backend to populate: its id, the pool key its file would have, and its spec."""


def engine_policy(policy: str | None) -> str:
    """How the engine binds a backend's pages: ``preferred`` stays, anything else binds."""
    return "preferred" if policy == "preferred" else "bind"


def backend_key(backend: BackendPlan) -> PoolKey:
    """The pool key a planned backend's file has."""
    return key_for(backend.file_size_bytes, backend.page_size_kib, backend.host_nodes or (),
                   backend.policy)


def job_from_plan(plan: DomainPlan, limits: Limits) -> StartJob:
    backends = []
    for b in plan.populated:
        assert b.file_path is not None  # populated backends always have a file
        backends.append(JobBackend(
            b.backend_id, b.file_path, b.file_size_bytes, tuple(b.host_nodes or ()),
            engine_policy(b.policy), b.alias, backend_key(b),
            b.front and b.qom_type == "memory-backend-memfd", b.prealloc, b.prealloc_threads))
    return StartJob(plan.uuid, plan.name, plan.domain_id, plan.shortname, limits,
                    tuple(backends))

__all__ = ["Fresh", "JobBackend", "StartJob", "backend_key", "engine_policy", "job_from_plan"]
