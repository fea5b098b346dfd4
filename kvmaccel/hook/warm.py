"""The hook's entry point, and a warm start in as little Python as it takes.

libvirt runs the hook at each step of a guest's life; ``prepare begin`` and ``start begin``
come before QEMU, so the guest waits for both.  On a warm start (the same XML as last time and
a clean pool file for every backend) all they do is check the cached plan, link files and write
two small state files.  This module does that with only what ``json`` loads anyway: no logging,
tomllib, dataclasses or hashlib, which cost about 60 ms a call, and the installed script starts
Python without ``site`` (``-S``; it puts kvmaccel's and its dependencies' directories on
``sys.path`` itself).  Every other case goes to :func:`kvmaccel.hook.full.main`, which
reads the config, logs, plans and populates.

What a warm start reads, all written by the full hook:

* ``<$KVMACCEL_RUN_DIR, else /run/kvmaccel>/hook-config/<config path>.json``: the config as
  the full hook last parsed it, with the file's text then.  A config file whose text changed
  since is not trusted: the full hook reads it again.
* ``<run_dir>/domains/<uuid>.plan-cache.json``: what a start needs of the guest's last plan
  (files, sizes, nodes, pool keys, limits) and what it was made from: the XML without its
  ``id``, and the texts of qemu.conf and the config file;
* ``<run_dir>/domains/<uuid>.prepared.json``: the recipe ``prepare`` leaves for ``start``.

Anything missing, changed or unexpected falls through to the full hook, which decides and logs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import paths
from ..errors import BackingError, UsageError
from ..pool.files import PoolEntry, PoolFiles, PoolKey
from ..statefile import write_json_atomic

if TYPE_CHECKING:
    from ..plan.config import HookConfig

FILE_MODE = 0o600
RECIPE_MAX_AGE_S = 600
"""A ``prepare`` older than this is not trusted by ``start`` (the pool may have changed)."""
SNAPSHOT_DIR = "hook-config"
SNAPSHOT_FIELDS = ("enabled", "strict", "pool_enabled", "run_dir", "qemu_conf", "syslog",
                   "log_file", "log_file_set", "log_level")
SYSLOG_SOCKET = "/dev/log"
LOG_BODY = "%(domain)s %(op)s: %(levelname)s: %(message)s"
"""One log line after ``kvmaccel-hook[<pid>]: `` (:mod:`kvmaccel.hook.full` logs the same way)."""


def log_prefix() -> str:
    return f"kvmaccel-hook[{os.getpid()}]: "


# --- entry point ----------------------------------------------------------------------------

def main(argv: Sequence[str], stdin: BinaryIO | None = None,
         config_path: str | None = None) -> int:
    """The hook (``argv`` without the program name).  A warm ``prepare``/``start`` is done
    here; everything else, and anything unexpected, by :func:`kvmaccel.hook.full.main`."""
    if len(argv) == 4 and argv[2] == "begin" and argv[1] in ("prepare", "start"):
        data = (stdin or sys.stdin.buffer).read()
        try:
            if _warm(argv[0], argv[1], data, config_path):
                return 0
        except Exception:  # noqa: BLE001 -- the full hook decides, logs, and honours strict
            pass
        stdin = io.BytesIO(data)
    from .full import main as full_main

    return full_main(argv, stdin, config_path)


def _warm(name: str, op: str, xml: bytes, config_path: str | None) -> bool:
    """True when the warm path did the whole operation (or kvmaccel is disabled)."""
    values = read_config_snapshot(paths.config_path(config_path))
    if values is None:
        return False
    if not values["enabled"]:
        return True
    if op == "start" and not values["pool_enabled"]:
        return False
    os.environ["KVMACCEL_RUN_DIR"] = values["run_dir"]

    def say(message: str) -> None:
        log_info(values, name, op, message)

    if op == "prepare":
        return prepare_from_cache(xml, values, say)
    return start_from_pool(xml, say)


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
    if _read_json(target) != record:
        write_json_atomic(target, record)


def snapshot_path(config_path: str, run_dir: str | None = None) -> str:
    """One snapshot per config file (a host may run hooks with different configs), in
    ``run_dir`` (default: :func:`kvmaccel.paths.run_dir`; libvirt runs hooks with a clean
    environment, so that is /run/kvmaccel there)."""
    name = os.path.abspath(config_path).strip("/").replace("/", "%")
    return os.path.join(run_dir or paths.run_dir(), SNAPSHOT_DIR, f"{name}.json")


def read_config_snapshot(path: str) -> dict[str, Any] | None:
    """The snapshot's values if it is of ``path`` as the file is now, else None.  The
    file's text comes with them as ``config_text``."""
    record = _read_json(snapshot_path(path))
    if (not isinstance(record, dict) or record.get("path") != path
            or record.get("text") != file_text(path)):
        return None
    values = record.get("values")
    if not isinstance(values, dict) or set(values) != set(SNAPSHOT_FIELDS):
        return None
    return {**values, "config_text": record["text"]}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
        try:
            os.makedirs(os.path.dirname(values["log_file"]), mode=0o755, exist_ok=True)
            with open(values["log_file"], "a", encoding="utf-8") as f:
                f.write(f"{stamp},{int(now * 1000) % 1000:03d} {log_prefix()}{body}\n")
        except OSError:
            pass


