"""The hook's entry point: try the warm path, and only when it declines import the full hook.

libvirt runs the installed script (:mod:`kvmaccel.setup.install`) at every step of a guest's
life; it calls :func:`main` here.  A warm ``prepare``/``start`` is done by
:mod:`kvmaccel.libvirt.warm`, and ``started`` (stop the guest's filler for good) by
:mod:`kvmaccel.serve.filler`, with only what ``json`` loads anyway; everything else, and
anything unexpected, goes to :func:`kvmaccel.libvirt.full.main`, imported only then.  This
module is what the warm path's import budget is measured from: it imports nothing heavier than
:mod:`kvmaccel.libvirt.warm` and :mod:`kvmaccel.libvirt.state` do.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO

from .. import paths
from .state import log_info, read_config_snapshot
from .warm import prepare_from_cache, start_from_pool


def main(argv: Sequence[str], stdin: BinaryIO | None = None,
         config_path: str | None = None) -> int:
    """The hook (``argv`` without the program name).  A warm ``prepare``/``start`` is done
    here; everything else, and anything unexpected, by :func:`kvmaccel.libvirt.full.main`.

    Whatever libvirt's umask, kvmaccel's own files and directories are private (077)."""
    previous_umask = os.umask(0o077)
    try:
        return _main(argv, stdin, config_path)
    finally:
        os.umask(previous_umask)


def _main(argv: Sequence[str], stdin: BinaryIO | None, config_path: str | None) -> int:
    declined = None
    # kvmaccel's places as the environment gives them (the installed script exports the run
    # dir it was installed with: the snapshot is there); the config's, once it is read.
    paths.use(paths.resolve(os.environ, config_file=config_path))
    if len(argv) == 4 and argv[2] == "begin" and argv[1] in ("prepare", "start", "started"):
        data = (stdin or sys.stdin.buffer).read()
        try:
            declined = _warm(argv[0], argv[1], data, config_path)
        except Exception as e:  # noqa: BLE001 -- the full hook decides, logs, honours strict
            declined = f"{type(e).__name__}: {e}"
        if declined is None:
            return 0
        stdin = io.BytesIO(data)
    from .full import main as full_main

    return full_main(argv, stdin, config_path, warm_declined=declined)


def _warm(name: str, op: str, xml: bytes, config_path: str | None) -> str | None:
    """None when the warm path did the whole operation (or kvmaccel is disabled), else why
    it declined (the full hook logs that at debug level)."""
    values = read_config_snapshot(paths.config_path())
    if values is None:
        return "no snapshot of the config as it is now (changed, or never read by the hook)"
    if not values["enabled"] and op != "started":  # a filler left running is stopped anyway
        return None
    if op == "start" and not values["pool_enabled"]:
        return "the pool is disabled"
    paths.use(paths.resolve(os.environ, config_file=config_path, run_dir=values["run_dir"],
                            record_file=values["record_file"]))  # libvirt: no variables

    def say(message: str) -> None:
        log_info(values, name, op, message)

    if op == "prepare":
        return prepare_from_cache(xml, values, say)
    if op == "started":  # imported only here: a warm prepare or start never needs it
        from .started import stop_at_started

        stop_at_started(name, xml, say)
        return None
    return start_from_pool(xml, say)
