"""Install, remove and inspect kvmaccel's libvirt hook (``<libvirt dir>/hooks/qemu.d/kvmaccel``).

libvirt (6.5+) runs ``hooks/qemu`` first and then every executable in ``hooks/qemu.d/`` in
name order, each with the same arguments and XML.  kvmaccel installs only into ``qemu.d/``, so
an existing ``hooks/qemu`` keeps working untouched.  The installed script is
:func:`render_script`: a ``/bin/sh`` front that runs the Python that has kvmaccel installed
(libvirt runs hooks with a cleaned environment, so ``/usr/bin/env python3`` may not find
kvmaccel) only for the operations kvmaccel acts on.

The script's second line records what the install did (``# kvmaccel-hook: {json}``: the
version, the config file, the Python, the directories it created), so that :func:`uninstall`
removes exactly that and refuses to remove a file kvmaccel did not write.

A running daemon only runs a hook that existed when it started, or after SIGHUP (which it
ignores during its first second): :func:`daemons` finds them so the CLI can say so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import sysconfig
from dataclasses import dataclass

import psutil

from .. import __version__, safefs
from ..errors import HookError
from ..paths import DEFAULT_CONFIG_PATH, DEFAULT_RUN_DIR

log = logging.getLogger(__name__)

DEFAULT_LIBVIRT_DIR = "/etc/libvirt"
HOOK_NAME = "kvmaccel"
MARKER = "# kvmaccel-hook: "
DAEMON_PIDFILES = {"libvirtd": "/run/libvirtd.pid", "virtqemud": "/run/virtqemud.pid"}

_TEMPLATE = '''#!/bin/sh
{marker}
# kvmaccel's libvirt qemu hook: creates and populates guest memory files before QEMU starts.
# See `kvmaccel hook --help`; settings live in the config file (default
# /etc/kvmaccel/kvmaccel.toml), not here.  This script never writes to stdout.
#
# The operations kvmaccel acts on (kvmaccel.libvirt.full.HANDLED_OPS); every other one exits 0 at
# once, without starting Python: each call before QEMU is part of the guest's start.
case "$2 $3" in
    "prepare begin"|"start begin"|"started begin"|"stopped end"|"release end") ;;
    *) [ $# -eq 4 ] && exit 0 ;;
esac
{run_dir}# "started begin" (QEMU has preallocated: stop the filler for good) only when a start left
# a filler: its record is in this directory (kvmaccel.serve.filler).
export KVMACCEL_FILLER_DIR="${{KVMACCEL_RUN_DIR:-{default_run_dir}}}/fillers"
if [ "$2 $3" = "started begin" ]; then
    for record in "$KVMACCEL_FILLER_DIR"/*.json; do
        [ -e "$record" ] || exit 0
        break
    done
fi
{comment}exec {python} -c {code} "$@"
'''
_CODE = '''
import sys
{path_line}from kvmaccel.libvirt.entry import main
sys.exit(main(sys.argv[1:], config_path={config}))
'''
_FAST_START = ("# Python runs without site (-S), which it does not need: kvmaccel and its "
               "dependencies\n# are put on sys.path by hand.\n")


def render_script(python: str, config_path: str | None,
                  created_dirs: tuple[str, ...] = (), run_dir: str | None = None) -> str:
    """The hook script text: a /bin/sh front that runs ``python`` for the operations kvmaccel
    acts on.  This very Python runs with ``-S`` and is told where this kvmaccel is; any other
    (``/usr/bin/env python3`` for the copy in the source tree's ``hooks/qemu``) finds
    kvmaccel through site."""
    info: dict[str, object] = {"version": __version__, "config": config_path,
                               "created_dirs": list(created_dirs), "python": python}
    run_dir_line = ""
    if run_dir is not None and run_dir != DEFAULT_RUN_DIR:
        # libvirt runs hooks with a clean environment: the warm path finds the config's
        # snapshot in the config's run_dir only if it is told where that is.
        info["run_dir"] = run_dir
        run_dir_line = f"export KVMACCEL_RUN_DIR={shlex.quote(run_dir)}\n"
    path_line, comment, command = "", "", python
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # kvmaccel/
        directories = [os.path.dirname(package)]
        # Without site, a venv made with --system-site-packages (scripts/install.sh) would
        # lose Debian's dist-packages too (python3-libvirt, -click, -psutil): every
        # site-packages directory this Python has goes on the path, in its order.
        candidates = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
                      *(p for p in sys.path
                        if os.path.basename(p) in ("site-packages", "dist-packages"))]
        for directory in candidates:
            if directory not in directories:
                directories.append(directory)
        path_line = f"sys.path[:0] = {json.dumps(directories)}\n"
        comment, command = _FAST_START, f"{shlex.quote(python)} -S"
    config = json.dumps(config_path) if config_path is not None else "None"
    code = _CODE.format(path_line=path_line, config=config)
    return _TEMPLATE.format(marker=MARKER + json.dumps(info), comment=comment,
                            run_dir=run_dir_line, default_run_dir=DEFAULT_RUN_DIR,
                            python=command, code=shlex.quote(code))


@dataclass(frozen=True)
class HookStatus:
    """What :func:`status` found.  ``info`` is the marker's JSON, None when not kvmaccel's."""

    path: str
    installed: bool
    ours: bool
    python: str | None
    python_ok: bool
    info: dict[str, object] | None
    main_hook: str | None  # an existing hooks/qemu, kept as it is
    other_hooks: tuple[str, ...]  # other executables in hooks/qemu.d
    mtime_unix: float | None


def hook_path(libvirt_dir: str) -> str:
    return os.path.join(libvirt_dir, "hooks", "qemu.d", HOOK_NAME)


def _read_marker(path: str) -> tuple[str | None, dict[str, object] | None]:
    """(interpreter, marker info) of ``path``; info None when it is not kvmaccel's script."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first, second = f.readline(), f.readline()
    except OSError as e:
        raise HookError(f"cannot read {path}: {e.strerror}") from None
    python = first[2:].strip() if first.startswith("#!") else None
    if not second.startswith(MARKER):
        return python, None
    try:
        info = json.loads(second[len(MARKER):])
    except ValueError:
        return python, None
    return python, info if isinstance(info, dict) else None


def status(libvirt_dir: str = DEFAULT_LIBVIRT_DIR) -> HookStatus:
    """Inspect ``<libvirt_dir>/hooks``.  Raises :class:`HookError` for an unreadable hook."""
    path = hook_path(libvirt_dir)
    hooks = os.path.join(libvirt_dir, "hooks")
    main_hook = os.path.join(hooks, "qemu")
    qemu_d = os.path.join(hooks, "qemu.d")
    others = tuple(sorted(
        os.path.join(qemu_d, n) for n in (os.listdir(qemu_d) if os.path.isdir(qemu_d) else ())
        if n != HOOK_NAME))
    if not os.path.lexists(path):
        return HookStatus(path, False, False, None, False, None,
                          main_hook if os.path.lexists(main_hook) else None, others, None)
    python, info = _read_marker(path)
    if info is not None and isinstance(info.get("python"), str):
        python = str(info["python"])  # the interpreter behind the /bin/sh front
    interp = (python or "").split()[0] if python else ""
    return HookStatus(
        path=path, installed=True, ours=info is not None, python=interp or None,
        python_ok=bool(interp) and os.access(interp, os.X_OK), info=info,
        main_hook=main_hook if os.path.lexists(main_hook) else None, other_hooks=others,
        mtime_unix=os.lstat(path).st_mtime)


def install(libvirt_dir: str = DEFAULT_LIBVIRT_DIR, *, python: str | None = None,
            config_path: str | None = None) -> HookStatus:
    """Write the hook, creating ``hooks/qemu.d`` if needed; reinstalling over kvmaccel's own
    hook is an upgrade.  Raises :class:`HookError` when ``libvirt_dir`` does not exist or
    another program's file already has the name."""
    if not os.path.isdir(libvirt_dir):
        raise HookError(f"{libvirt_dir} is not a directory; is libvirt installed? (give "
                        "--libvirt-dir for another location)")
    python = python or sys.executable
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise HookError(f"{python!r} is not an executable absolute path for the hook's Python")
    if config_path is not None and not os.path.isabs(config_path):
        raise HookError(f"--config {config_path} must be an absolute path: libvirt runs the "
                        "hook from another directory")
    path = hook_path(libvirt_dir)
    created: list[str] = []
    if os.path.lexists(path):
        _, info = _read_marker(path)
        if info is None:
            raise HookError(f"{path} exists and was not written by kvmaccel; move it away "
                            "or remove it yourself, then install again")
        previous = info.get("created_dirs")
        created = [d for d in previous if isinstance(d, str)] if isinstance(previous, list) else []
        if info.get("config") != config_path:
            old = info.get("config")
            forget_config(old if isinstance(old, str) else None, _info_run_dir(info))
    for directory in (os.path.join(libvirt_dir, "hooks"), os.path.dirname(path)):
        if not os.path.isdir(directory):
            try:
                os.mkdir(directory, 0o755)
                os.chmod(directory, 0o755)  # libvirt's own hooks dirs are 0755, whatever umask
            except OSError as e:
                raise HookError(f"cannot create {directory}: {e.strerror}") from None
            created.append(directory)
    text = render_script(python, config_path, tuple(created), config_run_dir(config_path))
    try:  # its directory root's (libvirt runs every executable in it), the file whole
        safefs.write_atomic(path, text, mode=0o755, durable=True, own=False)
    except OSError as e:
        raise HookError(f"cannot write {path}: {e.strerror}") from None
    log.info("installed %s (python %s)", path, python)
    return status(libvirt_dir)


def config_run_dir(config_path: str | None) -> str | None:
    """The run_dir the config at ``config_path`` names (None when it cannot be read: the
    hook then fails open and keeps nothing)."""
    from ..errors import KvmaccelError
    from ..plan.config import read_config

    try:
        return read_config(config_path or DEFAULT_CONFIG_PATH).run_dir
    except KvmaccelError:
        return None


def _info_run_dir(info: dict[str, object]) -> str | None:
    value = info.get("run_dir")
    return value if isinstance(value, str) else None


def forget_config(config_path: str | None, run_dir: str | None = None) -> None:
    """Remove what the hook, run by libvirt, learned from ``config_path`` (its snapshot
    under ``run_dir``, /run/kvmaccel by default), and the directories for it when they are
    empty."""
    from ..libvirt.state import snapshot_path

    run_dir = run_dir or DEFAULT_RUN_DIR
    snapshot = snapshot_path(config_path or DEFAULT_CONFIG_PATH, run_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(snapshot)
    # A run_dir of the operator's own stays; only /run/kvmaccel goes when empty.
    for directory in (os.path.dirname(snapshot), DEFAULT_RUN_DIR):
        with contextlib.suppress(OSError):  # not empty, or gone
            os.rmdir(directory)


def uninstall(libvirt_dir: str = DEFAULT_LIBVIRT_DIR) -> list[str]:
    """Remove the hook and the directories its install created (when empty).  Returns the
    paths removed (empty when it was not installed).  Raises :class:`HookError` for a file
    kvmaccel did not write."""
    path = hook_path(libvirt_dir)
    if not os.path.lexists(path):
        return []
    _, info = _read_marker(path)
    if info is None:
        raise HookError(f"{path} was not written by kvmaccel (no '{MARKER.strip()}' line); "
                        "left alone")
    try:
        os.unlink(path)
    except OSError as e:
        raise HookError(f"cannot remove {path}: {e.strerror}") from None
    config = info.get("config")
    forget_config(config if isinstance(config, str) else None, _info_run_dir(info))
    removed = [path]
    dirs = info.get("created_dirs")
    for directory in reversed(dirs if isinstance(dirs, list) else []):
        if isinstance(directory, str) and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
            removed.append(directory)
    return removed


@dataclass(frozen=True)
class Daemon:
    name: str
    pid: int
    started_unix: float


def daemons() -> list[Daemon]:
    """Running libvirt daemons that run qemu hooks (monolithic libvirtd, modular virtqemud),
    found by their pidfiles."""
    found = []
    for name, pidfile in DAEMON_PIDFILES.items():
        try:
            with open(pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
            proc = psutil.Process(pid)
            if proc.name() != name:
                continue
            found.append(Daemon(name, pid, proc.create_time()))
        except (OSError, ValueError, psutil.Error):
            continue
    return found


def notice_advice(hook_mtime_unix: float | None) -> list[str]:
    """Lines telling how to make each running daemon run a hook written at ``hook_mtime_unix``
    (None: just installed)."""
    lines = []
    for d in daemons():
        if hook_mtime_unix is not None and d.started_unix > hook_mtime_unix:
            lines.append(f"{d.name} (pid {d.pid}) started after the hook was written: it runs it")
            continue
        lines.append(f"{d.name} (pid {d.pid}) runs a new hook only after SIGHUP or a restart: "
                     f"kill -HUP {d.pid} (ignored during the daemon's first second), or "
                     f"restart it (systemctl restart {d.name})")
    if not lines:
        lines.append("no libvirt daemon is running; it will run the hook when it starts")
    return lines
