"""``kvmaccel prealloc``: run a domain's plan outside any hook, ahead of its start.

The domain XML comes from a file or, with ``--domain NAME``, from libvirt (libvirt-python, the
only libvirt API use in kvmaccel outside tests; never call it from a hook: the daemon deadlocks).
:func:`preallocate` creates and populates the file of every backend the plan populates, owned by
qemu.conf's user and group, in the per-domain ``memory_backing_dir`` libvirt will use; libvirt
(``qemuProcessBuildDestroyMemoryPathsImpl``, 9.0) keeps an existing directory, QEMU uses an
existing file as it is, and libvirt removes the directory when the guest stops.

The paths hold the domain id (``<id>-<name>``), which an inactive domain does not have yet: it
is the XML's id, else -1 (as ``virsh domxml-to-native``), unless the caller says which id the
guest will get.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .. import safefs
from ..engine.backing import Backing, BackingSpec, populate_backings
from ..engine.populate import PopulateResult, ProgressFn
from ..errors import HostError, NotPopulatedError, UnsafePathError, UsageError
from ..host.owner import qemu_owner
from ..model.domain import parse_domain
from ..plan.forhost import HostPlanning
from ..plan.planner import DomainPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreallocResult:
    """What one ``prealloc`` did: the plan, the files it populated, the engine's result (None
    when the plan populates nothing) and the backends it left out with their reasons."""

    plan: DomainPlan
    paths: tuple[str, ...]
    result: PopulateResult | None

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        return tuple((b.backend_id, b.skip_reason or "") for b in self.plan.backends
                     if not b.populate)

    def as_dict(self) -> dict[str, object]:
        return {
            "domain": self.plan.name, "id": self.plan.domain_id,
            "populated": [{"id": b.backend_id, "path": b.mem_path, "bytes": b.file_size_bytes,
                           "host_nodes": list(b.host_nodes or ())} for b in self.plan.populated],
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
            "result": self.result.as_dict() if self.result else None,
        }

    def check(self) -> None:
        """Raise :class:`NotPopulatedError` when the plan left some backend out."""
        if self.skipped:
            raise NotPopulatedError(
                "; ".join(f"{i} not populated: {r}" for i, r in self.skipped),
                backends=self.skipped)


def domain_xml(name: str, uri: str | None) -> tuple[str, int]:
    """The XML and id (-1 when not running) of the defined domain ``name`` at ``uri``.

    Raises :class:`HostError` without libvirt-python or when the connection fails, and
    :class:`UsageError` when there is no such domain.
    """
    try:
        import libvirt
    except ImportError:
        raise HostError("--domain needs libvirt-python: pip install 'kvmaccel[libvirt]'") from None
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HostError(f"cannot connect to libvirt at {uri or 'the default URI'}: "
                        f"{e.get_error_message()}; is libvirtd running?") from None
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            known = ", ".join(sorted(d.name() for d in conn.listAllDomains())) or "none"
            raise UsageError(f"no domain {name!r} at {conn.getURI()} (defined: {known})") from None
        return str(dom.XMLDesc(0)), int(dom.ID())
    finally:
        conn.close()


def _make_domain_dir(plan: DomainPlan, uid: int, gid: int) -> None:
    """Create ``<memory_backing_dir>/<shortname>`` as libvirt would (0700, the qemu user's),
    by descriptor (:func:`kvmaccel.safefs.make_owned_dir`): the qemu user owns
    ``memory_backing_dir`` on Debian and could swap a path component for a symlink between
    a ``mkdir`` and a ``chown`` by path, having root make its directory anywhere or chown
    any file to it.  An existing directory is used if it is root's or the qemu user's."""
    path = plan.memory_backing_domain_dir
    try:
        safefs.make_owned_dir(path, (uid, gid), make_parents=True)
    except UnsafePathError as e:
        raise HostError(f"cannot create {path}: {e}") from None
    except OSError as e:
        raise HostError(f"cannot create {path}: {e.strerror}; run as root") from e


def preallocate(
    xml: str,
    planning: HostPlanning,
    *,
    domain_id: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> tuple[PreallocResult, list[Backing]]:
    """Plan the domain and populate every backend the plan populates.

    Raises DomainError/PlanError (bad XML or plan), HostError (owner, directory), and what
    :func:`kvmaccel.engine.backing.populate_backings` raises; on error nothing this call made
    is left but the (empty) per-domain directory.  It does *not* raise for skipped backends: see
    :meth:`PreallocResult.check`.
    """
    domain = parse_domain(xml)
    # The files libvirt names, not the front's (the hook makes those for one start, not ahead).
    plan = planning.plan(domain, domain_id=domain_id, front=False)
    host, qemu_conf = planning.host, planning.qemu_conf
    populated = plan.populated
    if not populated:
        return PreallocResult(plan, (), None), []
    uid, gid = qemu_owner(qemu_conf.user, qemu_conf.group)
    specs = []
    for b in populated:
        assert b.mem_path is not None  # the planner populates files only
        policy = "preferred" if b.policy == "preferred" else "bind"
        specs.append(BackingSpec(b.mem_path, b.file_size_bytes, b.host_nodes or (), policy,
                                 uid=uid, gid=gid))
    if any(s.path and s.path.startswith(plan.memory_backing_domain_dir + "/") for s in specs):
        _make_domain_dir(plan, uid, gid)
    backings, result = populate_backings(specs, host, plan.limits, progress=progress,
                                         cancel=cancel)
    return PreallocResult(plan, tuple(s.path or "" for s in specs), result), backings

