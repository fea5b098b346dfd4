"""Where kvmaccel's own files live by default.

Kept apart (and free of imports) because the hook's warm-start path reads them before it
knows whether it needs the rest of kvmaccel.
"""

from __future__ import annotations

import os

DEFAULT_CONFIG_PATH = "/etc/kvmaccel/kvmaccel.toml"
DEFAULT_LOG_FILE = "/var/log/kvmaccel/hook.log"
DEFAULT_RUN_DIR = "/run/kvmaccel"
DEFAULT_RECORD_FILE = "/var/log/kvmaccel/records.jsonl"


def run_dir() -> str:
    """kvmaccel's runtime directory (``KVMACCEL_RUN_DIR`` overrides ``/run/kvmaccel``)."""
    return os.environ.get("KVMACCEL_RUN_DIR", DEFAULT_RUN_DIR)


def config_path(path: str | None = None) -> str:
    """The config file: ``path``, else ``$KVMACCEL_CONFIG``, else the default."""
    return path or os.environ.get("KVMACCEL_CONFIG") or DEFAULT_CONFIG_PATH
