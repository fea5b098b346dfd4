"""The ``kvmaccel`` command: a thin click layer that parses, delegates and maps errors.

Every :class:`~kvmaccel.errors.KvmaccelError` becomes one line on stderr,
``kvmaccel: error: <what is wrong and what to do>``, and the error's exit code.  Logging is
configured here and nowhere else.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import click

from .. import __version__, paths
from ..engine.backing import BackingSpec, populate_backings, release
from ..engine.populate import describe_helpers
from ..errors import KvmaccelError, UsageError
from ..host.facts import read_host
from ..model.units import format_size, parse_cpu_spec, parse_page_size, parse_size
from ..plan.limits import DEFAULT_NICE
from .common import (
    Seconds,
    cancel_on_signals,
    check_path,
    limits_options,
    make_limits,
    parse_mode,
    parse_nodes,
    parse_owner,
    progress_bar,
)

log = logging.getLogger(__name__)

MAX_THREAD_COUNTS = 32
"""The most thread counts ``bench --threads`` compares (each is several runs)."""


class _Group(click.Group):
    """Maps kvmaccel's errors to one line and an exit code, in one place, and imports each
    command of :data:`LAZY_COMMANDS` only when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            _usage_error(e, ctx)
            raise  # not reached

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KvmaccelError as e:
            click.echo(f"kvmaccel: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            _usage_error(e, ctx)


def _usage_error(e: click.UsageError, ctx: click.Context) -> None:
    """click's own usage errors (an option that is not an integer, a file that does not
    exist, an unknown option) as one line too, exit 2; a bare ``kvmaccel`` still prints the
    help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        raise e
    names = []
    at: click.Context | None = e.ctx or ctx
    while at is not None and at.parent is not None:
        names.append(at.info_name or "")
        at = at.parent
    where = " ".join(["kvmaccel", *reversed(names)])
    message = " ".join(e.format_message().split()).rstrip(".")
    click.echo(f"kvmaccel: error: {message}; see '{where} --help'", err=True)
    ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="kvmaccel")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Populate large KVM guest memory backings in parallel, before QEMU starts."""
    # kvmaccel's own state is private, whatever the caller's umask (restored at the end, for
    # callers that run the command in their own process).
    previous_umask = os.umask(0o077)
    click.get_current_context().call_on_close(lambda: os.umask(previous_umask))
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="kvmaccel: %(levelname)s: %(name)s: %(message)s",
                        stream=sys.stderr)
    paths.use(places_from(os.environ))


def places_from(environ: Mapping[str, str]) -> paths.Places:
    """kvmaccel's places for a command: the variables, else the defaults; the record file,
    when ``$KVMACCEL_RECORD_FILE`` does not name one, is the default config's ``record_file``
    (a config that cannot be read: the default file).  The run dir is not the config's: the
    commands that act for the hook (``kvmaccel pool keep``) take that one themselves."""
    found = paths.resolve(environ)
    if environ.get(paths.RECORD_FILE_ENV):
        return found
    from ..plan.config import read_config

    try:
        record_file = read_config(found.config_file).record_file
    except KvmaccelError:
        return found
    return paths.resolve(environ, record_file=record_file)


@main.command()
@click.argument("path")
@click.option("--size", required=True, help="Size of the backing, e.g. 8G.")
@click.option("--nodes", help="Host NUMA nodes to split the memory over, e.g. 0,1.")
@click.option("--policy", type=click.Choice(["bind", "preferred"]), default="bind",
              show_default=True, help="Memory policy on each node.")
