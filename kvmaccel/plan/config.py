"""The hook's configuration file, ``/etc/kvmaccel/kvmaccel.toml`` (TOML, read with tomllib).

The file is optional: without it every key has the default below.  Every key, its unit and
its default::

    # Fail open (false, the default): any kvmaccel error is logged and the guest starts as
    # libvirt would have started it without kvmaccel.  true: the hook exits non-zero with a
    # one-line reason, libvirt shows that line to the user, and the guest does not start.
    strict = false

    # false: the hook does nothing at all (every operation exits 0 at once).
    enabled = true

    # Seconds a start may spend populating (0: no limit; at most 86400).  When the budget
    # runs out the engine is cancelled, the partly populated file is removed and the guest
    # starts as libvirt would have started it (QEMU allocates its memory itself).  Running
    # out of time is logged as a warning; it never refuses a start, even with strict = true.
    populate_timeout_s = 0

    # A fresh file (no pool file serves the backend) for a backend QEMU preallocates itself
    # (huge pages, <allocation mode='immediate'/>) is created at once and populated by a
    # detached filler while QEMU starts and preallocates it too; QEMU's preallocation still
    # completes before the guest runs.  false: populate it before QEMU starts.
    overlap = true

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

    # The cpu cgroup the hook's populates and the pool's fills, scrubs and keeper run in
    # (made if missing, with the lowest CPU share; "" runs them where they were started).
    cgroup = ""

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
    keep_free_mib = -1                  # what `pool keep` never fills into, per node and page
                                        # size, MiB; -1: a tenth of the node's pages of it
    keep_domains = true                 # `pool keep` keeps a file for every backend of every
                                        # persistent libvirt domain kvmaccel serves

    [[pool.keep]]                       # more targets for `pool keep`, as many as needed
    size = "8G"                         # file size
    page_size = "2M"                    # a hugetlbfs mount with it; absent: base pages
    dir = "/dev/hugepages"              # the filesystem (default: the first mount that fits)
    nodes = "0"                         # host nodes (default: none), policy "bind" etc.
    count = 1

Unknown keys and values of the wrong type raise :class:`~kvmaccel.errors.ConfigError` naming
the file and key, so that a typo never silently does nothing.  ``<allocation threads='N'/>``
in the domain XML still caps ``threads`` (the smaller one wins).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UsageError
from ..model.textfile import read_regular
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
MAX_CONFIG_BYTES = 1 << 20


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
    pool_keep_free_bytes: int | None = None  # None: a tenth of each node's pages
    pool_keep_domains: bool = True
    pool_keep: tuple[KeepTarget, ...] = ()
    cgroup: str = ""
    overlap: bool = True


@dataclass(frozen=True)
class KeepTarget:
    """One ``[[pool.keep]]`` entry: ``count`` clean files of this shape.  ``page_size_kib``
    None means base pages (tmpfs); ``directory`` None, the first mount that fits."""

    size_bytes: int
    page_size_kib: int | None = None
    directory: str | None = None
    nodes: tuple[int, ...] = ()
    policy: str = "bind"
    count: int = 1


_TOP: dict[str, type | tuple[type, ...]] = {
    "strict": bool, "enabled": bool, "populate_timeout_s": (int, float), "syslog": bool,
    "overlap": bool,
    "log_file": str, "log_level": str, "run_dir": str, "record_file": str, "qemu_conf": str,
    "limits": dict,
    "pool": dict, "energy": str, "energy_threads": int, "energy_signals": list,
    "cgroup": str,
}
_POOL: dict[str, type] = {"enabled": bool, "max_mib": int, "max_node_mib": int,
                          "keep_free_mib": int, "keep_domains": bool, "keep": list}
_KEEP: dict[str, type | tuple[type, ...]] = {
    "size": str, "page_size": str, "dir": str, "nodes": str, "policy": str, "count": int}
POLICIES = ("bind", "preferred", "interleave")
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
    keep_free = pool.get("keep_free_mib", -1)
    if keep_free < -1:
        raise ConfigError(f"{path}: pool.keep_free_mib must be -1 (a tenth) or 0 or more MiB")
    keep = tuple(_keep_target(entry, i, path) for i, entry in enumerate(pool.get("keep", [])))
    timeout = _seconds(data.get("populate_timeout_s", 0), "populate_timeout_s", path)
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
        pool_keep_free_bytes=None if keep_free == -1 else keep_free * MIB,
        pool_keep_domains=pool.get("keep_domains", True), pool_keep=keep,
        cgroup=_cgroup(data.get("cgroup", ""), path), overlap=data.get("overlap", True),
    )


_CGROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")


def check_cgroup_name(name: str) -> str:
    """A cgroup path below the hierarchy's root; :class:`ConfigError` otherwise."""
    if not _CGROUP_NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise ConfigError(f"cgroup {name[:40]!r} must be a relative path of letters, digits, "
                          "'.', '_' and '-' below the cgroup root, such as kvmaccel")
    return name


