"""The hook's configuration file, ``/etc/kvmaccel/kvmaccel.toml`` (TOML, read with tomllib).

The file is optional: without it every key has the default below.  Every key, its unit and
its default::

    # Fail open (false, the default): any kvmaccel error is logged and the guest starts as
    # libvirt would have started it without kvmaccel.  true: the hook exits non-zero with a
    # one-line reason, libvirt shows that line to the user, and the guest does not start.
    strict = false

    # false: the hook does nothing at all (every operation exits 0 at once).
    enabled = true

    # Seconds a start may spend populating (0: no limit).  When the budget runs out the
    # engine is cancelled, the partly populated file is removed and the guest starts as
    # libvirt would have started it (QEMU allocates its memory itself).  Running out of
    # time is logged as a warning; it never refuses a start, even with strict = true.
    populate_timeout_s = 0

    # Log file used when there is no syslog socket (/dev/log).  When log_file is set
    # explicitly and syslog = false, only the file is used.
    syslog = true
    log_file = "/var/log/kvmaccel/hook.log"
    log_level = "info"                  # debug, info, warning or error

    # Where kvmaccel keeps its records (files it created, per-domain state by uuid,
    # helper slots).  Must be the same for the hook and for `kvmaccel release`.
    run_dir = "/run/kvmaccel"

    # One JSON line per start, stop, scrub and fill, rotated by size (kvmaccel.engine.records;
    # `kvmaccel metrics` reads it).  $KVMACCEL_RECORD_FILE overrides it for the commands.
    record_file = "/var/log/kvmaccel/records.jsonl"

    # libvirt's qemu.conf, read for memory_backing_dir, hugetlbfs_mount, user and group.
    qemu_conf = "/etc/libvirt/qemu.conf"

    # Energy policy (docs/energy.md).  "auto": while one of energy_signals holds, at most
    # energy_threads threads; "performance": no limit, signals ignored; "powersave": always
    # at most energy_threads.  Signals: on_battery, powersave_epp (powersave governor with
    # EPP power or balance_power), powersave_governor (any EPP), energy_epp (any governor).
    energy = "auto"
    energy_threads = 1                  # threads in all, the caller included, when limited
    energy_signals = ["on_battery", "powersave_epp"]

    [limits]                            # the engine's knobs; see `kvmaccel populate --help`
    threads = 0                         # threads in all, the caller included (0: the caps)
    nice = 19                           # niceness of the helper threads, -20..19
    max_helpers_per_node = -1           # -1: 80% of the node's CPUs
    max_helpers = -1                    # host-wide, shared by all kvmaccel runs; -1: 80%
    min_chunk_mib = 128                 # smallest chunk of work, MiB

    [pool]                              # the warm pool (see `kvmaccel pool --help`)
    enabled = true                      # start guests from clean pool files; scrub after
    max_mib = 0                         # most a pool may hold per filesystem, MiB; 0: no cap
    max_node_mib = 0                    # most a pool may hold per NUMA node, MiB; 0: no cap

Unknown keys and values of the wrong type raise :class:`~kvmaccel.errors.ConfigError` naming
the file and key, so that a typo never silently does nothing.  ``<allocation threads='N'/>``
in the domain XML still caps ``threads`` (the smaller one wins).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UsageError
from ..paths import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_LOG_FILE,
    DEFAULT_RECORD_FILE,
    DEFAULT_RUN_DIR,
    config_path,
)
from .energy import DEFAULT_ENERGY_THREADS, DEFAULT_SIGNALS, EnergySettings
from .limits import DEFAULT_MIN_CHUNK_BYTES, DEFAULT_NICE, Limits

log = logging.getLogger(__name__)

DEFAULT_PATH = DEFAULT_CONFIG_PATH
LOG_LEVELS = ("debug", "info", "warning", "error")
MIB = 1 << 20


@dataclass(frozen=True)
class HookConfig:
    """The parsed file; defaults are the documented ones.  ``path`` is None for defaults."""

    strict: bool = False
    enabled: bool = True
    populate_timeout_s: float = 0.0
    syslog: bool = True
    log_file: str = DEFAULT_LOG_FILE
    log_file_set: bool = False
    log_level: str = "info"
    run_dir: str = DEFAULT_RUN_DIR
    record_file: str = DEFAULT_RECORD_FILE
    qemu_conf: str = "/etc/libvirt/qemu.conf"
    limits: Limits = field(default_factory=Limits)
    path: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)  # the file's text
    pool_enabled: bool = True
    pool_max_bytes: int | None = None
    pool_max_node_bytes: int | None = None
    energy: EnergySettings = field(default_factory=EnergySettings)


_TOP: dict[str, type | tuple[type, ...]] = {
    "strict": bool, "enabled": bool, "populate_timeout_s": (int, float), "syslog": bool,
    "log_file": str, "log_level": str, "run_dir": str, "record_file": str, "qemu_conf": str,
    "limits": dict,
    "pool": dict, "energy": str, "energy_threads": int, "energy_signals": list,
}
_POOL: dict[str, type] = {"enabled": bool, "max_mib": int, "max_node_mib": int}
_LIMITS: dict[str, type] = {
    "threads": int, "nice": int, "max_helpers_per_node": int, "max_helpers": int,
    "min_chunk_mib": int,
}


def _check(table: dict[str, Any], schema: dict[str, type | tuple[type, ...]], where: str,
           path: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{path}: unknown key {where}{key!r}; known keys: "
                              f"{', '.join(sorted(schema))}")
        want = schema[key]
        # bool is an int in Python: refuse `threads = true` and `strict = 1` alike.
        if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else "number"
            raise ConfigError(f"{path}: {where}{key} must be a {names}, not {value!r}")


def parse_config(text: str, path: str = "<string>") -> HookConfig:
    """Parse TOML ``text``.  Raises :class:`ConfigError` naming ``path`` and the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    _check(data, _TOP, "", path)
    lim = data.pop("limits", {})
    _check(lim, dict(_LIMITS), "limits.", path)
    pool = data.pop("pool", {})
    _check(pool, dict(_POOL), "pool.", path)
    for key in ("max_mib", "max_node_mib"):
        if pool.get(key, 0) < 0:
            raise ConfigError(f"{path}: pool.{key} must be 0 (no cap) or more MiB")
    timeout = float(data.get("populate_timeout_s", 0))
    if timeout < 0:
        raise ConfigError(f"{path}: populate_timeout_s must be 0 (no limit) or more seconds")
    level = data.get("log_level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}, "
                          f"not {level!r}")
    for key in ("run_dir", "record_file", "qemu_conf", "log_file"):
        if key in data and not os.path.isabs(data[key]):
            raise ConfigError(f"{path}: {key} must be an absolute path, not {data[key]!r}")
    try:
        limits = Limits(
            threads=lim.get("threads") or None,
            nice=lim.get("nice", DEFAULT_NICE),
            max_helpers_per_node=_cap(lim.get("max_helpers_per_node", -1)),
            max_helpers_host=_cap(lim.get("max_helpers", -1)),
            min_chunk_bytes=lim.get("min_chunk_mib", DEFAULT_MIN_CHUNK_BYTES // MIB) * MIB,
        )
    except UsageError as e:
        raise ConfigError(f"{path}: [limits]: {e}") from None
    signals = data.get("energy_signals", list(DEFAULT_SIGNALS))
    if not all(isinstance(name, str) for name in signals):
        raise ConfigError(f"{path}: energy_signals must be a list of names, not {signals!r}")
    try:
        energy = EnergySettings(data.get("energy", "auto"),
                                data.get("energy_threads", DEFAULT_ENERGY_THREADS),
                                tuple(signals))
    except UsageError as e:
        raise ConfigError(f"{path}: {e}") from None
    return HookConfig(
        strict=data.get("strict", False), enabled=data.get("enabled", True),
        populate_timeout_s=timeout, syslog=data.get("syslog", True),
        log_file=data.get("log_file", DEFAULT_LOG_FILE), log_file_set="log_file" in data,
        log_level=level, run_dir=data.get("run_dir", DEFAULT_RUN_DIR),
        record_file=data.get("record_file", DEFAULT_RECORD_FILE),
        qemu_conf=data.get("qemu_conf", "/etc/libvirt/qemu.conf"), limits=limits, path=path,
        pool_enabled=pool.get("enabled", True),
        pool_max_bytes=pool.get("max_mib", 0) * MIB or None,
        pool_max_node_bytes=pool.get("max_node_mib", 0) * MIB or None,
        energy=energy,
    )


def _cap(value: int) -> int | None:
    return None if value == -1 else value


def read_config(path: str | None = None) -> HookConfig:
    """Read ``path`` (default ``$KVMACCEL_CONFIG``, else :data:`DEFAULT_PATH`).

    A missing file gives the defaults.  Raises :class:`ConfigError` for an unreadable or
    malformed file.
    """
    path = config_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        log.debug("no %s: using the defaults", path)
        return HookConfig()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return dataclasses.replace(parse_config(text, path), source=text)
