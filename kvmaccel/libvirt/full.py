"""The libvirt qemu hook contract: what kvmaccel does at each step of a guest's life.

libvirt runs ``/etc/libvirt/hooks/qemu`` and every executable in ``/etc/libvirt/hooks/qemu.d/``
(libvirt 6.5+) as ``<name> <op> <subop> <extra>`` with the domain XML on stdin.  A hook must
never call the libvirt API (the daemon holds the domain's lock: deadlock), and it has no
timeout.  A non-zero exit at a start phase refuses the start and libvirt shows the hook's
stderr; exit 0 is not logged by libvirt at all, so kvmaccel logs to syslog or its own file.

* ``prepare begin``: plan the guest (:func:`kvmaccel.plan.planner.plan_domain`) and check that the
  host has the memory for what kvmaccel will populate.
* ``start begin``: libvirt has just created the per-domain memory directory
  (``<memory_backing_dir>/<shortname>/``, empty, owned by the qemu user).  For each backend
  the plan populates, create the file QEMU will be handed (``O_EXCL``, mode 0600, owner and
  group of that directory, size ``file_size_bytes``) and populate it with the engine.  QEMU
  then finds the file, uses it as is, and maps pages that are already there.
* ``started begin``: QEMU has preallocated every backend; a filler the start left populating
  beside QEMU is stopped for good (:mod:`kvmaccel.serve.filler`).  The installed script runs
  Python for it only when a start left a filler.
* ``stopped end`` / ``release end``: remove whatever kvmaccel created that is still there.
  By then libvirt has deleted the per-domain directory and the XML carries no ``id``, so the
  paths are kept from ``start`` in ``<run_dir>/domains/<uuid>.json``.
* every other operation: exit 0 at once (``hooks/qemu`` checks before importing kvmaccel).

Policy (:mod:`kvmaccel.plan.config`): fail open by default, i.e. any error is logged and the hook
exits 0, so the guest starts as libvirt would have started it; with ``strict = true`` an error
at ``prepare`` or ``start`` exits 1 with one line on stderr, ``kvmaccel: <reason>``.  A
populate that runs past ``populate_timeout_s`` is cancelled and its file removed, never fatal.

Nothing is written to stdout.  Logging is configured here (the hook's entry point) only.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

from .. import paths, safefs
from ..engine import records
from ..errors import KvmaccelError
from ..plan.config import HookConfig, read_config
from . import state
from .state import LOG_BODY, SYSLOG_SOCKET, log_prefix, log_targets
from .warm import start_from_pool

log = logging.getLogger(__name__)

HANDLED_OPS = frozenset({("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                         ("stopped", "end"), ("release", "end")})
"""(op, subop) pairs kvmaccel acts on; keep in step with the check at the top of hooks/qemu."""

FALLBACK_CONFIG = HookConfig()
"""What the hook logs with when the config file itself is broken (then it fails open)."""


# --- logging --------------------------------------------------------------------------------

class LogFileHandler(logging.FileHandler):
    """A log file opened as the record file is (:func:`kvmaccel.safefs.open_append`): made
    0600 in a directory of root's that nobody else can write, never through a symlink,
    never another user's file.  Raises :class:`OSError` or
    :class:`~kvmaccel.errors.UnsafePathError` when it cannot be opened so."""

    def _open(self) -> io.TextIOWrapper:
        return open(safefs.open_append(self.baseFilename), "a", encoding=self.encoding,
                    errors=self.errors)


class _Context(logging.Filter):
    """Puts the domain name and the operation in every record."""

    def __init__(self, name: str, op: str) -> None:
        super().__init__()
        self.domain, self.op = name, op

    def filter(self, record: logging.LogRecord) -> bool:
        record.domain, record.op = self.domain, self.op
        return True


def setup_logging(config: HookConfig, name: str, op: str) -> None:
    """Syslog when the socket exists (and ``syslog`` is on), else (or also, when ``log_file``
    is set explicitly) the log file.  A log file that cannot be opened is skipped: logging
    must never stop a guest."""
    handlers: list[logging.Handler] = []
    to_syslog, to_file = log_targets(config.syslog, config.log_file_set)
    if to_syslog:
        from logging.handlers import SysLogHandler  # here only: hook calls delay the guest

        try:
            sh = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
            sh.setFormatter(logging.Formatter(log_prefix() + LOG_BODY))
            handlers.append(sh)
        except OSError:
            pass
    if to_file or not handlers:  # not handlers: the syslog socket refused us
        try:
            fh = LogFileHandler(config.log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s " + log_prefix() + LOG_BODY))
            handlers.append(fh)
        except (OSError, KvmaccelError):
            pass
    root = logging.getLogger("kvmaccel")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    context = _Context(name, op)
    for h in handlers:
        h.addFilter(context)
        root.addHandler(h)
    if not handlers:
        root.addHandler(logging.NullHandler())
    root.setLevel(config.log_level.upper())
    root.propagate = False


# --- the operations -------------------------------------------------------------------------

def op_prepare(xml: bytes, config: HookConfig) -> None:
    """Plan and check capacity (a warm prepare was tried before, in
    :func:`kvmaccel.libvirt.entry.main`)."""
    from .ops import op_prepare as plan_and_check

    plan_and_check(xml, config)


def op_start(xml: bytes, config: HookConfig, cancel: threading.Event | None = None) -> None:
    """Start from the pool when ``prepare`` left a recipe (say, the config changed since
    the warm path last saw it); otherwise create and populate the files."""
    if config.pool_enabled:
        declined = start_from_pool(xml, log.info)
        if declined is None:
            return
        log.debug("not from the pool's recipe: %s", declined)
    from .ops import op_start as serve_start

    serve_start(xml, config, cancel)


def op_started(name: str, xml: bytes) -> None:
    """Stop the guest's filler for good (:func:`kvmaccel.libvirt.started.stop_at_started`; the
    entry point tried this before without logging or the config file)."""
    from .started import stop_at_started

    stop_at_started(name, xml, log.info)


def _operation(op: str, name: str) -> Callable[[bytes, HookConfig], None]:
    if op == "prepare":
        return op_prepare
    if op == "start":
        return op_start
    if op == "started":
        return lambda xml, _config: op_started(name, xml)
    from . import ops as hook_ops  # planning and populating: only when needed

    return {"stopped": hook_ops.op_stop, "release": hook_ops.op_stop}[op]


# --- entry point ----------------------------------------------------------------------------

def main(argv: Sequence[str], stdin: BinaryIO | None = None,
         config_path: str | None = None, warm_declined: str | None = None) -> int:
    """Run the hook for ``argv`` (without the program name).  Returns the exit status.
    ``warm_declined``: why the warm path (:mod:`kvmaccel.libvirt.entry`) did not do this
    call, logged at debug level.

    0 for every operation kvmaccel does not act on, for success, and for any failure unless
    ``strict``; 1 with ``kvmaccel: <reason>`` on stderr for a strict failure at a start
    phase; 2 for a malformed command line (not a libvirt call).
    """
    if len(argv) != 4:
        print("usage: qemu-hook <name> <op> <subop> <extra>, domain XML on stdin (libvirt "
              "runs this; see `kvmaccel hook --help`)", file=sys.stderr)
        return 2
    name, op, subop, _extra = argv
    if (op, subop) not in HANDLED_OPS:
        return 0
    logger = logging.getLogger("kvmaccel")
    saved = (sys.stdout, list(logger.handlers), logger.level, logger.propagate,
             signal.getsignal(signal.SIGTERM))
    sys.stdout = sys.stderr  # never write to stdout, whatever a library does
    # SIGTERM (libvirtd going down, an operator) cancels a populate like Ctrl-C: the engine
    # stops and the partly populated files are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(name, op, stdin, config_path, warm_declined)
    finally:
        sys.stdout = saved[0]
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if h not in saved[1]:
                h.close()
        for h in saved[1]:
            logger.addHandler(h)
        logger.setLevel(saved[2])
        logger.propagate = saved[3]
        signal.signal(signal.SIGTERM, saved[4])


def _run(name: str, op: str, stdin: BinaryIO | None, config_path: str | None,
         warm_declined: str | None = None) -> int:
    paths.use(paths.resolve(os.environ, config_file=config_path))
    path = paths.config_path()
    try:
        config = read_config(path)
    except KvmaccelError as e:
        setup_logging(FALLBACK_CONFIG, name, op)
        log.error("%s; failing open: the guest starts without kvmaccel", e)
        return 0
    setup_logging(config, name, op)
    if warm_declined is not None:
        log.debug("the warm path declined: %s", warm_declined)
    # Everything kvmaccel keeps goes in the config's run_dir, the warm path's snapshot too
    # (``kvmaccel hook install`` tells the installed script where that is).
    paths.use(paths.resolve(os.environ, config_file=config_path, run_dir=config.run_dir,
                            record_file=config.record_file))  # libvirt: no variables
    try:
        state.save_config_snapshot(config, path)
    except (OSError, KvmaccelError) as e:
        log.warning("cannot save the config for the warm start path: %s", e)
    if not config.enabled and op != "started":  # a filler left running is stopped anyway
        log.debug("disabled in %s", config.path)
        return 0
    data = (stdin or sys.stdin.buffer).read()
    starting = op in ("prepare", "start")
    try:
        _operation(op, name)(data, config)
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KvmaccelError):
            reason = " ".join(str(e).split())  # one line: libvirt shows it to the user
        elif isinstance(e, KeyboardInterrupt):
            reason = "interrupted (SIGTERM or SIGINT)"
        else:
            reason = f"unexpected {type(e).__name__}: {e}"
        detail = isinstance(e, Exception) and not isinstance(e, KvmaccelError)
        if starting and (config.strict or op == "start"):
            records.start("refused" if config.strict else "failed_open",
                          domain=name, reason=reason)
        if config.strict and starting:
            log.error("%s; strict = true: refusing the start", reason, exc_info=detail)
            print(f"kvmaccel: {reason}", file=sys.stderr)
            return 1
        log.error("%s; failing open: the guest starts as libvirt would start it", reason,
                  exc_info=detail)
    return 0