def _cgroup(name: str, path: str) -> str:
    if not name:
        return ""
    try:
        return check_cgroup_name(name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _keep_target(entry: object, index: int, path: str) -> KeepTarget:
    from ..model.units import parse_node_list, parse_page_size, parse_size

    where = f"pool.keep[{index}]."
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: pool.keep[{index}] must be a table ([[pool.keep]])")
    _check(entry, _KEEP, where, path)
    if "size" not in entry:
        raise ConfigError(f"{path}: {where}size is missing (e.g. size = \"8G\")")
    if entry.get("policy", "bind") not in POLICIES:
        raise ConfigError(f"{path}: {where}policy must be one of {', '.join(POLICIES)}")
    if not 1 <= entry.get("count", 1) <= 1000:
        raise ConfigError(f"{path}: {where}count must be from 1 to 1000")
    if "dir" in entry and not os.path.isabs(entry["dir"]):
        raise ConfigError(f"{path}: {where}dir must be an absolute path")
    try:
        page = entry.get("page_size")
        return KeepTarget(
            size_bytes=parse_size(entry["size"]),
            page_size_kib=parse_page_size(page) if page is not None else None,
            directory=entry.get("dir"),
            nodes=parse_node_list(entry["nodes"], "nodes") if "nodes" in entry else (),
            policy=entry.get("policy", "bind"), count=entry.get("count", 1))
    except UsageError as e:
        raise ConfigError(f"{path}: {where[:-1]}: {e}") from None


MAX_TIMEOUT_S = 86400.0
"""The largest ``populate_timeout_s``: a day (a populate runs at GiB/s; and Python's timer
threads refuse waits beyond ``threading.TIMEOUT_MAX``, so inf killed the hook's timer)."""


def _seconds(value: float, key: str, path: str) -> float:
    """A number of seconds from 0 (no limit) to :data:`MAX_TIMEOUT_S`; TOML's ``nan`` and
    ``inf`` are floats too, and neither is a limit."""
    seconds = float(value)
    if not 0 <= seconds <= MAX_TIMEOUT_S:  # False for nan as well
        raise ConfigError(f"{path}: {key} must be 0 (no limit) or a number of seconds up to "
                          f"{MAX_TIMEOUT_S:.0f}, not {value!r}")
    return seconds


def _cap(value: int) -> int | None:
    return None if value == -1 else value


def read_config(path: str | None = None, *, required: bool = False) -> HookConfig:
    """Read ``path`` (default: this process's config file, :func:`kvmaccel.paths.config_path`:
    ``$KVMACCEL_CONFIG``, else :data:`DEFAULT_PATH`).

    A missing file gives the defaults, unless ``required`` (a file the user named: a typo
    must not silently mean the defaults).  Raises :class:`ConfigError` for a missing required
    file, an empty name, an unreadable file, one that is not a regular file (a FIFO or
    ``/dev/zero`` would hang the read) and a malformed one.
    """
    if required and not path:
        raise ConfigError("the config file name is empty; give the path of a kvmaccel.toml")
    path = config_path(path)
    try:
        raw = read_regular(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist; give an existing "
                              "kvmaccel.toml, or leave the option out for the defaults"
                              ) from None
        log.debug("no %s: using the defaults", path)
        return HookConfig()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return dataclasses.replace(parse_config(text, path), source=text)
