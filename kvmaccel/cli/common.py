"""Options and helpers shared by the ``kvmaccel`` subcommands (kept apart from cli/main.py so
that the command modules can import them without importing the group)."""

from __future__ import annotations

import contextlib
import grp
import logging
import pwd
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from ..engine.populate import ProgressFn
from ..errors import UsageError
from ..model.units import format_size, parse_node_spec, parse_size
from ..plan.limits import DEFAULT_MIN_CHUNK_BYTES, DEFAULT_NICE, Limits

log = logging.getLogger(__name__)


def size_option(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


MAX_ID = (1 << 32) - 2
"""The largest user or group id (``(uid_t) -1`` means "no change" to chown)."""


def parse_nodes(text: str | None) -> tuple[int, ...]:
    return tuple(sorted(parse_node_spec(text))) if text else ()


def parse_owner(text: str | None) -> tuple[int | None, int | None]:
    """``USER[:GROUP]`` (names or numbers) -> (uid, gid)."""
    if not text:
        return None, None
    user, _, group = text.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else None
    except KeyError:
        raise UsageError(f"unknown user or group in --owner {text[:40]!r}; give USER[:GROUP] "
                         "that exist on this host") from None
    for value in (uid, gid):
        if value is not None and value > MAX_ID:
            raise UsageError(f"--owner {text[:40]!r}: id {value} is above the largest "
                             f"possible, {MAX_ID}; give a user and group of this host")
    return uid, gid


def parse_mode(text: str) -> int:
    """An octal file mode of permission bits only (no setuid, setgid or sticky bit)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"invalid --mode {text[:40]!r}; give an octal mode such as 0600"
                         ) from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--mode {text[:40]!r} has bits beyond the permissions 0777 (setuid, "
                         "setgid or sticky): a memory file never needs them; give e.g. 0600")
    return mode


@contextlib.contextmanager
def cancel_on_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the returned event; the engine stops and undoes its work."""
    cancel = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.warning("%s received: cancelling", signal.Signals(signum).name)
        cancel.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[ProgressFn | None]:
    """A click progress bar on a TTY stderr, else nothing."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    with click.progressbar(length=1, label=label, file=sys.stderr,
                           show_pos=False, show_percent=True) as bar:
        shown = 0

        def update(done: int, total: int) -> None:
            nonlocal shown
            bar.length = total
            if done > shown:
                bar.update(done - shown)
                shown = done

        yield update


def limits_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--threads", type=int, help="Threads in all, the caller included "
                     "(default: as many as the caps allow)."),
        click.option("--nice", type=int, default=DEFAULT_NICE, show_default=True,
                     help="Niceness of the helper threads."),
        click.option("--max-helpers-per-node", type=int,
                     help="Per-node helper cap (default 80%% of the node's CPUs)."),
        click.option("--max-helpers", type=int,
                     help="Host-wide helper cap, shared by concurrent runs "
                          "(default 80%% of online CPUs)."),
        click.option("--min-chunk", default=format_size(DEFAULT_MIN_CHUNK_BYTES),
                     show_default=True, help="Smallest chunk of work."),
        click.option("--ignore-load", is_flag=True,
                     help="Start niced helpers even on CPUs that are busy right now."),
    ]):
        func = option(func)
    return func


def make_limits(threads: int | None, nice: int, max_helpers_per_node: int | None,
                max_helpers: int | None, min_chunk: str, ignore_load: bool = False) -> Limits:
    return Limits(threads=threads, nice=nice, max_helpers_per_node=max_helpers_per_node,
                  max_helpers_host=max_helpers, min_chunk_bytes=parse_size(min_chunk),
                  idle_cpus_only=not ignore_load)
