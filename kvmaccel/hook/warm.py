"""The hook's warm start: a ``prepare`` and ``start`` in as little Python as it takes.

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
import os
import re
import time
from collections.abc import Callable
from typing import Any

from ..engine import records
from ..errors import KvmaccelError
from ..pool.files import PoolEntry, PoolFiles, PoolKey
from . import memdir
from .state import cache_path, file_text, read_json, recipe_path, write_json, write_state

FILE_MODE = 0o600
RECIPE_MAX_AGE_S = 600
"""A ``prepare`` older than this is not trusted by ``start`` (the pool may have changed)."""


# --- a warm prepare: the plan as before, a clean pool file for every backend ----------------

_DOMAIN_ID = re.compile(rb"(<domain\b[^>]*?)\s+id=(['\"])(-?\d+)\2")
_UUID = re.compile(rb"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def domain_ids(xml: bytes) -> tuple[str | None, int | None]:
    """The domain's uuid and id, read without parsing the whole XML."""
    m_uuid, m_id = _UUID.search(xml), _DOMAIN_ID.search(xml)
    return (m_uuid.group(1).decode().lower() if m_uuid else None,
            int(m_id.group(3)) if m_id else None)


_EMULATOR = re.compile(rb"<emulator>\s*([^<]*?)\s*</emulator>")


def emulator_identity(xml: bytes) -> list[int] | None:
    """The ``<emulator>`` file as it is now (inode, ctime, size), or None: whether it is
    kvmaccel's front decides what the plan prepares, and ``front install --divert`` or
    ``uninstall`` change that file, not the XML."""
    found = _EMULATOR.search(xml)
    if found is None:
        return None
    try:
        st = os.stat(found.group(1).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    return [st.st_ino, st.st_ctime_ns, st.st_size]


def plan_inputs(xml: bytes, qemu_conf: str, config_text: str | None) -> dict[str, Any]:
    """What a plan is a function of, as far as a start goes: the domain XML without its id
    (which changes at every start), the emulator file it names, and qemu.conf and kvmaccel's
    config as they are on disk now.  Compared whole, so no hashing."""
    return {"xml": _DOMAIN_ID.sub(rb"\1", xml, count=1).decode("utf-8", "replace"),
            "emulator": emulator_identity(xml),
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
    write_json(recipe_path(domain_uuid), {
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
    cache = read_json(cache_path(uuid))
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
        if with_pool:
            hurry_own_scrub(uuid, backends, say)
    return True


def hurry_own_scrub(uuid: str, backends: list[dict[str, Any]],
                    say: Callable[[str], None]) -> None:
    """A guest started again right after it stopped: its own last file is being scrubbed at
    nice 19, and ``start`` will wait for that.  Lend the scrub this hook's priority from
    now on, not only once ``start`` waits (the pool's manager is imported only then)."""
    for pool_dir, state_dir in {(b["pool_dir"], b["state_dir"]) for b in backends
                                if b.get("pool_dir")}:
        if not any(e.domain_uuid == uuid and e.state == "scrubbing"
                   for e in PoolFiles(pool_dir, state_dir=state_dir).entries()):
            continue
        from ..pool.manage import Pool

        if Pool(pool_dir, state_dir=state_dir).hurry_scrub_of(uuid):
            say(f"the scrub of this guest's last file in {pool_dir} runs at this priority now")


# --- a warm start: link what prepare found ----------------------------------------------------

def start_from_pool(xml: bytes, say: Callable[[str], None]) -> bool:
    """Link the clean pool files ``prepare`` found at the paths libvirt hands QEMU; True when
    every backend is served.  Anything unexpected (no recipe, another domain id, a file
    taken meanwhile, an error) gives back what was linked and returns False: the full path
    runs."""
    t0 = time.monotonic()
    uuid, domain_id = domain_ids(xml)
    if uuid is None:
        return False
    recipe = read_json(recipe_path(uuid))
    try:
        os.unlink(recipe_path(uuid))
        fresh = (recipe["id"] == domain_id
                 and time.time() - float(recipe["written_unix"]) < RECIPE_MAX_AGE_S)
        backends = list(recipe["backends"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not fresh or not backends or any(b.get("make_dir") for b in backends):
        return False  # a memfd guest's directory is made by the full path
    proofs: dict[str, memdir.ProofDir] = {}
    taken: list[tuple[PoolFiles, PoolEntry, str, str]] = []
    try:
        for b in backends:
            pool = PoolFiles(b["pool_dir"], state_dir=b["state_dir"])
            target = b["mem_path"]
            guest = memdir.guest_dir_of(target)
            uid = gid = None  # owned like its directory
            if guest is not None:  # the front's file: in this start's proof directory, owned
                if guest not in proofs:  # like the guest's directory
                    proofs[guest] = memdir.make_proof_dir(guest)
                uid, gid = proofs[guest].uid, proofs[guest].gid
            entry = pool.take(PoolKey.from_dict(b["key"]), target, domain_uuid=uuid,
                              backend_id=b["backend_id"], uid=uid, gid=gid, mode=FILE_MODE)
            if entry is None:
                say(f"pool: no clean file for {target} any more; populating instead")
                raise LookupError(target)
            taken.append((pool, entry, target, b["backend_id"]))
        write_state(uuid, {
            "name": recipe.get("name"), "uuid": uuid, "id": recipe["id"],
            "shortname": recipe.get("shortname"), "files": [], "start_unix": time.time(),
            "pool_links": [{"backend_id": bid, "link_path": t, "pool_path": e.path,
                            "pool_dir": p.directory} for p, e, t, bid in taken],
            "proof_dirs": [p.as_dict() for p in proofs.values()]})
    except Exception as e:  # noqa: BLE001 -- give back and let the full path decide
        for p, entry_, t, _ in taken:
            p.give_back(entry_, t)
        if isinstance(e, KvmaccelError):
            say(f"warm start: {e}; the full start decides")
        return False
    say("started from the pool: " + ", ".join(t for _, _, t, _ in taken))
    records.append("start", domain=recipe.get("name"), uuid=uuid, source="pool",
                   bytes=sum(e.key.size_bytes for _, e, _, _ in taken),
                   seconds=round(time.monotonic() - t0, 4), helpers_per_node={},
                   page_size_kib=sorted({e.key.page_size_kib for _, e, _, _ in taken}))
    return True
