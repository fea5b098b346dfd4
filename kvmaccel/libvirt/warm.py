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
from collections.abc import Callable
from typing import Any

from ..serve.state import cache_path, read_json, recipe_path
from ..serve.take import hurry_own_scrub, start_from_recipe, write_recipe_if_clean
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


# --- a warm start: link what prepare found ----------------------------------------------------

def start_from_pool(xml: bytes, say: Callable[[str], None]) -> bool:
    """Link the clean pool files ``prepare`` found at the paths libvirt hands QEMU
    (:func:`kvmaccel.serve.take.start_from_recipe`); True when every backend is served."""
    uuid, domain_id = domain_ids(xml)
    return uuid is not None and start_from_recipe(uuid, domain_id, say)
