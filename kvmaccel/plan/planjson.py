"""The plan as JSON (``kvmaccel plan --json``).

JSON shape (:func:`plan_to_json`, ``kvmaccel plan --json``), stable within ``schema``
``kvmaccel.plan/1``; sizes in bytes, page sizes in KiB, ``node`` null means "not bound"::

    {
      "schema": "kvmaccel.plan/1",
      "domain": {"name": str, "uuid": str|null, "id": int, "shortname": str},
      "libvirt": {
        "memory_backing_dir": str,          # qemu.conf value + "/libvirt/qemu", or the default
        "memory_backing_domain_dir": str,   # <memory_backing_dir>/<shortname>
        "hugepage_domain_dirs": [str],      # <mount>/libvirt/qemu/<shortname>, every mount
        "created_dirs": [str],              # the ones libvirt creates for this guest
        "qemu_user": str, "qemu_group": str
      },
      "backends": [{
        "id": str, "alias": str,
        "kind": "system"|"cell"|"dimm"|"nvdimm"|"virtio-mem"|"virtio-pmem"|"sgx-epc",
        "guest_node": int|null,
        "qom_type": "memory-backend-file"|"memory-backend-memfd"|"memory-backend-ram"|...,
        "mem_path": str|null, "mem_path_is_dir": bool,   # what libvirt passes QEMU
        "file": str|null,                   # the file kvmaccel populates (populated only)
        "front": bool,                      # handed to QEMU by the front, not by libvirt
        "size_bytes": int,                  # what libvirt passes as size=
        "file_size_bytes": int,             # size_bytes rounded up to page_size_kib
        "page_size_kib": int, "filesystem": str|null,
        "share": bool|null,                 # null: not passed (QEMU default)
        "prealloc": bool, "prealloc_threads": int|null,
        "host_nodes": [int]|null, "policy": "bind"|"preferred"|"interleave"|null,
        "populate": bool, "skip_reason": str|null
      }],
      "work": [{"node": int|null, "bytes": int}],
      "helpers": {"threads": int, "per_node": [{"node": int|null, "helpers": int}],
                  "reasons": [str]},
      "capacity": [{"node": int|null, "page_size_kib": int, "needed_bytes": int,
                    "available_bytes": int, "source": str, "ok": bool}],
      "notes": [str],
      "tuning": {"status": "none"|"used"|"ignored", "reason": str|null,   # kvmaccel tune
                 "helpers_per_node": [{"node": int, "helpers": int}]}|null,
      "energy": {"mode": "auto"|"performance"|"powersave", "max_threads": int|null,
                 "deciding_signal": str|null, "reason": str,
                 "signals": [{"name": str, "detail": str}]}|null     # docs/energy.md
    }

``tuning`` and ``energy`` are null when the caller planned without them.  A tuned per-node
count replaces the 80% rule (see :mod:`kvmaccel.plan.tuning`); an energy cap lowers ``threads``
like ``<allocation threads='N'/>`` (the smaller one wins); both say so in the helper reasons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .planner import DomainPlan

SCHEMA = "kvmaccel.plan/1"


def _node_key(node: int | None) -> tuple[bool, int]:
    return (node is None, node or 0)


def plan_to_json(plan: DomainPlan) -> dict[str, Any]:
    """The documented JSON shape (see the module docstring)."""
    return {
        "schema": SCHEMA,
        "domain": {"name": plan.name, "uuid": plan.uuid, "id": plan.domain_id,
                   "shortname": plan.shortname},
        "libvirt": {
            "memory_backing_dir": plan.memory_backing_dir,
            "memory_backing_domain_dir": plan.memory_backing_domain_dir,
            "hugepage_domain_dirs": list(plan.hugepage_domain_dirs),
            "created_dirs": list(plan.created_dirs),
            "qemu_user": plan.qemu_user, "qemu_group": plan.qemu_group,
        },
        "backends": [{
            "id": b.backend_id, "alias": b.alias, "kind": b.kind, "guest_node": b.guest_node,
            "qom_type": b.qom_type, "mem_path": b.mem_path, "mem_path_is_dir": b.mem_path_is_dir,
            "file": b.file_path, "front": b.front,
            "size_bytes": b.size_bytes, "file_size_bytes": b.file_size_bytes,
            "page_size_kib": b.page_size_kib, "filesystem": b.filesystem, "share": b.share,
            "prealloc": b.prealloc, "prealloc_threads": b.prealloc_threads,
            "host_nodes": list(b.host_nodes) if b.host_nodes is not None else None,
            "policy": b.policy, "populate": b.populate, "skip_reason": b.skip_reason,
        } for b in plan.backends],
        "work": [{"node": n, "bytes": size} for n, size in plan.work_bytes],
        "helpers": {
            "threads": plan.helpers.threads,
            "per_node": [{"node": n, "helpers": h} for n, h in sorted(
                plan.helpers.helpers_per_node.items(), key=lambda kv: _node_key(kv[0]))],
            "reasons": list(plan.helpers.reasons),
        },
        "capacity": [{"node": c.node, "page_size_kib": c.page_size_kib,
                      "needed_bytes": c.needed_bytes, "available_bytes": c.available_bytes,
                      "source": c.source, "ok": c.ok} for c in plan.capacity],
        "notes": list(plan.notes),
        "tuning": plan.tuning.as_dict() if plan.tuning else None,
        "energy": plan.energy.as_dict() if plan.energy else None,
    }