# --- per-domain state ----------------------------------------------------------------------

def state_path(key: str) -> str:
    """``<run_dir>/domains/<uuid>.json`` (the run dir comes from ``$KVMACCEL_RUN_DIR``)."""
    if not key or "/" in key or key.startswith("."):
        raise UsageError(f"domain key {key!r} cannot name a state file")
    return os.path.join(paths.run_dir(), "domains", f"{key}.json")


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


def recipe_path(domain_uuid: str) -> str:
    """What ``prepare`` left for a fast start from the pool."""
    return state_path(f"{domain_uuid}.prepared")


def cache_path(domain_uuid: str) -> str:
    """The pool-related part of the guest's last plan, for a fast ``prepare``."""
    return state_path(f"{domain_uuid}.plan-cache")


# --- a warm prepare: the plan as before, a clean pool file for every backend ----------------

_DOMAIN_ID = re.compile(rb"(<domain\b[^>]*?)\s+id=(['\"])(-?\d+)\2")
_UUID = re.compile(rb"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def domain_ids(xml: bytes) -> tuple[str | None, int | None]:
    """The domain's uuid and id, read without parsing the whole XML."""
    m_uuid, m_id = _UUID.search(xml), _DOMAIN_ID.search(xml)
    return (m_uuid.group(1).decode().lower() if m_uuid else None,
            int(m_id.group(3)) if m_id else None)


def plan_inputs(xml: bytes, qemu_conf: str, config_text: str | None) -> dict[str, Any]:
    """What a plan is a function of, as far as a start goes: the domain XML without its id
    (which changes at every start), and qemu.conf and kvmaccel's config as they are on disk
    now.  Compared whole, so no hashing."""
    return {"xml": _DOMAIN_ID.sub(rb"\1", xml, count=1).decode("utf-8", "replace"),
            "qemu_conf": [qemu_conf, file_text(qemu_conf)], "config": config_text}


def write_recipe_if_clean(domain_uuid: str, domain_id: int, name: str, shortname: str,
                          backends: list[dict[str, Any]]) -> bool:
    """Write the start recipe when a clean pool file waits for every backend."""
    wanted: dict[tuple[str, str, PoolKey], int] = {}
    for b in backends:
        if not b["pool_dir"]:
            return False
        slot = (b["pool_dir"], b["state_dir"], PoolKey.from_dict(b["key"]))
        wanted[slot] = wanted.get(slot, 0) + 1
    for (pool_dir, state_dir, key), count in wanted.items():
        if len(PoolFiles(pool_dir, state_dir=state_dir).clean_for(key, domain_uuid)) < count:
            return False
    write_json_atomic(recipe_path(domain_uuid), {
        "uuid": domain_uuid, "id": domain_id, "name": name, "shortname": shortname,
        "written_unix": time.time(), "backends": backends})
    return True


def cached_plan(xml: bytes, qemu_conf: str, config_text: str | None
                ) -> tuple[str, int, str, dict[str, Any], list[dict[str, Any]]] | None:
    """(uuid, id, shortname, cache, backends with this start's paths) when the guest's
    cached plan still holds for ``xml``, else None."""
    uuid, domain_id = domain_ids(xml)
    if uuid is None or domain_id is None:
        return None
    cache = _read_json(cache_path(uuid))
    try:
        if cache["inputs"] != plan_inputs(xml, qemu_conf, config_text):
            return None
        shortname = f"{domain_id}-{cache['shortname_tail']}"
        backends = [{**b, "mem_path": f"/{shortname}/".join(b["path_around_shortname"])}
                    for b in cache["backends"]]
    except (KeyError, TypeError):
        return None
    return uuid, domain_id, shortname, cache, backends


def prepare_from_cache(xml: bytes, values: dict[str, Any], say: Callable[[str], None]) -> bool:
    """True when the cached plan still holds: the guest is planned as before.  When the pool
    serves every backend, the recipe for ``start`` is written; otherwise ``start``
    populates from the cached plan, and checks the host's room then (a failing check
    refuses the start there, under ``strict``, as it would have here)."""
    found = cached_plan(xml, values["qemu_conf"], values["config_text"])
    if found is None:
        return False
    uuid, domain_id, shortname, cache, backends = found
    files = ", ".join(b["mem_path"] for b in backends)
    with_pool = values["pool_enabled"]
    if with_pool and write_recipe_if_clean(uuid, domain_id, cache["name"], shortname, backends):
        say(f"plan: as before; the pool serves {files}")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(recipe_path(uuid))  # one a start that never came left behind
        say(f"plan: as before; start populates {files}")
    return True


# --- a warm start: link what prepare found ----------------------------------------------------

def start_from_pool(xml: bytes, say: Callable[[str], None]) -> bool:
    """Link the clean pool files ``prepare`` found at the paths libvirt hands QEMU; True when
    every backend is served.  Anything unexpected (no recipe, another domain id, a file
    taken meanwhile, an error) gives back what was linked and returns False: the full path
    runs."""
    uuid, domain_id = domain_ids(xml)
    if uuid is None:
        return False
    recipe = _read_json(recipe_path(uuid))
    try:
        os.unlink(recipe_path(uuid))
        fresh = (recipe["id"] == domain_id
                 and time.time() - float(recipe["written_unix"]) < RECIPE_MAX_AGE_S)
        backends = list(recipe["backends"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not fresh or not backends:
        return False
    taken: list[tuple[PoolFiles, PoolEntry, str, str]] = []
    try:
        for b in backends:
            pool = PoolFiles(b["pool_dir"], state_dir=b["state_dir"])
            target = b["mem_path"]
            st = os.stat(os.path.dirname(target))
            entry = pool.take(PoolKey.from_dict(b["key"]), target, domain_uuid=uuid,
                              backend_id=b["backend_id"], uid=st.st_uid, gid=st.st_gid,
                              mode=FILE_MODE)
            if entry is None:
                say(f"pool: no clean file for {target} any more; populating instead")
                raise LookupError(target)
            taken.append((pool, entry, target, b["backend_id"]))
        write_state(uuid, {
            "name": recipe.get("name"), "uuid": uuid, "id": recipe["id"],
            "shortname": recipe.get("shortname"), "files": [], "start_unix": time.time(),
            "pool_links": [{"backend_id": bid, "link_path": t, "pool_path": e.path,
                            "pool_dir": p.directory} for p, e, t, bid in taken]})
    except Exception:  # noqa: BLE001 -- give back and let the full path decide
        for p, e, t, _ in taken:
            p.give_back(e, t)
        return False
    say("started from the pool: " + ", ".join(t for _, _, t, _ in taken))
    return True