@click.option("--mode", default="0600", show_default=True, help="File mode (octal).")
@click.option("--owner", help="USER[:GROUP] to own the file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@limits_options
def populate(path: str, size: str, nodes: str | None, policy: str, mode: str,
             owner: str | None, as_json: bool, **limit_args: Any) -> None:
    """Create PATH on hugetlbfs or tmpfs and fault in all of its memory.

    The file is recorded as kvmaccel's; `kvmaccel release PATH` removes it.  On any error,
    or SIGINT/SIGTERM, the file is removed again.
    """
    file_mode = parse_mode(mode)
    uid, gid = parse_owner(owner)
    spec = BackingSpec(path=check_path(path), size_bytes=parse_size(size), nodes=parse_nodes(nodes),
                       policy=policy, mode=file_mode, uid=uid, gid=gid)
    limits = make_limits(**limit_args)
    host = read_host()
    with cancel_on_signals() as cancel, progress_bar("populating", not as_json) as progress:
        _, result = populate_backings([spec], host, limits, progress=progress, cancel=cancel)
    if as_json:
        click.echo(json.dumps({"path": os.path.abspath(path), **result.as_dict()}, indent=2))
    else:
        click.echo(f"{path}: {format_size(result.bytes_total)} of {result.memory_text} "
                   f"in {result.seconds:.2f} s "
                   f"({result.gib_per_s:.2f} GiB/s), {result.threads} thread(s); helpers "
                   f"{describe_helpers(result)}")
        for reason in result.reasons:
            click.echo(f"  {reason}")


@main.command(name="release")
@click.argument("paths", nargs=-1, required=True)
def release_cmd(paths: tuple[str, ...]) -> None:
    """Remove files that kvmaccel created and recorded (never any other file)."""
    for path in paths:
        freed = release(check_path(path))
        click.echo(f"{path}: released {format_size(freed)}")


@main.command()
@click.option("--size", default="2G", show_default=True, help="Memory per run.")
@click.option("--backing", "kind", type=click.Choice(["auto", "hugetlbfs", "tmpfs", "memfd"]),
              default="auto", show_default=True,
              help="auto: hugetlbfs when a mount has enough free huge pages, else tmpfs.")
@click.option("--page-size", help="Huge page size (hugetlbfs, memfd), e.g. 2M or 1G.")
@click.option("--dir", "directory", help="Directory for scratch files (a hugetlbfs or tmpfs "
              "mount); default: the first matching mount, or /dev/shm.")
@click.option("--threads", "threads_text", help="Thread counts to compare, e.g. 1,2,4 "
              "(default 1,2,4,... up to the allowed CPUs).")
@click.option("--runs", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--nice", type=int, default=DEFAULT_NICE, show_default=True)
@click.option("--vs-qemu", is_flag=True, help="Also time QEMU's own prealloc-threads.")
@click.option("--competitor", "with_competitor", is_flag=True,
              help="Also measure the slowdown helpers cause a CPU-bound load.")
@click.option("--competitor-seconds", type=Seconds(0, 3600, low_open=True), default=10.0,
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def bench(size: str, kind: str, page_size: str | None, directory: str | None,
          threads_text: str | None, runs: int, nice: int, vs_qemu: bool,
          with_competitor: bool, competitor_seconds: float, as_json: bool) -> None:
    """Measure population speed by thread count (and against QEMU, and its disturbance)."""
    from ..bench import populate as b

    host = read_host()
    size_bytes = parse_size(size)
    page_kib = parse_page_size(page_size) if page_size is not None else None
    backing = b.choose_backing(kind, size_bytes, page_kib, directory, host)
    if page_kib not in (None, host.base_page_size_kib) and backing.kind == "tmpfs":
        raise UsageError(f"--page-size {page_size}: tmpfs has only {host.base_page_size_kib} "
                         "KiB pages (and no hugetlbfs mount has enough free pages of that "
                         "size); give --backing hugetlbfs or memfd, or no --page-size")
    cpus = len(os.sched_getaffinity(0))
    if threads_text is not None:
        threads = sorted(parse_cpu_spec(threads_text))
        if not threads or threads[0] < 1 or len(threads) > MAX_THREAD_COUNTS:
            raise UsageError(f"invalid --threads {threads_text[:40]!r}; give from 1 to "
                             f"{MAX_THREAD_COUNTS} counts such as 1,2,4")
    else:
        threads = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max(cpus, 1)]
    emit = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    report: dict[str, Any] = {"scaling": b.scaling(backing, host, threads, runs, nice,
                                                   vs_qemu, emit)}
    if with_competitor:
        report["competitor"] = b.competitor(backing, host, max(threads), competitor_seconds,
                                            emit)
    if as_json:
        click.echo(json.dumps(report, indent=2))


# --- commands that live in their own modules, imported only when they run -----------------
# (``kvmaccel run`` execs QEMU: every module it does not need is start-up time it adds.)
LAZY_COMMANDS: dict[str, str] = {
    "plan": "kvmaccel.cli.plan:plan",
    "hook": "kvmaccel.cli.hook:hook",
    "run": "kvmaccel.cli.run:run",
    "prealloc": "kvmaccel.cli.run:prealloc",
    "status": "kvmaccel.cli.run:status",
    "bench-run": "kvmaccel.cli.run:bench_run_cmd",
    "pool": "kvmaccel.cli.pool:pool",
    "tune": "kvmaccel.cli.tune:tune",
    "doctor": "kvmaccel.cli.ops:doctor",
    "metrics": "kvmaccel.cli.ops:metrics",
    "front": "kvmaccel.cli.front:front",
    "enable": "kvmaccel.cli.front:enable",
    "disable": "kvmaccel.cli.front:disable",
}
