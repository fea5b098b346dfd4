"""Options and helpers shared by the ``kvmaccel`` subcommands (kept apart from cli/main.py so
that the command modules can import them without importing the group)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from ..engine.populate import ProgressFn
from ..errors import HostError, UsageError
from ..model.textfile import MAX_TEXT_BYTES, read_regular
from ..model.units import format_size, parse_node_list, parse_size
from ..plan.limits import DEFAULT_MIN_CHUNK_BYTES, DEFAULT_NICE, Limits

if TYPE_CHECKING:
    from ..plan.config import HookConfig

log = logging.getLogger(__name__)


def size_option(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


def parse_nodes(text: str | None, what: str = "--nodes") -> tuple[int, ...]:
    """``--nodes``: absent is no binding; given, it must name a node (``""`` is refused)."""
    return () if text is None else parse_node_list(text, what)


NAME_MAX = 255
PATH_MAX = 4096


def check_path(path: str, what: str = "PATH") -> str:
    """A path the user gave for a file to create or remove: not empty, and within the
    kernel's limits (a longer name fails with ENAMETOOLONG deep in the engine)."""
    if not path:
        raise UsageError(f"{what} is empty; give the path of a file")
    raw = path.encode(errors="surrogateescape")
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise UsageError(f"{what} {path[:40]!r}... is too long: a file name has at most "
                         f"{NAME_MAX} bytes, a path less than {PATH_MAX}; give a shorter one")
    return path


def read_input(path: str, what: str = "DOMAIN.xml") -> bytes:
    """The bytes of the file the user named (``-``: stdin), refusing a directory, FIFO or
    device (the read would never end) and anything above 16 MiB."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1) if sys.stdin else b""
        if len(data) > MAX_TEXT_BYTES:
            raise UsageError(f"{what} on stdin is larger than {MAX_TEXT_BYTES >> 20} MiB; give "
                             "a domain XML")
        return data
    if not path:
        raise UsageError(f"{what} is empty; give a file name, or - for stdin")
    try:
        return read_regular(path)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}; give {what} as a file, or - "
                         "for stdin") from None


def read_text_input(path: str, what: str = "DOMAIN.xml") -> str:
    """:func:`read_input` as UTF-8 text (what libvirt's XML is)."""
    data = read_input(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path}: not UTF-8 text (byte {e.start}); give a domain XML "
                         "file as libvirt writes it") from None


def load_config(path: str | None) -> HookConfig:
    """The config file of ``--config FILE`` (which must exist), else the default one."""
    from ..plan.config import read_config  # not on `kvmaccel run`'s path

    return read_config(path, required=path is not None)


def quiet_libvirt() -> None:
    """libvirt-python prints every error on stderr itself ("libvirt: error : ...") before
    raising it; kvmaccel says what went wrong in its own one line."""
    try:
        import libvirt
    except ImportError:
        return
    register = getattr(libvirt, "registerErrorHandler", None)  # absent from a stand-in
    if register is not None:
        register(lambda _ctx, _err: None, None)


def existing_file(_ctx: click.Context, param: click.Parameter, value: str | None
                  ) -> str | None:
    """An option naming a file to read: it must exist and be a regular file (a directory
    gave a traceback, a FIFO or /dev/zero a read that never ends)."""
    if value is not None:
        _check_kind(value, param, stat.S_ISREG, "a regular file")
    return value


def file_if_any(_ctx: click.Context, param: click.Parameter, value: str | None
                ) -> str | None:
    """An option naming a file that may not exist yet (a record file before the first
    event), but if it does, is a regular file."""
    if value is not None and (not value or os.path.lexists(value)):
        _check_kind(value, param, stat.S_ISREG, "a regular file")
    return value


def existing_dirs(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An option naming directories (``--dir``, repeatable or not): each must exist (a
    mistyped one silently meant the filesystem it would be on)."""
    for path in (value,) if isinstance(value, str) else value or ():
        _check_kind(path, param, stat.S_ISDIR, "a directory")
    return value


def _check_kind(path: str, param: click.Parameter, is_kind: Callable[[int], bool],
                kind: str) -> None:
    name = param.opts[0] if param.opts else param.name
    try:
        st = os.stat(path) if path else None
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror}; give {kind} that exists") from None
    if st is None or not is_kind(st.st_mode):
        raise click.BadParameter(f"{path!r} is not {kind}; give {kind} that exists",
                                 param_hint=f"'{name}'")


MAX_DOMAIN_ID = (1 << 31) - 1


def check_domain_id(_ctx: click.Context, _param: click.Parameter,
                    value: int | None) -> int | None:
    """``--id N``: libvirt's ids of running guests are 1 to 2^31-1; -1 is a guest not
    running (what ``virsh domxml-to-native`` uses)."""
    if value is not None and value != -1 and not 1 <= value <= MAX_DOMAIN_ID:
        raise click.BadParameter(f"{value} is no libvirt domain id; give 1 to {MAX_DOMAIN_ID}, "
                                 "or -1 for a guest that is not running")
    return value


if TYPE_CHECKING:  # click 8.2 made ParamType generic; Debian 12's click 8.1 is not
    _FloatParam = click.ParamType[float]
else:
    _FloatParam = click.ParamType


class Seconds(_FloatParam):
    """A finite number of seconds from ``low`` to ``high`` (click's FloatRange lets nan
    through: every comparison with nan is false)."""

    name = "seconds"

    def __init__(self, low: float, high: float, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        above_low = seconds > self.low if self.low_open else seconds >= self.low
        if not (above_low and seconds <= self.high):
            low = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
            self.fail(f"{value!r} is not a number of seconds {low} to {self.high:g}", param, ctx)
        return seconds


def parse_owner(text: str | None) -> tuple[int | None, int | None]:
    """``USER[:GROUP]`` -> (uid, gid), each a name or a number as ``chown`` and libvirt read
    them (:mod:`kvmaccel.host.owner`: a name first, digits that name no one as an id, ``+N``
    always an id)."""
    from ..host.owner import group_id, user_id

    if not text:
        return None, None
    user, _, group = text.partition(":")
    hint = "give USER[:GROUP] that exist on this host"
    try:
        return (user_id(user, "--owner", hint),
                group_id(group, "--owner", hint) if group else None)
    except HostError as e:
        raise UsageError(str(e)) from None


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
