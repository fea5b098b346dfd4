"""Where kvmaccel's own files live: the defaults, and the places this process uses.

Each entry point resolves kvmaccel's places once, from its inputs (:func:`resolve`: the
config's ``run_dir`` and ``record_file`` where it reads a config, the ``KVMACCEL_*``
variables, the defaults), and sets them for its process (:func:`use`), as logging is
configured once; every other module asks :func:`places` (or :func:`run_dir`) and none reads
the environment.  The entry points are the hook (:mod:`kvmaccel.libvirt.entry`,
:mod:`kvmaccel.libvirt.full`) and the ``kvmaccel`` command (:mod:`kvmaccel.cli.main`, which
the keeper and a detached scrub run as too); ``tests/test_layout.py`` checks that no other
module reads a ``KVMACCEL_`` variable.  A process kvmaccel starts gets them as variables
(:meth:`Places.environment`); a forked one has them already.

Kept apart (and free of kvmaccel imports) because the hook's warm-start path reads them
before it knows whether it needs the rest of kvmaccel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

DEFAULT_CONFIG_PATH = "/etc/kvmaccel/kvmaccel.toml"
DEFAULT_LOG_FILE = "/var/log/kvmaccel/hook.log"
DEFAULT_RUN_DIR = "/run/kvmaccel"
DEFAULT_RECORD_FILE = "/var/log/kvmaccel/records.jsonl"
DEFAULT_STATE_DIR = "/var/lib/kvmaccel"

CONFIG_ENV = "KVMACCEL_CONFIG"
RUN_DIR_ENV = "KVMACCEL_RUN_DIR"
RECORD_FILE_ENV = "KVMACCEL_RECORD_FILE"
STATE_DIR_ENV = "KVMACCEL_STATE_DIR"
FILLER_DIR_ENV = "KVMACCEL_FILLER_DIR"


class Places(NamedTuple):
    """kvmaccel's own places, as one process uses them."""

    config_file: str
    """The config file a command reads when it is not given one."""
    run_dir: str
    """Runtime state: slots, creation records, pool states, guests' states, the snapshot."""
    record_file: str
    """The record file (:mod:`kvmaccel.engine.records`)."""
    state_dir: str
    """Kept across boots: ``kvmaccel tune``'s tuning.json."""
    filler_dir: str
    """Filler records (:mod:`kvmaccel.serve.filler`): where the installed hook script looks."""

    def environment(self) -> dict[str, str]:
        """The variables that give a kvmaccel process started by this one the same places."""
        return {CONFIG_ENV: self.config_file, RUN_DIR_ENV: self.run_dir,
                RECORD_FILE_ENV: self.record_file, STATE_DIR_ENV: self.state_dir,
                FILLER_DIR_ENV: self.filler_dir}


def resolve(environ: Mapping[str, str], *, config_file: str | None = None,
            run_dir: str | None = None, record_file: str | None = None) -> Places:
    """The places for an entry point's inputs: ``environ`` (the process's environment) and,
    where the entry point has them, the config file it was given and its config's values.

    * the config file: ``config_file``, else ``$KVMACCEL_CONFIG``, else the default;
    * the run dir: ``run_dir`` (the hook's config: it wins over the environment), else
      ``$KVMACCEL_RUN_DIR`` (even when empty), else ``/run/kvmaccel``;
    * the record file: ``$KVMACCEL_RECORD_FILE``, else ``record_file`` (the config's), else
      the default;
    * the state dir: ``$KVMACCEL_STATE_DIR``, else ``/var/lib/kvmaccel``;
    * the filler dir: ``$KVMACCEL_FILLER_DIR`` (the installed hook script sets it), else
      ``fillers/`` in the run dir.
    """
    run = run_dir if run_dir is not None else environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR)
    return Places(
        config_file=config_file or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH,
        run_dir=run,
        record_file=environ.get(RECORD_FILE_ENV) or record_file or DEFAULT_RECORD_FILE,
        state_dir=environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR,
        filler_dir=environ.get(FILLER_DIR_ENV) or os.path.join(run, "fillers"))


_places: Places | None = None


def use(chosen: Places | None) -> Places | None:
    """Set this process's places (an entry point does, once it knows them); return the ones
    set before.  ``None`` unsets them."""
    global _places
    previous, _places = _places, chosen
    return previous


def places() -> Places:
    """This process's places.  Raises :class:`RuntimeError` when no entry point set them: a
    library caller resolves them first, ``paths.use(paths.resolve(os.environ))``."""
    if _places is None:
        raise RuntimeError("kvmaccel's places are not set: call kvmaccel.paths.use("
                           "kvmaccel.paths.resolve(os.environ)) before using kvmaccel")
    return _places


def run_dir() -> str:
    """This process's run directory (:attr:`Places.run_dir`)."""
    return places().run_dir


def config_path(path: str | None = None) -> str:
    """The config file: ``path``, else this process's (:attr:`Places.config_file`)."""
    return path or places().config_file
