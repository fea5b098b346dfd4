"""``kvmaccel tune``: measure the thread counts per node, store them, show them.

A thin layer over :mod:`kvmaccel.bench.tune` (measuring) and :mod:`kvmaccel.plan.tuning` (the
result and the state file).  Errors are raised as :class:`~kvmaccel.errors.KvmaccelError`; the
``kvmaccel`` group maps them to one line and an exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from ..bench.tune import DEFAULT_ROUNDS, ProgressFn, measure
from ..errors import HostError
from ..host.facts import read_host
from ..model.units import parse_node_list, parse_page_size, parse_size
from ..plan.tuning import (
    Tuning,
    format_curves,
    host_fingerprint,
    load_tuning,
    save_tuning,
    state_path,
)
from .common import cancel_on_signals

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[ProgressFn | None]:
    """A click progress bar over the runs, on a TTY stderr only."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    label = {"text": ""}

    def show(_: int | None) -> str:
        return label["text"]

    with click.progressbar(length=1, label="tuning", file=sys.stderr, show_pos=True,
                           item_show_func=show) as bar:
        shown = 0

        def update(done: int, total: int, text: str) -> None:
            nonlocal shown
            bar.length = total
            label["text"] = text
            bar.update(done - shown)
            shown = done

        yield update


def _report(tuning: Tuning, path: str, saved: bool) -> dict[str, Any]:
    host_fp = host_fingerprint(read_host())
    diffs = tuning.fingerprint.differences(host_fp)
    return {"path": path, "saved": saved, "matches_host": not diffs,
            "differences": list(diffs), **tuning.as_dict()}


@click.command(name="tune")
@click.option("--size", help="Scratch memory per run and page size (default 1G, at most a "
              "quarter of the node's free memory or free huge pages).")
@click.option("--rounds", type=click.IntRange(1, 100), default=DEFAULT_ROUNDS,
              show_default=True, help="Runs of every thread count.")
@click.option("--nodes", help="NUMA nodes to measure, e.g. 0,1 (default: all with CPUs).")
@click.option("--max-threads", type=click.IntRange(1), help="Largest thread count measured "
              "(default: the node's usable CPUs).")
@click.option("--page-size", "page_sizes", multiple=True, metavar="SIZE",
              help="Measure only this page size (4K, 2M, 1G); repeatable.")
@click.option("--no-save", is_flag=True, help="Measure and print, keep the stored result.")
@click.option("--show", is_flag=True, help="Print the stored result and whether it matches "
              "this host; measure nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune(size: str | None, rounds: int, nodes: str | None, max_threads: int | None,
         page_sizes: tuple[str, ...], no_save: bool, show: bool, as_json: bool) -> None:
    """Measure how many threads populate each NUMA node fastest, and keep the knee.

    For every node and page size, times populating a scratch backing with 1, 2, ... threads
    up to the node's CPUs, and stores the knee (the smallest count within 5% of the best)
    with a fingerprint of the host in $KVMACCEL_STATE_DIR/tuning.json (default
    /var/lib/kvmaccel).  `kvmaccel plan` and populations use it as the per-node default
    while the fingerprint matches.
    """
    path = state_path()
    if show:
        stored = load_tuning(path)
        if stored is None:
            raise HostError(f"no tuning file at {path}; run kvmaccel tune to measure")
        report = _report(stored, path, saved=True)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(f"{path}:")
        click.echo(format_curves(stored))
        click.echo("matches this host: yes" if report["matches_host"] else
                   "matches this host: NO, ignored (" + "; ".join(report["differences"])
                   + "); run kvmaccel tune again")
        return
    host = read_host()
    fingerprint = host_fingerprint(host)
    with cancel_on_signals() as cancel, _progress(not as_json) as progress:
        result = measure(
            host, fingerprint, size_bytes=parse_size(size) if size is not None else None,
            rounds=rounds,
            nodes=list(parse_node_list(nodes)) if nodes is not None else None,
            max_threads=max_threads,
            page_sizes_kib=[parse_page_size(p) for p in page_sizes] or None,
            progress=progress, cancel=cancel)
    if not no_save:
        save_tuning(result, path)
    if as_json:
        click.echo(json.dumps(_report(result, path, not no_save), indent=2))
        return
    click.echo(format_curves(result))
    click.echo(f"saved to {path}" if not no_save else "not saved (--no-save)")
