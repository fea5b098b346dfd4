"""The libvirt qemu hook contract: what kvmaccel does at each step of a guest's life.

libvirt runs ``/etc/libvirt/hooks/qemu`` and every executable in ``/etc/libvirt/hooks/qemu.d/``
(libvirt 6.5+) as ``<name> <op> <subop> <extra>`` with the domain XML on stdin.  A hook must
never call the libvirt API (the daemon holds the domain's lock: deadlock), and it has no
timeout.  A non-zero exit at a start phase refuses the start and libvirt shows the hook's
stderr; exit 0 is not logged by libvirt at all, so kvmaccel logs to syslog or its own file.

* ``prepare begin``: plan the guest (:func:`kvmaccel.plan.plan_domain`) and check that the
  host has the memory for what kvmaccel will populate.
* ``start begin``: libvirt has just created the per-domain memory directory
  (``<memory_backing_dir>/<shortname>/``, empty, owned by the qemu user).  For each backend
  the plan populates, create the file QEMU will be handed (``O_EXCL``, mode 0600, owner and
  group of that directory, size ``file_size_bytes``) and populate it with the engine.  QEMU
  then finds the file, uses it as is, and maps pages that are already there.
* ``stopped end`` / ``release end``: remove whatever kvmaccel created that is still there.
  By then libvirt has deleted the per-domain directory and the XML carries no ``id``, so the
  paths are kept from ``start`` in ``<run_dir>/domains/<uuid>.json``.
* every other operation: exit 0 at once (``hooks/qemu`` checks before importing kvmaccel).

Policy (:mod:`kvmaccel.config`): fail open by default, i.e. any error is logged and the hook
exits 0, so the guest starts as libvirt would have started it; with ``strict = true`` an error
at ``prepare`` or ``start`` exits 1 with one line on stderr, ``kvmaccel: <reason>``.  A
populate that runs past ``populate_timeout_s`` is cancelled and its file removed, never fatal.

Nothing is written to stdout.  Logging is configured here (the hook's entry point) only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from . import hook_pool
from .backing import BackingSpec, created_by_us, forget, populate_backings
from .config import HookConfig, read_config
from .domain import Domain, parse_domain
from .engine import describe_helpers
from .errors import BackingError, CancelledError, CapacityError, KvmaccelError, UsageError
from .host import read_host
from .limits import Limits
from .plan import DomainPlan, plan_domain
from .policy import host_policy
from .qemuconf import read_qemu_conf
from .slots import run_dir
from .statefile import write_json_atomic
from .units import format_size

log = logging.getLogger(__name__)

HANDLED_OPS = frozenset({("prepare", "begin"), ("start", "begin"), ("stopped", "end"),
                         ("release", "end")})
"""(op, subop) pairs kvmaccel acts on; keep in step with the check at the top of hooks/qemu."""

SYSLOG_SOCKET = "/dev/log"
FALLBACK_CONFIG = HookConfig()
"""What the hook logs with when the config file itself is broken (then it fails open)."""
FILE_MODE = 0o600


# --- logging --------------------------------------------------------------------------------

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
    if config.syslog and os.path.exists(SYSLOG_SOCKET):
        try:
            sh = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            sh.setFormatter(logging.Formatter(
                f"kvmaccel-hook[{os.getpid()}]: %(domain)s %(op)s: %(levelname)s: %(message)s"))
            handlers.append(sh)
        except OSError:
            pass
    if not handlers or config.log_file_set:
        try:
            os.makedirs(os.path.dirname(config.log_file), mode=0o755, exist_ok=True)
            fh = logging.FileHandler(config.log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter(
                f"%(asctime)s kvmaccel-hook[{os.getpid()}]: %(domain)s %(op)s: "
                "%(levelname)s: %(message)s"))
            handlers.append(fh)
        except OSError:
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


# --- per-domain state ----------------------------------------------------------------------

def state_path(key: str) -> str:
    """``<run_dir>/domains/<uuid>.json`` (the run dir comes from ``$KVMACCEL_RUN_DIR``)."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a state file")
    return os.path.join(run_dir(), "domains", f"{key}.json")


def _domain_key(domain: Domain) -> str:
    return domain.uuid or f"name-{domain.name}"


