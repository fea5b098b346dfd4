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

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence

from ..engine import records
from ..errors import KvmaccelError
from ..pool.files import PoolEntry, PoolFiles, PoolKey
from .state import (
    GuestState,
    PoolLink,
    Recipe,
    RecipeBackend,
    read_recipe,
    recipe_path,
    write_recipe,
    write_state,
)

FILE_MODE = 0o600
RECIPE_MAX_AGE_S = 600
"""A ``prepare`` older than this is not trusted by the start (the pool may have changed)."""


def write_recipe_if_clean(domain_uuid: str, domain_id: int, name: str, shortname: str,
                          backends: Sequence[RecipeBackend | None]) -> bool:
    """Write the start recipe when a clean pool file waits for every backend (None: a
    backend on a filesystem with no pool)."""
    wanted: dict[tuple[str, str | None, PoolKey], int] = {}
    for b in backends:
        if b is None:
            return False
        slot = (b.pool_dir, b.state_dir, b.key)
        wanted[slot] = wanted.get(slot, 0) + 1
    for (pool_dir, state_dir, key), count in wanted.items():
        if len(PoolFiles(pool_dir, state_dir=state_dir).clean_for(key, domain_uuid)) < count:
            return False
    write_recipe(Recipe(domain_uuid, domain_id, name, shortname, time.time(),
                        tuple(b for b in backends if b is not None)))
    return True


def hurry_own_scrub(uuid: str, pools: Iterable[tuple[str, str | None]],
                    say: Callable[[str], None]) -> None:
    """A guest started again right after it stopped: its own last file is being scrubbed at
    nice 19, and ``start`` will wait for that.  Lend the scrub this hook's priority from
    now on, not only once ``start`` waits (the pool's manager is imported only then).
    ``pools``: (pool directory, state directory) of the guest's backends."""
    for pool_dir, state_dir in pools:
        if not any(e.domain_uuid == uuid and e.state == "scrubbing"
                   for e in PoolFiles(pool_dir, state_dir=state_dir).entries()):
            continue
        from ..pool.manage import Pool

        if Pool(pool_dir, state_dir=state_dir).hurry_scrub_of(uuid):
            say(f"the scrub of this guest's last file in {pool_dir} runs at this priority now")


def start_from_recipe(uuid: str, domain_id: int | None, say: Callable[[str], None]
                      ) -> str | None:
    """Link the clean pool files ``prepare`` found at the paths QEMU is handed; None when
    every backend is served, else why not.  Anything unexpected (no recipe, another domain
    id, a file taken meanwhile, an error) gives back what was linked: the full path runs."""
    t0 = time.monotonic()
    recipe = read_recipe(uuid)
    if recipe is None:
        return "no recipe from prepare (no clean pool file for every backend then)"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(recipe_path(uuid))
    if recipe.domain_id != domain_id:
        return f"the recipe is of domain id {recipe.domain_id}, this start's is {domain_id}"
    if time.time() - recipe.written_unix >= RECIPE_MAX_AGE_S:
        return f"the recipe is older than {RECIPE_MAX_AGE_S} s"
    if not recipe.backends or any(b.make_dir for b in recipe.backends):
        return "a memfd guest's directory is made by the full start"
    from . import memdir  # a prepare never makes a directory

    proofs: dict[str, memdir.ProofDir] = {}
    taken: list[tuple[PoolFiles, PoolEntry, RecipeBackend]] = []
    try:
        for b in recipe.backends:
            pool = PoolFiles(b.pool_dir, state_dir=b.state_dir)
            guest = memdir.guest_dir_of(b.mem_path)
            uid = gid = None  # owned like its directory
            if guest is not None:  # the front's file: in this start's proof directory, owned
                if guest not in proofs:  # like the guest's directory
                    proofs[guest] = memdir.make_proof_dir(guest)
                uid, gid = proofs[guest].uid, proofs[guest].gid
            entry = pool.take(b.key, b.mem_path, domain_uuid=uuid, backend_id=b.backend_id,
                              uid=uid, gid=gid, mode=FILE_MODE)
            if entry is None:
                say(f"pool: no clean file for {b.mem_path} any more; populating instead")
                raise LookupError(f"no clean pool file for {b.mem_path} any more")
            taken.append((pool, entry, b))
        write_state(uuid, GuestState(
            recipe.name, uuid, recipe.domain_id, recipe.shortname, time.time(),
            pool_links=tuple(PoolLink(b.backend_id, b.mem_path, e.path, p.directory)
                             for p, e, b in taken),
            proof_dirs=tuple(p.ref() for p in proofs.values())))
    except Exception as e:  # noqa: BLE001 -- give back and let the full path decide
        for p, entry_, b in taken:
            p.give_back(entry_, b.mem_path)
        if isinstance(e, KvmaccelError):
            say(f"warm start: {e}; the full start decides")
        return f"{type(e).__name__}: {e}"
    say("started from the pool: " + ", ".join(b.mem_path for _, _, b in taken))
    records.start(domain=recipe.name, uuid=uuid, source="pool",
                  bytes=sum(e.key.size_bytes for _, e, _ in taken),
                  seconds=round(time.monotonic() - t0, 4), helpers_per_node={},
                  page_size_kib=sorted({e.key.page_size_kib for _, e, _ in taken}))
    return None
