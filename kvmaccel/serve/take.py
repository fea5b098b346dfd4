"""Taking what the pool serves, in as little Python as it takes: the warm start's core.

When a clean pool file waits for every backend of a guest, the start only links those files
where QEMU will look for them and writes the guest's state.  ``prepare`` leaves the *recipe*
(``<run_dir>/domains/<uuid>.prepared.json``: the backends, their pool keys, files and pools)
when it finds such files (:func:`write_recipe_if_clean`); the start follows it
(:func:`start_from_recipe`).  Anything unexpected gives back what was linked and returns
False: the caller's full start runs and decides.

The warm path imports this module: only what ``json`` already loads (no logging, tomllib,
dataclasses or hashlib, which cost about 60 ms a call).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..engine import records
from ..errors import KvmaccelError
from ..pool.files import PoolEntry, PoolFiles, PoolKey
from . import memdir
from .state import read_json, recipe_path, write_json, write_state

FILE_MODE = 0o600
RECIPE_MAX_AGE_S = 600
"""A ``prepare`` older than this is not trusted by the start (the pool may have changed)."""


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


def start_from_recipe(uuid: str, domain_id: int | None, say: Callable[[str], None]) -> bool:
    """Link the clean pool files ``prepare`` found at the paths QEMU is handed; True when
    every backend is served.  Anything unexpected (no recipe, another domain id, a file
    taken meanwhile, an error) gives back what was linked and returns False: the full path
    runs."""
    t0 = time.monotonic()
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