def write_state(key: str, state: dict[str, object]) -> None:
    write_json_atomic(state_path(key), state)


def read_state(key: str) -> dict[str, object] | None:
    try:
        with open(state_path(key), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BackingError(f"cannot read kvmaccel's state {state_path(key)}: {e}") from None
    return data if isinstance(data, dict) else None


# --- the operations -------------------------------------------------------------------------

def make_plan(xml: bytes, config: HookConfig) -> tuple[DomainPlan, Limits]:
    """Parse and plan the guest on this host; also return the limits the engine runs with:
    the config's, with ``<allocation threads='N'/>``, the energy policy and the tuned
    per-node counts applied exactly as the planner applies them (the plan's ``limits``).
    Raises :class:`KvmaccelError` subclasses."""
    domain = parse_domain(xml)
    host = read_host()
    tuned, energy = host_policy(config.energy, host)
    if energy.max_threads is not None:
        log.info("%s", energy.reason)
    plan = plan_domain(domain, host, read_qemu_conf(config.qemu_conf), config.limits,
                       tuned=tuned, energy=energy)
    return plan, plan.limits


def op_prepare(xml: bytes, config: HookConfig) -> None:
    """Plan and check capacity.  Raises :class:`CapacityError` with the numbers."""
    plan, _ = make_plan(xml, config)
    if not plan.populated:
        reasons = "; ".join(f"{b.backend_id}: {b.skip_reason}" for b in plan.backends)
        log.info("nothing for kvmaccel to populate (%s)", reasons or "no memory backends")
        return
    for check in hook_pool.capacity_after_pool(plan, read_host(), config):
        if not check.ok:
            where = "host-wide" if check.node is None else f"on node {check.node}"
            raise CapacityError(
                f"guest {plan.name} needs {format_size(check.needed_bytes)} of "
                f"{format_size(check.page_size_kib * 1024)} pages {where} but only "
                f"{format_size(check.available_bytes)} is free ({check.source}); reserve more "
                "huge pages or free memory",
                node_id=check.node, page_size_kib=check.page_size_kib,
                needed_bytes=check.needed_bytes, available_bytes=check.available_bytes)
    log.info("plan: populate %s with %d thread(s)",
             ", ".join(f"{b.mem_path} ({format_size(b.file_size_bytes)})"
                       for b in plan.populated), plan.helpers.threads)


def backing_specs(plan: DomainPlan) -> list[BackingSpec]:
    """One spec per populated backend, owned like the directory libvirt made for it.

    Raises :class:`BackingError` when that directory does not exist (libvirt makes it just
    before ``start begin``).
    """
    specs = []
    for b in plan.populated:
        assert b.mem_path is not None  # populated backends always have a file
        directory = os.path.dirname(b.mem_path)
        try:
            st = os.stat(directory)
        except OSError as e:
            raise BackingError(f"{directory}: {e.strerror}; libvirt should have created it "
                               "before 'start begin'", path=b.mem_path) from None
        specs.append(BackingSpec(
            path=b.mem_path, size_bytes=b.file_size_bytes, nodes=b.host_nodes or (),
            policy="preferred" if b.policy == "preferred" else "bind", mode=FILE_MODE,
            uid=st.st_uid, gid=st.st_gid, name=b.alias))
    return specs


def op_start(xml: bytes, config: HookConfig, cancel: threading.Event | None = None) -> None:
    """Create and populate every file the plan populates; record them by uuid first."""
    plan, limits = make_plan(xml, config)
    if not plan.populated:
        log.info("nothing for kvmaccel to populate")
        return
    specs = backing_specs(plan)
    key = plan.uuid or f"name-{plan.name}"
    host = read_host()
    # Record first what this start is about to create, so that a crash leaves a trail.
    state: dict[str, object] = {
        "name": plan.name, "uuid": plan.uuid, "id": plan.domain_id, "shortname": plan.shortname,
        "files": [s.path for s in specs], "pool_links": [], "start_unix": time.time(),
    }
    write_state(key, state)
    linked, fresh = hook_pool.take(plan, specs, host, config)
    state["files"] = [spec.path for _, spec in fresh]
    state["pool_links"] = [dataclasses.asdict(link) for link in linked]
    write_state(key, state)
    if not fresh:
        log.info("started from the pool: %s", ", ".join(link.link_path for link in linked))
        return
    specs = [spec for _, spec in fresh]
    cancel = cancel or threading.Event()
    timed_out = threading.Event()

    def out_of_time() -> None:
        timed_out.set()
        cancel.set()

    timer = None
    if config.populate_timeout_s > 0:
        timer = threading.Timer(config.populate_timeout_s, out_of_time)
        timer.daemon = True
        timer.start()
    try:
        _, result = populate_backings(specs, host, limits, cancel=cancel)
    except CancelledError:
        write_state(key, {**state, "files": [], "cancelled": True})  # pool links stay
        if timed_out.is_set():
            log.warning("populate ran past populate_timeout_s = %g s: cancelled and removed "
                        "the partly populated file(s); QEMU allocates the memory itself",
                        config.populate_timeout_s)
            return
        raise
    except BaseException:
        write_state(key, {**state, "files": []})
        raise
    finally:
        if timer is not None:
            timer.cancel()
    adopted = hook_pool.adopt(plan, fresh, host, config)
    state["pool_links"] = [dataclasses.asdict(link) for link in [*linked, *adopted]]
    write_state(key, {**state, "populated_unix": time.time(), "result": result.as_dict()})
    log.info("populated %s in %.2f s (%.2f GiB/s), %d thread(s), helpers per node %s: %s",
             format_size(result.bytes_total), result.seconds, result.gib_per_s, result.threads,
             describe_helpers(result), ", ".join(str(s.path) for s in specs))


def op_stop(xml: bytes, config: HookConfig) -> None:
    """Remove the files kvmaccel created for this guest that are still there; forget them."""
    domain = parse_domain(xml)
    key = _domain_key(domain)
    state = read_state(key)
    if state is None:
        log.debug("no kvmaccel state for %s", key)
        return
    freed = 0
    files = state.get("files")
    for path in files if isinstance(files, list) else []:
        if not isinstance(path, str):
            continue
        if os.path.lexists(path) and created_by_us(path):
            freed += os.stat(path).st_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("removed %s", path)
        elif os.path.lexists(path):
            log.warning("%s is no longer the file kvmaccel created; left alone", path)
        forget(path)
    links = state.get("pool_links")
    if domain.uuid and isinstance(links, list) and links:
        hook_pool.release(domain.uuid, [x for x in links if isinstance(x, dict)])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(key))
    log.info("released %s", format_size(freed) if freed else "nothing (libvirt removed the "
             "files with the domain directory)")


