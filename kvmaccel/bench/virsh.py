"""A small driver for the local libvirt daemon, for the start benchmark and the integration
tests: ``virsh`` calls, a temporary ``qemu.conf``, a daemon restart, QEMU's pid and maps.

Never used by the hook (a hook must not call libvirt).  It shells out to ``virsh`` rather than
using libvirt-python so that timings are exactly "until ``virsh start`` returns".  Everything
here needs root.  Errors raise :class:`~kvmaccel.errors.VirshError` with virsh's message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping

import psutil

from ..errors import VirshError
from ..host import proc as host_proc
from ..setup import install as hook_install

log = logging.getLogger(__name__)

URI = "qemu:///system"
LIBVIRT_DIR = "/etc/libvirt"
QEMU_CONF = "/etc/libvirt/qemu.conf"
PIDFILE = "/run/libvirtd.pid"
LOCK_PATH = "/run/kvmaccel-libvirt.lock"


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
    stopped_unix = time.time()
    # stdio to /dev/null: the daemon must not hold a caller's pipe open.  umask 022 as an init
    # system gives it: under kvmaccel's own 077 it would make the per-domain directories
    # 0700 root, and QEMU (the qemu user) could not open its memory.
    proc = subprocess.run(["libvirtd", "-d"], check=False, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=lambda: os.umask(0o022))
    if proc.returncode != 0:
        # Someone else (another developer's shell, a test command) may have started one in
        # the gap: it read the current qemu.conf too, so it will do.
        time.sleep(0.5)
        other = _daemon_pid()
        if other is None or psutil.Process(other).create_time() < stopped_unix - 1:
            raise VirshError(f"libvirtd -d failed (exit status {proc.returncode}); see "
                             "/var/log/libvirt/libvirtd.log")
        log.info("libvirtd pid %d was started by someone else meanwhile; using it", other)
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
    return {a.path.strip(): a.inode for a in host_proc.maps(pid)
            if a.shared and a.path.startswith("/")}


@contextlib.contextmanager
def temporary_hook(config_path: str, workdir: str) -> Iterator[Callable[[bool], None]]:
    """Install kvmaccel's hook in /etc/libvirt with ``config_path`` for a block; yield
    ``enable(on)``, which parks the script in ``workdir`` and back.  libvirtd lists
    ``hooks/qemu.d/`` at every call, but runs hooks at all only if it found one when it
    started: keep it enabled across daemon restarts.  Whatever was installed before is put
    back afterwards."""
    path = hook_install.hook_path(LIBVIRT_DIR)
    aside = os.path.join(workdir, "hook-saved")
    had = os.path.lexists(path)
    if had:
        shutil.copy2(path, aside)
    hook_install.install(LIBVIRT_DIR, config_path=config_path)
    parked = os.path.join(workdir, "hook-parked")

    def enable(on: bool) -> None:
        if on and os.path.exists(parked):
            os.replace(parked, path)
        elif not on and os.path.exists(path):
            shutil.move(path, parked)

    try:
        yield enable
    finally:
        enable(True)
        if had:
            info = hook_install.status(LIBVIRT_DIR).info or {}
            config = info.get("config")
            hook_install.forget_config(config if isinstance(config, str) else None)
            shutil.copy2(aside, path)
        else:
            hook_install.uninstall(LIBVIRT_DIR)


@contextlib.contextmanager
def exclusive_libvirt(timeout_s: float = 1800) -> Iterator[None]:
    """Hold an exclusive lock on the local daemon's setup for a block.

    The integration tests and the start benchmark rewrite qemu.conf, install hooks and
    restart libvirtd; two of them at once (two test runs in one checkout) would restart
    the daemon under each other.  Raises :class:`VirshError` after ``timeout_s``.
    """
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VirshError(f"another kvmaccel test or benchmark has held {LOCK_PATH} "
                                     f"for {timeout_s:g} s; wait for it to finish") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_mount(fs_type: str, options: str, prefix: str = "kvmaccel-",
                  parent: str = "/run") -> Iterator[str]:
    """Mount a fresh tmpfs or hugetlbfs of one's own under ``parent`` for a block, then
    unmount it (lazily if a process still holds a file in it) and remove the mount point.
    Tests and benchmarks use one so that they never touch the host's own /dev/shm,
    /dev/hugepages or a pool on them.  Raises :class:`subprocess.CalledProcessError`."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o755)
    subprocess.run(["mount", "-t", fs_type, "-o", options, "none", path], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)
        os.rmdir(path)
