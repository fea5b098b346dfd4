"""``kvmaccel plan DOMAIN.xml``: show what libvirt will hand QEMU and what kvmaccel would do.

A thin layer: it reads the XML file, plans it as the hook would
(:func:`kvmaccel.plan.forhost.for_host`: the config's qemu.conf and ``[limits]``, tuning,
energy, the front) and prints a table or the JSON documented in
:mod:`kvmaccel.plan.planner`.  Errors are raised as :class:`~kvmaccel.errors.KvmaccelError`; the
``kvmaccel`` group maps them to one line and an exit code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import click

from ..errors import UsageError
from ..host.facts import read_host
from ..model.domain import parse_domain
from ..model.units import format_cpu_spec, format_size
from ..plan.config import HookConfig
from ..plan.energy import MODES
from ..plan.forhost import for_host
from ..plan.planjson import plan_to_json
from ..plan.planner import BackendPlan, DomainPlan
from ..serve.room import served_by_pool
from .common import check_domain_id, load_config, read_input

log = logging.getLogger(__name__)


def _page(kib: int) -> str:
    return format_size(kib * 1024)


def _node(node: int | None) -> str:
    return "any node" if node is None else f"node {node}"


def pool_sources(plan: DomainPlan, config: HookConfig) -> dict[str, str]:
    """``pool`` or ``fresh`` per populated backend: whether a pool file would serve it at a
    start now, as the hook decides it (:func:`kvmaccel.serve.room.served_by_pool`: a clean
    file, or this guest's own that a scrub finishes).  A pool this user cannot read counts
    as none."""
    try:
        served, _ = served_by_pool(plan, read_host(), config)
    except OSError:
        served = set()
    return {b.backend_id: "pool" if b.backend_id in served else "fresh"
            for b in plan.populated}


def _where(b: BackendPlan) -> str:
    if b.front:
        libvirt = f"{b.mem_path}/" if b.mem_path else "a memfd"
        return f"{b.file_path} (the front's; libvirt passes {libvirt})"
    return (b.mem_path or "(none)") + ("/ (directory)" if b.mem_path_is_dir else "")


def format_plan(plan: DomainPlan, sources: dict[str, str] | None = None) -> str:
    """The human-readable table ``kvmaccel plan`` prints; ``sources``: pool or fresh per
    populated backend."""
    sources = sources or {}
    lines = [
        f"domain {plan.name} (id {plan.domain_id}, shortname {plan.shortname})",
        f"memory_backing_dir {plan.memory_backing_dir}; files owned by "
        f"{plan.qemu_user}:{plan.qemu_group}",
        "",
    ]
    rows = [("BACKEND", "SIZE", "PAGE", "NODES", "POLICY", "POPULATE", "MEM-PATH")]
    for b in plan.backends:
        rows.append((
            b.backend_id, format_size(b.size_bytes), _page(b.page_size_kib),
            format_cpu_spec(set(b.host_nodes)) if b.host_nodes else "-", b.policy or "-",
            f"yes, {sources[b.backend_id]}" if b.backend_id in sources
            else "yes" if b.populate else "no",
            _where(b),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    skipped = [b for b in plan.backends if not b.populate]
    if skipped:
        lines.append("")
        lines.extend(f"skip {b.backend_id}: {b.skip_reason}" for b in skipped)
    lines.append("")
    per_node = ", ".join(f"{_node(n)} {h}" for n, h in sorted(
        plan.helpers.helpers_per_node.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
    work = ", ".join(f"{_node(n)} {format_size(size)}" for n, size in plan.work_bytes)
    lines.append(f"work: {work or 'none'}")
    lines.append(f"threads: {plan.helpers.threads} (the caller and {plan.helpers.helpers} "
                 f"helper(s){': ' + per_node if per_node else ''})")
    lines.extend(f"  - {reason}" for reason in plan.helpers.reasons)
    if plan.energy is not None:
        lines.append(f"energy: {plan.energy.reason}")
        lines.extend(f"  - signal {name}: {detail}" for name, detail in plan.energy.holding
                     if name != plan.energy.deciding_signal)
    if plan.capacity:
        lines.append("capacity:")
        for c in plan.capacity:
            lines.append(
                f"  {_node(c.node)}, {_page(c.page_size_kib)} pages: need "
                f"{format_size(c.needed_bytes)}, have {format_size(c.available_bytes)} "
                f"({c.source}): {'ok' if c.ok else 'NOT ENOUGH'}")
    if plan.notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in plan.notes)
    return "\n".join(lines)


@click.command(name="plan")
@click.argument("domain_xml", metavar="DOMAIN.xml")
@click.option("--qemu-conf", "qemu_conf", metavar="FILE",
              help="qemu.conf to read (default: the config's qemu_conf; "
                   "<root>/etc/libvirt/qemu.conf if present).")
@click.option("--id", "domain_id", type=int, metavar="N", callback=check_domain_id,
              help="Domain id for the paths (default: the XML's id, else -1).")
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="Read /sys and /proc under DIR (a fake host tree for tests).")
@click.option("--config", "config_path", metavar="FILE",
              help="kvmaccel.toml for qemu_conf, [limits] and the energy policy (default: "
                   "$KVMACCEL_CONFIG, else /etc/kvmaccel/kvmaccel.toml; missing: the "
                   "defaults).")
@click.option("--energy", type=click.Choice(MODES),
              help="Energy policy mode, overriding the config file's.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(domain_xml: str, qemu_conf: str | None, domain_id: int | None, root: str,
         config_path: str | None, energy: str | None, as_json: bool) -> None:
    """Show the memory backends libvirt will create for DOMAIN.xml and kvmaccel's plan
    (DOMAIN.xml - reads it from stdin: virsh dumpxml NAME | kvmaccel plan -)."""
    data = read_input(domain_xml)
    if not os.path.isdir(root):
        raise UsageError(f"--root {root} is not a directory")
    domain = parse_domain(data)
    config = load_config(config_path)
    if energy is not None:
        config = dataclasses.replace(
            config, energy=dataclasses.replace(config.energy, mode=energy))
    result = for_host(config, root=root, qemu_conf=qemu_conf).plan(domain, domain_id=domain_id)
    if as_json:
        click.echo(json.dumps(plan_to_json(result), indent=2))
    else:
        click.echo(format_plan(result, pool_sources(result, config) if root == "/" else None))
