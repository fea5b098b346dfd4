"""``kvmaccel run``, ``kvmaccel prealloc`` and ``kvmaccel status``: the standalone side.

A thin click layer: it parses, calls :mod:`kvmaccel.launch.run`, :mod:`kvmaccel.launch.prealloc` and
:mod:`kvmaccel.launch.status`, and prints.  Errors are :class:`~kvmaccel.errors.KvmaccelError`; the
``kvmaccel`` group maps them to one line and an exit code (``prealloc`` exits with
:attr:`~kvmaccel.errors.NotPopulatedError.exit_code` when the plan leaves a backend out).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from ..engine.populate import describe_helpers
from ..errors import UsageError
from ..host.facts import read_host
from ..launch.prealloc import domain_xml, preallocate
from ..launch.run import (
    FD_PLACEHOLDER,
    check_program,
    describe,
    exec_qemu,
    plan_launch,
    populate_launch,
    rewrite_argv,
)
from ..launch.status import BackendStatus, libvirt_qemu_pid, qemu_status
from ..model.units import format_cpu_spec, format_size
from ..plan.config import read_config
from ..plan.forhost import for_host
from .common import cancel_on_signals, limits_options, make_limits, progress_bar

log = logging.getLogger(__name__)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--dry-run", is_flag=True,
              help="Print what would be populated and the command line QEMU would get.")
@limits_options
@click.argument("qemu_argv", nargs=-1, type=click.UNPROCESSED, metavar="-- QEMU ARGS...")
def run(dry_run: bool, qemu_argv: tuple[str, ...], **limit_args: Any) -> None:
    """Populate QEMU's shared memory backends, then exec QEMU with them.

    Use it in place of QEMU in a launch script: kvmaccel run -- qemu-system-x86_64 ARGS...
    Shared file backends on hugetlbfs/tmpfs and memfd backends are populated on their
    host-nodes by parallel helpers and handed to QEMU with prealloc=off; private and anonymous
    backends are left to QEMU.  Nothing is printed on stdout unless --dry-run.
    """
    argv = list(qemu_argv)
    check_program(argv)
    host = read_host()
    plan = plan_launch(argv, host)
    if dry_run:
        fds = {a.backend_id: FD_PLACEHOLDER for a in plan.populated}
        click.echo(describe(plan, rewrite_argv(plan, fds)))
        return
    for a in plan.actions:
        log.info("%s %s: %s", "skip" if a.action == "skip" else "populate", a.backend_id,
                 a.reason)
    limits = make_limits(**limit_args)
    with cancel_on_signals() as cancel, progress_bar("populating", True) as progress:
        new_argv, backings, result = populate_launch(plan, host, limits, progress=progress,
                                                     cancel=cancel)
    if result is not None:
        log.info("populated %s of %s in %.2f s (%.2f GiB/s), %d thread(s); helpers %s",
                 format_size(result.bytes_total), result.memory_text or "memfd",
                 result.seconds, result.gib_per_s,
                 result.threads, describe_helpers(result))
    exec_qemu(new_argv, backings)



@click.command()
@click.argument("domain_xml_file", metavar="[DOMAIN.xml]", required=False)
@click.option("--domain", "domain_name", metavar="NAME", help="A domain defined in libvirt.")
@click.option("--connect", "uri", metavar="URI", help="libvirt URI (default: libvirt's own).")
@click.option("--id", "domain_id", type=int, metavar="N",
              help="Domain id the guest will get (default: the XML's, else -1); it is part of "
                   "the paths.")
@click.option("--qemu-conf", metavar="FILE",
              help="qemu.conf to read (default: the config's qemu_conf; "
                   "/etc/libvirt/qemu.conf if present).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@limits_options
def prealloc(domain_xml_file: str | None, domain_name: str | None, uri: str | None,
             domain_id: int | None, qemu_conf: str | None, as_json: bool,
             **limit_args: Any) -> None:
    """Populate a domain's memory backing files ahead of its start, outside any hook.

    Exits 4, after populating the rest, when the plan leaves some backend out (the reasons
    are printed).  `kvmaccel release PATH` removes a file if the guest never starts.
    """
    if (domain_xml_file is None) == (domain_name is None):
        raise UsageError("give either DOMAIN.xml or --domain NAME (not both)")
    if domain_name is None and uri is not None:
        raise UsageError("--connect goes with --domain NAME")
    if domain_xml_file is not None:
        try:
            with open(domain_xml_file, encoding="utf-8") as f:
                xml = f.read()
        except OSError as e:
            raise UsageError(f"cannot read {domain_xml_file}: {e.strerror}") from None
    else:
        assert domain_name is not None
        xml, running_id = domain_xml(domain_name, uri)
        if running_id >= 0:
            raise UsageError(f"domain {domain_name!r} is running (id {running_id}): its memory "
                             "is already QEMU's; prealloc is for a guest about to start")
    limits = make_limits(**limit_args)
    with cancel_on_signals() as cancel, progress_bar("populating", not as_json) as progress:
        done, _ = preallocate(xml, for_host(read_config(), qemu_conf=qemu_conf, limits=limits),
                              domain_id=domain_id, progress=progress, cancel=cancel)
    if as_json:
        click.echo(json.dumps(done.as_dict(), indent=2))
    else:
        for path in done.paths:
            click.echo(f"populated {path}")
        if done.result is not None:
            r = done.result
            click.echo(f"{format_size(r.bytes_total)} of {r.memory_text} in {r.seconds:.2f} s "
                       f"({r.gib_per_s:.2f} GiB/s), {r.threads} thread(s); helpers "
                       f"{describe_helpers(r)}")
        for backend_id, reason in done.skipped:
            click.echo(f"skipped {backend_id}: {reason}")
    done.check()


def _nodes_text(b: BackendStatus) -> str:
    per_node = " ".join(f"N{n}={p}" for n, p in sorted(b.pages_per_node.items())) or "-"
    asked = format_cpu_spec(set(b.requested_nodes)) if b.requested_nodes else "any"
    verdict = "" if not b.requested_nodes else (
        " ok" if not b.off_node_pages else f" {b.off_node_pages} page(s) OFF the requested nodes")
    return f"{per_node} (asked {asked}{verdict})"


@click.command()
@click.option("--domain", "domain_name", metavar="NAME", help="A running libvirt domain.")
@click.option("--connect", "uri", metavar="URI",
              help="libvirt URI to read the domain XML from (default: libvirt's own).")
@click.option("--pid", type=int, help="A running QEMU process.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(domain_name: str | None, uri: str | None, pid: int | None, as_json: bool) -> None:
    """Show each memory backend of a running guest: size, resident, pages per NUMA node."""
    if (domain_name is None) == (pid is None):
        raise UsageError("give either --domain NAME or --pid PID")
    requested: dict[str, tuple[int, ...]] | None = None
    if domain_name is not None:
        xml, domain_id = domain_xml(domain_name, uri)
        from ..model.domain import parse_domain

        plan = for_host(read_config()).plan(parse_domain(xml), domain_id=domain_id)
        requested = {b.backend_id: b.host_nodes or () for b in plan.backends}
        pid = libvirt_qemu_pid(domain_name)
    assert pid is not None
    backends = qemu_status(pid, requested)
    if as_json:
        click.echo(json.dumps({"pid": pid, "backends": [b.as_dict() for b in backends]},
                              indent=2))
        return
    click.echo(f"QEMU pid {pid}")
    for b in backends:
        if b.path is None:
            click.echo(f"{b.backend_id}: {format_size(b.size_bytes)} {b.qom_type}: not mapped")
            continue
        allocated = "" if b.allocated_bytes is None else (
            f", allocated {format_size(b.allocated_bytes)}")
        click.echo(f"{b.backend_id}: {b.path} size {format_size(b.size_bytes)}, "
                   f"resident {format_size(b.mapped_bytes)}{allocated}, "
                   f"{b.page_size_kib} KiB pages, policy {b.numa_policy or '-'}, "
                   f"{_nodes_text(b)}")


@click.command(name="bench-run")
@click.option("--size", default="8G", show_default=True, help="Guest RAM.")
@click.option("--dir", "directory", default="/dev/hugepages", show_default=True,
              help="hugetlbfs directory for the guest's mem-path.")
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Populating threads, for QEMU (prealloc-threads) and kvmaccel alike.")
@click.option("--runs", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--nice", type=int, default=0, show_default=True,
              help="Niceness of kvmaccel's helpers (QEMU's threads run at 0).")
@click.option("--wait", "wait_s", type=float, default=0.0, show_default=True,
              help="Seconds to wait for free huge pages before each start (a shared pool).")
@click.option("--qemu", default="qemu-system-x86_64", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the times as JSON.")
def bench_run_cmd(size: str, directory: str, threads: int, runs: int, nice: int,
                  wait_s: float, qemu: str, as_json: bool) -> None:
    """Time to a running QEMU: its own prealloc against kvmaccel run (medians, one run)."""
    from ..bench.run import bench_run
    from ..model.units import parse_size

    check_program([qemu])
    emit = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    result = bench_run(qemu, directory, parse_size(size), threads, runs, emit, nice,
                       wait_s)
    if as_json:
        click.echo(json.dumps({"size_bytes": result.size_bytes, "threads": result.threads,
                               "seconds": result.seconds,
                               "medians": {c: result.median(c) for c in result.seconds},
                               "ratio_qemu_over_kvmaccel": result.ratio}, indent=2))


# Explicitly typed names for kvmaccel.cli.main to register: cli/main.py and this module import each
# other, and mypy cannot infer a decorated command's type across that cycle.
COMMANDS: tuple[click.Command, ...] = (run, prealloc, status, bench_run_cmd)
