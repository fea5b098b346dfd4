"""A small driver for the local libvirt daemon, for the start benchmark and the integration
tests: ``virsh`` calls, a temporary ``qemu.conf``, a daemon restart, QEMU's pid and maps.

Never used by the hook (a hook must not call libvirt).  It shells out to ``virsh`` rather than
using libvirt-python so that timings are exactly "until ``virsh start`` returns".  Everything
here needs root.  Errors raise :class:`~kvmaccel.errors.VirshError` with virsh's message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping

import psutil

from .errors import VirshError

log = logging.getLogger(__name__)

URI = "qemu:///system"
LIBVIRT_DIR = "/etc/libvirt"
QEMU_CONF = "/etc/libvirt/qemu.conf"
PIDFILE = "/run/libvirtd.pid"


def virsh(*args: str, check: bool = True,
          timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``virsh -c qemu:///system ARGS``.  Raises :class:`VirshError` (with virsh's stderr)
    when it fails and ``check``."""
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise VirshError(f"virsh {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}",
                         stderr=proc.stderr)
    return proc


def daemon_ready(timeout_s: float = 30) -> None:
    """Wait until the daemon answers.  Raises :class:`VirshError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if virsh("version", check=False, timeout_s=10).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise VirshError(f"libvirtd did not answer on {URI} within {timeout_s:g} s")
        time.sleep(0.1)


def _daemon_pid() -> int | None:
    try:
        with open(PIDFILE, encoding="ascii") as f:
            pid = int(f.read().strip())
        return pid if psutil.Process(pid).name() == "libvirtd" else None
    except (OSError, ValueError, psutil.Error):
        return None


def restart_libvirtd() -> None:
    """Restart the monolithic libvirtd so it rereads qemu.conf and finds new hooks.

    With systemd: ``systemctl restart libvirtd``.  Without (CI containers): SIGTERM the pid in
    /run/libvirtd.pid, wait for it to exit, ``libvirtd -d``.  Running guests keep running
    (libvirtd reconnects to them).  Raises :class:`VirshError`.
    """
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
        daemon_ready()
        return
    pid = _daemon_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout=30)
    for _ in range(50):  # the pidfile goes with the process; a new one must not find it
        if not os.path.exists(PIDFILE):
            break
        time.sleep(0.1)
    # stdio to /dev/null: the daemon must not hold a caller's pipe open.
    subprocess.run(["libvirtd", "-d"], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon_ready()


def render_qemu_conf(original: str, settings: Mapping[str, str | int]) -> str:
    """``original`` with every line that sets one of ``settings`` commented out, and the
    settings appended (virConf: strings quoted, integers bare)."""
    keys = "|".join(re.escape(k) for k in settings)
    pattern = re.compile(rf"^\s*({keys})\s*=")
    lines = [("#kvmaccel# " + line) if keys and pattern.match(line) else line
             for line in original.splitlines()]
    lines.append("# --- set by kvmaccel for a test or benchmark; restored afterwards ---")
    for key, value in settings.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def saved_file(path: str) -> Iterator[None]:
    """Restore ``path`` (content and mode, or its absence) when the block ends."""
    try:
        with open(path, "rb") as f:
            data: bytes | None = f.read()
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        data, mode = None, 0o644
    try:
        yield
    finally:
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)


def write_qemu_conf(settings: Mapping[str, str | int], original: str) -> None:
    with open(QEMU_CONF, "w", encoding="utf-8") as f:
        f.write(render_qemu_conf(original, settings))


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def remove_domain(name: str) -> None:
    """Destroy (if running) and undefine ``name``; a missing domain is fine."""
    virsh("destroy", name, check=False)
    virsh("undefine", name, check=False)


def qemu_pid(name: str) -> int:
    """The QEMU process of running domain ``name`` (from libvirt's pidfile).  Raises
    :class:`VirshError`."""
    path = f"/run/libvirt/qemu/{name}.pid"
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise VirshError(f"no QEMU pid for {name} in {path}: {e}") from None


def mapped_files(pid: int) -> dict[str, int]:
    """Path -> inode of every shared file mapping of ``pid`` (``/proc/<pid>/maps``)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[1].endswith("s") and parts[5].startswith("/"):
                out[parts[5].strip()] = int(parts[4])
    return out
