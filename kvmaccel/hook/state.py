"""What the hook's warm path and its full path share: the config snapshot, the per-domain
state files, and where a log line goes.

Both paths import this module, and it imports neither (nor the logging module: a warm start
cannot afford it).  It imports only what ``json`` already loads.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .. import paths, safefs
from ..errors import BackingError, UnsafePathError, UsageError

if TYPE_CHECKING:
    from ..plan.config import HookConfig

SNAPSHOT_DIR = "hook-config"
SNAPSHOT_FIELDS = ("enabled", "strict", "pool_enabled", "run_dir", "record_file", "qemu_conf",
                   "syslog", "log_file", "log_file_set", "log_level")
SYSLOG_SOCKET = "/dev/log"
LOG_BODY = "%(domain)s %(op)s: %(levelname)s: %(message)s"
"""One log line after ``kvmaccel-hook[<pid>]: `` (:mod:`kvmaccel.hook.full` logs the same way)."""


def log_prefix() -> str:
    return f"kvmaccel-hook[{os.getpid()}]: "


# --- the config, as the full hook last read it ----------------------------------------------

def file_text(path: str) -> str | None:
    """The file's text (None for a missing file): what a cached plan or config is checked
    against, so that rewriting a file with the same content keeps them."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def save_config_snapshot(config: HookConfig, path: str) -> None:
    """Record ``config`` (read from ``path``) for the warm path; written only when it
    changed."""
    record = {"path": path, "text": config.source,
              "values": {f: getattr(config, f) for f in SNAPSHOT_FIELDS}}
    target = snapshot_path(path)
    if read_json(target) != record:
        write_json(target, record)


def snapshot_path(config_path: str, run_dir: str | None = None) -> str:
    """One snapshot per config file (a host may run hooks with different configs), in
    ``run_dir`` (default: :func:`kvmaccel.paths.run_dir`; libvirt runs hooks with a clean
    environment, so that is /run/kvmaccel there)."""
    name = os.path.abspath(config_path).strip("/").replace("/", "%")
    return os.path.join(run_dir or paths.run_dir(), SNAPSHOT_DIR, f"{name}.json")


def read_config_snapshot(path: str) -> dict[str, Any] | None:
    """The snapshot's values if it is of ``path`` as the file is now, else None.  The
    file's text comes with them as ``config_text``."""
    record = read_json(snapshot_path(path))
    if (not isinstance(record, dict) or record.get("path") != path
            or record.get("text") != file_text(path)):
        return None
    values = record.get("values")
    if not isinstance(values, dict) or set(values) != set(SNAPSHOT_FIELDS):
        return None
    return {**values, "config_text": record["text"]}


def _top(path: str) -> str | None:
    """Where the checked chain of ``path`` starts: the run dir, when it is under it."""
    top = os.path.abspath(paths.run_dir())
    return top if os.path.abspath(path).startswith(top.rstrip("/") + "/") else None


def read_json(path: str) -> Any:
    """The JSON kvmaccel left at ``path`` in its run dir; None when it is missing or not
    JSON.  Root acts on what it reads there (files to remove, processes to stop), so the
    file and every directory from the run dir down must be kvmaccel's own
    (:func:`kvmaccel.safefs.read_own_json`): raises :class:`UnsafePathError` otherwise."""
    try:
        return safefs.read_own_json(path, top=_top(path))
    except UnsafePathError:
        raise
    except (OSError, ValueError):
        return None


def write_json(path: str, data: object) -> None:
    """Write what :func:`read_json` reads (atomically, by the checked directory's
    descriptor).  Raises :class:`OSError`, :class:`UnsafePathError`."""
    safefs.write_json_atomic(path, data, top=_top(path))


# --- logging without the logging module -----------------------------------------------------

def log_targets(syslog: bool, log_file_set: bool) -> tuple[bool, bool]:
    """(to syslog, to the log file): syslog when asked for and its socket exists; the file
    when syslog is not used, or when ``log_file`` was set explicitly."""
    to_syslog = syslog and os.path.exists(SYSLOG_SOCKET)
    return to_syslog, not to_syslog or log_file_set


def log_info(values: dict[str, Any], name: str, op: str, message: str) -> None:
    """One INFO line where :func:`kvmaccel.hook.full.setup_logging` would put it.  Never raises."""
    if values["log_level"] not in ("debug", "info"):
        return
    body = LOG_BODY % {"domain": name, "op": op, "levelname": "INFO", "message": message}
    to_syslog, to_file = log_targets(values["syslog"], values["log_file_set"])
    if to_syslog:
        import syslog

        syslog.openlog("kvmaccel-hook", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_INFO, body)
    if to_file:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp},{int(now * 1000) % 1000:03d} {log_prefix()}{body}\n"
        try:  # opened as the record file is: never through a symlink, never another's file
            fd = safefs.open_append(values["log_file"])
            try:
                os.write(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except (OSError, UnsafePathError):
            pass


# --- per-domain state ----------------------------------------------------------------------

def state_path(key: str) -> str:
    """``<run_dir>/domains/<uuid>.json`` (the run dir comes from ``$KVMACCEL_RUN_DIR``)."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a state file")
    return os.path.join(paths.run_dir(), "domains", f"{key}.json")


def write_state(key: str, state: dict[str, object]) -> None:
    write_json(state_path(key), state)


def read_state(key: str) -> dict[str, object] | None:
    """The guest's state as ``start`` left it; None when there is none.  The stop acts on it
    as root (the filler's pid, the files to remove), so it is read only from kvmaccel's own
    file in kvmaccel's own directories: raises :class:`UnsafePathError` for anything else,
    :class:`BackingError` for a file that cannot be read."""
    path = state_path(key)
    try:
        data = safefs.read_own_json(path, top=paths.run_dir())
    except UnsafePathError:
        raise
    except (OSError, ValueError) as e:
        raise BackingError(f"cannot read kvmaccel's state {path}: {e}") from None
    return data if isinstance(data, dict) else None


def recipe_path(domain_uuid: str) -> str:
    """What ``prepare`` left for a fast start from the pool."""
    return state_path(f"{domain_uuid}.prepared")


def cache_path(domain_uuid: str) -> str:
    """The pool-related part of the guest's last plan, for a fast ``prepare``."""
    return state_path(f"{domain_uuid}.plan-cache")
