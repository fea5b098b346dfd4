"""What the libvirt hook's warm path and its full path share: the config snapshot and where
a log line goes.

Both paths import this module, and it imports neither (nor the logging module: a warm start
cannot afford it).  It imports only what ``json`` already loads.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .. import paths, safefs
from ..errors import UnsafePathError
from ..serve.state import read_json, write_json

if TYPE_CHECKING:
    from ..plan.config import HookConfig

SNAPSHOT_DIR = "hook-config"
SNAPSHOT_FIELDS = ("enabled", "strict", "pool_enabled", "run_dir", "record_file", "qemu_conf",
                   "syslog", "log_file", "log_file_set", "log_level")
SYSLOG_SOCKET = "/dev/log"
LOG_BODY = "%(domain)s %(op)s: %(levelname)s: %(message)s"
"""One log line after ``kvmaccel-hook[<pid>]: `` (:mod:`kvmaccel.libvirt.full` logs the same
way)."""


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


# --- logging without the logging module -----------------------------------------------------

def log_targets(syslog: bool, log_file_set: bool) -> tuple[bool, bool]:
    """(to syslog, to the log file): syslog when asked for and its socket exists; the file
    when syslog is not used, or when ``log_file`` was set explicitly."""
    to_syslog = syslog and os.path.exists(SYSLOG_SOCKET)
    return to_syslog, not to_syslog or log_file_set


def log_info(values: dict[str, Any], name: str, op: str, message: str) -> None:
    """One INFO line where :func:`kvmaccel.libvirt.full.setup_logging` would put it.  Never
    raises."""
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
