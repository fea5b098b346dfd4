"""``kvmaccel hook install|uninstall|status|bench-start``: a thin layer over
:mod:`kvmaccel.setup.install` and :mod:`kvmaccel.bench.start`.

Errors are raised as :class:`~kvmaccel.errors.KvmaccelError`; the ``kvmaccel`` group maps them
to one line and an exit code.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from ..errors import KvmaccelError
from ..plan.config import DEFAULT_PATH as DEFAULT_CONFIG
from ..plan.config import read_config
from ..setup import install as hook_install
from .common import load_config

log = logging.getLogger(__name__)

libvirt_dir_option = click.option(
    "--libvirt-dir", default=hook_install.DEFAULT_LIBVIRT_DIR, show_default=True,
    metavar="DIR", help="libvirt's configuration directory (hooks/ lives in it).")


@click.group()
def hook() -> None:
    """libvirt's qemu hook: populate guest memory files before QEMU starts.

    The hook acts at prepare, start, stopped and release; see `kvmaccel hook install` and the
    configuration file /etc/kvmaccel/kvmaccel.toml (documented in kvmaccel/plan/config.py).
    """


@hook.command()
@libvirt_dir_option
@click.option("--config", "config_path", metavar="FILE",
              help=f"Configuration file the hook reads (default {DEFAULT_CONFIG}).")
@click.option("--python", metavar="PATH", help="Interpreter for the hook (default: this one, "
              f"{sys.executable}).")
def install(libvirt_dir: str, config_path: str | None, python: str | None) -> None:
    """Install the hook as <DIR>/hooks/qemu.d/kvmaccel (an existing hooks/qemu is kept)."""
    if config_path is not None:
        config_path = os.path.abspath(config_path)
        # refuse a missing or broken file now rather than at the next start
        load_config(config_path)
    st = hook_install.install(libvirt_dir, python=python, config_path=config_path)
    click.echo(f"installed {st.path} (python {st.python})")
    if st.main_hook:
        click.echo(f"kept {st.main_hook}: libvirt runs it first, then the hooks in qemu.d/")
    for line in hook_install.notice_advice(None):
        click.echo(line)


@hook.command()
@libvirt_dir_option
def uninstall(libvirt_dir: str) -> None:
    """Remove what `kvmaccel hook install` wrote, and nothing else."""
    removed = hook_install.uninstall(libvirt_dir)
    if not removed:
        click.echo(f"not installed: {hook_install.hook_path(libvirt_dir)} does not exist")
        return
    for path in removed:
        click.echo(f"removed {path}")
    click.echo("running libvirt daemons stop running it at once (a missing hook is skipped)")


@hook.command()
@libvirt_dir_option
@click.pass_context
def status(ctx: click.Context, libvirt_dir: str) -> None:
    """Say whether the hook is installed, and whether the daemon runs it.  Exit 0 when
    installed, 1 when not."""
    st = hook_install.status(libvirt_dir)
    if not st.installed:
        click.echo(f"not installed ({st.path} does not exist)")
    elif not st.ours:
        click.echo(f"{st.path} exists but was not written by kvmaccel")
    else:
        info = st.info or {}
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.mtime_unix or 0))
        click.echo(f"installed: {st.path} (kvmaccel {info.get('version')}, written {when})")
        click.echo(f"python: {st.python}" + ("" if st.python_ok else " (MISSING: reinstall)"))
        config = info.get("config")
        config_path = config if isinstance(config, str) else None
        try:
            cfg = read_config(config_path)
            click.echo(f"config: {config_path or DEFAULT_CONFIG} "
                       f"({'read' if cfg.path else 'absent, defaults'}; strict = "
                       f"{str(cfg.strict).lower()}, enabled = {str(cfg.enabled).lower()})")
        except KvmaccelError as e:
            click.echo(f"config: BROKEN, the hook fails open: {e}")
        for line in hook_install.notice_advice(st.mtime_unix):
            click.echo(line)
    if st.main_hook:
        click.echo(f"other hook: {st.main_hook}")
    for other in st.other_hooks:
        click.echo(f"other hook: {other}")
    if not (st.installed and st.ours):
        ctx.exit(1)


@hook.command(name="bench-start")
@click.option("--size", default="4G", show_default=True, help="Guest memory size.")
@click.option("--runs", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Starts per configuration (the median is reported).")
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Threads for QEMU's prealloc-threads and kvmaccel alike.")
@click.option("--only", metavar="NAMES", help="Comma-separated configuration names to run.")
@click.option("--pool-sizes", default="2G", show_default=True, metavar="SIZES",
              help="Other guest sizes for the warm-pool starts (comma-separated; '' none).")
@click.option("--keep-going", is_flag=True, help="Report a configuration that fails and go on.")
def bench_start(size: str, runs: int, threads: int, only: str | None, pool_sizes: str,
                keep_going: bool) -> None:
    """Time `virsh start` for one guest size under each memory configuration.

    Needs root and a running libvirtd; changes /etc/libvirt/qemu.conf and the installed hook
    for the run and restarts libvirtd between configurations, restoring both at the end.
    Guest memory goes to a private hugetlbfs and tmpfs mounted for the run.
    """
    from ..bench.start import format_table, run
    from ..model.units import parse_size

    names = [n.strip() for n in only.split(",")] if only else None
    results = run(parse_size(size), runs=runs, threads=threads, only=names,
                  keep_going=keep_going, emit=lambda line: click.echo(line, err=True),
                  pool_sizes=[parse_size(x) for x in pool_sizes.split(",") if x.strip()])
    click.echo(format_table(results, parse_size(size), threads))