OPERATIONS: dict[str, Callable[[bytes, HookConfig], None]] = {
    "prepare": op_prepare, "start": op_start, "stopped": op_stop, "release": op_stop,
}


# --- entry point ----------------------------------------------------------------------------

def main(argv: Sequence[str], stdin: BinaryIO | None = None,
         config_path: str | None = None) -> int:
    """Run the hook for ``argv`` (without the program name).  Returns the exit status.

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
        return _run(name, op, stdin, config_path)
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


def _run(name: str, op: str, stdin: BinaryIO | None, config_path: str | None) -> int:
    try:
        config = read_config(config_path)
    except KvmaccelError as e:
        setup_logging(FALLBACK_CONFIG, name, op)
        log.error("%s; failing open: the guest starts without kvmaccel", e)
        return 0
    setup_logging(config, name, op)
    if not config.enabled:
        log.debug("disabled in %s", config.path)
        return 0
    os.environ["KVMACCEL_RUN_DIR"] = config.run_dir
    data = (stdin or sys.stdin.buffer).read()
    starting = op in ("prepare", "start")
    try:
        OPERATIONS[op](data, config)
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KvmaccelError):
            reason = " ".join(str(e).split())  # one line: libvirt shows it to the user
        elif isinstance(e, KeyboardInterrupt):
            reason = "interrupted (SIGTERM or SIGINT)"
        else:
            reason = f"unexpected {type(e).__name__}: {e}"
        detail = isinstance(e, Exception) and not isinstance(e, KvmaccelError)
        if config.strict and starting:
            log.error("%s; strict = true: refusing the start", reason, exc_info=detail)
            print(f"kvmaccel: {reason}", file=sys.stderr)
            return 1
        log.error("%s; failing open: the guest starts as libvirt would start it", reason,
                  exc_info=detail)
    return 0
