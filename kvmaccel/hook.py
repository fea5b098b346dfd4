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

import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from .config import HookConfig, read_config
from .errors import BackingError, KvmaccelError, UsageError
from .paths import run_dir
from .statefile import write_json_atomic

if TYPE_CHECKING:
    from .pool import PoolKey

log = logging.getLogger(__name__)

HANDLED_OPS = frozenset({("prepare", "begin"), ("start", "begin"), ("stopped", "end"),
                         ("release", "end")})
"""(op, subop) pairs kvmaccel acts on; keep in step with the check at the top of hooks/qemu."""

SYSLOG_SOCKET = "/dev/log"
FALLBACK_CONFIG = HookConfig()
"""What the hook logs with when the config file itself is broken (then it fails open)."""
FILE_MODE = 0o600
RECIPE_MAX_AGE_S = 600
"""A ``prepare`` older than this is not trusted by ``start`` (the pool may have changed)."""


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
        from logging.handlers import SysLogHandler  # here only: hook calls delay the guest

        try:
            sh = SysLogHandler(address=SYSLOG_SOCKET, facility=SysLogHandler.LOG_DAEMON)
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

def recipe_path(domain_uuid: str) -> str:
    """What ``prepare`` left for a fast start from the pool."""
    return state_path(f"{domain_uuid}.prepared")


def cache_path(domain_uuid: str) -> str:
    """The pool-related part of the guest's last plan, for a fast ``prepare``."""
    return state_path(f"{domain_uuid}.plan-cache")


_DOMAIN_ID = re.compile(rb"(<domain\b[^>]*?)\s+id=(['\"])(-?\d+)\2")
_UUID = re.compile(rb"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def _ids(xml: bytes) -> tuple[str | None, int | None]:
    """The domain's uuid and id, read without parsing the whole XML."""
    m_uuid, m_id = _UUID.search(xml), _DOMAIN_ID.search(xml)
    return (m_uuid.group(1).decode().lower() if m_uuid else None,
            int(m_id.group(3)) if m_id else None)


def xml_fingerprint(xml: bytes, config: HookConfig) -> str:
    """What a plan is a function of, as far as a start from the pool goes: the domain XML
    without its id (which changes at every start), and qemu.conf and kvmaccel's config as
    they are on disk now."""
    digest = hashlib.sha256(_DOMAIN_ID.sub(rb"\1", xml, count=1))
    for path in (config.qemu_conf, config.path):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        digest.update(f"{path}:{st.st_mtime_ns if st else 0}:{st.st_size if st else 0};"
                      .encode())
    return digest.hexdigest()


def write_recipe_if_clean(domain_uuid: str, domain_id: int, name: str, shortname: str,
                          backends: list[dict[str, Any]]) -> bool:
    """Write the start recipe when a clean pool file waits for every backend."""
    from .pool import Pool

    wanted: dict[tuple[str, PoolKey], int] = {}
    for b in backends:
        slot = (b["pool_dir"], _key(b))
        wanted[slot] = wanted.get(slot, 0) + 1
    for (pool_dir, key), count in wanted.items():
        if len(Pool(pool_dir).clean_for(key, domain_uuid)) < count:
            return False
    write_json_atomic(recipe_path(domain_uuid), {
        "uuid": domain_uuid, "id": domain_id, "name": name, "shortname": shortname,
        "written_unix": time.time(), "backends": backends})
    return True


def _key(backend: dict[str, Any]) -> PoolKey:
    from .pool import PoolKey

    return PoolKey(**{**backend["key"], "host_nodes": tuple(backend["key"]["host_nodes"])})


def op_prepare(xml: bytes, config: HookConfig) -> None:
    """Plan and check capacity; when the same XML was planned before and a clean pool file
    waits for every backend, only leave the start recipe (no planning: every hook call is
    start-up time of the guest)."""
    if config.pool_enabled and prepare_from_cache(xml, config):
        return
    from .hook_ops import op_prepare as plan_and_check

    plan_and_check(xml, config)


def prepare_from_cache(xml: bytes, config: HookConfig) -> bool:
    """True when the cached plan still holds and the pool serves every backend."""
    uuid, domain_id = _ids(xml)
    if uuid is None or domain_id is None:
        return False
    try:
        with open(cache_path(uuid), encoding="utf-8") as f:
            cache = json.load(f)
        if cache["fingerprint"] != xml_fingerprint(xml, config):
            return False
        shortname = f"{domain_id}-{cache['shortname_tail']}"
        backends = [{**b, "mem_path": f"/{shortname}/".join(b["path_around_shortname"])}
                    for b in cache["backends"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not write_recipe_if_clean(uuid, domain_id, cache["name"], shortname, backends):
        return False
    log.info("plan: as before; the pool serves %s", ", ".join(b["mem_path"] for b in backends))
    return True


def op_start(xml: bytes, config: HookConfig, cancel: threading.Event | None = None) -> None:
    """Start from the pool when ``prepare`` found a clean file for every backend (a few
    milliseconds, nothing else imported); otherwise create and populate the files."""
    if config.pool_enabled and start_from_pool(xml):
        return
    from .hook_ops import start_populating

    start_populating(xml, config, cancel)


def start_from_pool(xml: bytes) -> bool:
    """Link the clean pool files ``prepare`` found at the paths libvirt hands QEMU; True when
    every backend is served.  Anything unexpected (no recipe, another domain id, a file
    taken meanwhile) gives back what was linked and returns False: the full path runs."""
    from .pool import Pool, PoolEntry

    uuid, domain_id = _ids(xml)
    if uuid is None:
        return False
    try:
        with open(recipe_path(uuid), encoding="utf-8") as f:
            recipe = json.load(f)
        os.unlink(recipe_path(uuid))
        fresh = (recipe["id"] == domain_id
                 and time.time() - float(recipe["written_unix"]) < RECIPE_MAX_AGE_S)
        backends = list(recipe["backends"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not fresh or not backends:
        return False
    taken: list[tuple[Pool, PoolEntry, str, str]] = []
    for b in backends:
        pool = Pool(b["pool_dir"])
        target = b["mem_path"]
        st = os.stat(os.path.dirname(target))
        entry = pool.take(_key(b), target, domain_uuid=uuid, backend_id=b["backend_id"],
                          uid=st.st_uid, gid=st.st_gid, mode=FILE_MODE)
        if entry is None:
            for p, e, t, _ in taken:
                p.give_back(e, t)
            log.info("pool: no clean file for %s any more; populating instead", target)
            return False
        taken.append((pool, entry, target, b["backend_id"]))
    write_state(uuid, {
        "name": recipe.get("name"), "uuid": uuid, "id": recipe["id"],
        "shortname": recipe.get("shortname"), "files": [], "start_unix": time.time(),
        "pool_links": [{"backend_id": bid, "link_path": t, "pool_path": e.path,
                        "pool_dir": p.directory} for p, e, t, bid in taken]})
    log.info("started from the pool: %s", ", ".join(t for _, _, t, _ in taken))
    return True


def _operation(op: str) -> Callable[[bytes, HookConfig], None]:
    if op == "prepare":
        return op_prepare
    if op == "start":
        return op_start
    from . import hook_ops  # planning and populating: only when needed

    return {"stopped": hook_ops.op_stop, "release": hook_ops.op_stop}[op]


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
        _operation(op)(data, config)
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
