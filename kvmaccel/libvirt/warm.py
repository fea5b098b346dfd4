"""The hook's warm start: a ``prepare`` and ``start`` in as little Python as it takes.

libvirt runs the hook at each step of a guest's life; ``prepare begin`` and ``start begin``
come before QEMU, so the guest waits for both.  On a warm start (the same XML as last time and
a clean pool file for every backend) all they do is check the cached plan, link files and write
two small state files.  This module does that with only what ``json`` loads anyway: no logging,
tomllib, dataclasses or hashlib, which cost about 60 ms a call, and the installed script starts
Python without ``site`` (``-S``; it puts kvmaccel's and its dependencies' directories on
``sys.path`` itself).  Every other case goes to :func:`kvmaccel.libvirt.full.main`, which
reads the config, logs, plans and populates.

What a warm start reads, all written by the full hook:

* ``<run dir>/hook-config/<config path>.json`` (the run dir the installed script exports,
  else /run/kvmaccel): the config as the full hook last parsed it, with the file's text
  then.  A config file whose text changed since is not trusted: the full hook reads it again.
* ``<run_dir>/domains/<uuid>.plan-cache.json`` (:mod:`.cache`): what a start needs of the
  guest's last plan (files, sizes, nodes, pool keys, limits) and what it was made from: the
  XML without its ``id``, and the texts of qemu.conf and the config file;
* ``<run_dir>/domains/<uuid>.prepared.json``: the recipe ``prepare`` leaves for ``start``
  (:class:`kvmaccel.serve.state.Recipe`, taken by :mod:`kvmaccel.serve.take`).

Anything missing, changed or unexpected falls through to the full hook, which decides and logs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..serve.state import SchemaError, recipe_path
from ..serve.take import hurry_own_scrub, start_from_recipe, write_recipe_if_clean

if TYPE_CHECKING:  # a warm start reads no plan cache: imported where it is read
    from .cache import CachedPlan
from .state import file_text

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


def cached_plan(xml: bytes, qemu_conf: str, config_text: str | None) -> CachedPlan | str:
    """The guest's cached plan when it still holds for ``xml``, else why not."""
    from .cache import CachedPlan, read_cache

    uuid, domain_id = domain_ids(xml)
    if uuid is None or domain_id is None:
        return "the domain XML has no uuid or no id"
    try:
        cache = read_cache(uuid)
    except SchemaError as e:
        return f"the plan cache is not this kvmaccel's ({e})"
    if cache is None:
        return "no plan cache (the guest was never planned here)"
    if cache.inputs != plan_inputs(xml, qemu_conf, config_text):
        return "the XML, the emulator, qemu.conf or the config changed since the last plan"
    shortname = f"{domain_id}-{cache.shortname_tail}"
    return CachedPlan(uuid, domain_id, shortname, cache, cache.for_start(shortname))


def prepare_from_cache(xml: bytes, values: dict[str, Any], say: Callable[[str], None]
                       ) -> str | None:
    """None when the cached plan still holds: the guest is planned as before, else why not.
    When the pool serves every backend, the recipe for ``start`` is written; otherwise
    ``start`` populates from the cached plan, and checks the host's room then (a failing
    check refuses the start there, under ``strict``, as it would have here)."""
    found = cached_plan(xml, values["qemu_conf"], values["config_text"])
    if isinstance(found, str):
        return found
    files = ", ".join(b.backend.mem_path for b in found.backends)
    with_pool = values["pool_enabled"]
    if with_pool and write_recipe_if_clean(found.uuid, found.domain_id, found.cache.name,
                                           found.shortname, found.recipe_backends()):
        say(f"plan: as before; the pool serves {files}")
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(recipe_path(found.uuid))  # one a start that never came left behind
        say(f"plan: as before; start populates {files}")
        if with_pool:
            hurry_own_scrub(found.uuid, {(b.pool_dir, b.state_dir) for b in found.backends
                                         if b.pool_dir is not None}, say)
    return None


# --- a warm start: link what prepare found ----------------------------------------------------

def start_from_pool(xml: bytes, say: Callable[[str], None]) -> str | None:
    """Link the clean pool files ``prepare`` found at the paths libvirt hands QEMU
    (:func:`kvmaccel.serve.take.start_from_recipe`); None when every backend is served,
    else why not."""
    uuid, domain_id = domain_ids(xml)
    if uuid is None:
        return "the domain XML has no uuid"
    return start_from_recipe(uuid, domain_id, say)
