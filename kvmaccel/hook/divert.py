"""``kvmaccel front install --divert``: the front at QEMU's own path, host-wide.

For hosts whose domain XML a manager writes (OpenStack nova regenerates it at every hard
reboot), ``kvmaccel enable`` would not last.  ``dpkg-divert --local --rename`` moves the real
binary to ``<qemu>.kvmaccel-real`` (a name the guest's AppArmor profile still lets it run:
``/usr/bin/qemu-system-*``) and makes dpkg put every later upgrade there too; the front
takes QEMU's path.  Uninstall removes the front and the diversion, which moves the real
binary back.

libvirt caches QEMU's capabilities keyed on, among others, the emulator's ctime, which is now
the front's: an upgrade that changes only the diverted binary would leave the cache stale.
An apt hook (``DPkg::Post-Invoke``, :data:`APT_HOOK_NAME` in ``/etc/apt/apt.conf.d``) touches
the front after every dpkg run in which the real binary changed (its ctime passed the
front's), which changes the front's ctime and makes libvirt probe again.  It runs for
upgrades through apt; a bare ``dpkg -i`` does not run it (then: ``touch <qemu>``).

Errors: :class:`~kvmaccel.errors.HookError`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess

from ..errors import HookError
from .front import FrontStatus, _check_qemu, _write_front, read_status, render

REAL_SUFFIX = ".kvmaccel-real"
APT_CONF_DIR = "/etc/apt/apt.conf.d"
APT_HOOK_NAME = "80kvmaccel-front"
APT_MARKER = "// kvmaccel-front-apt-hook"


def apt_hook_text(qemu: str) -> str:
    real = qemu + REAL_SUFFIX
    f, r = shlex.quote(qemu), shlex.quote(real)
    command = (f"if [ -e {r} ] && [ $(stat -c %Z {r}) -gt $(stat -c %Z {f}) ]; "
               f"then touch {f}; fi")
    if '"' in command:
        raise HookError(f"{qemu}: a path with a double quote cannot go in an apt hook")
    return (f"{APT_MARKER} (kvmaccel front install --divert; removed by uninstall)\n"
            "// libvirt caches QEMU's capabilities by the emulator's ctime; the emulator is\n"
            "// kvmaccel's front now, so touch it whenever dpkg changed the real QEMU.\n"
            f'DPkg::Post-Invoke {{ "{command}"; }};\n')


def _dpkg_divert(*args: str) -> None:
    try:
        subprocess.run(["dpkg-divert", "--local", "--rename", *args], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        raise HookError("dpkg-divert not found: --divert needs dpkg (Debian, Ubuntu)") from None
    except subprocess.CalledProcessError as e:
        raise HookError(f"dpkg-divert {' '.join(args)}: {e.stderr.strip()}") from None


def install(qemu: str, apt_conf_dir: str = APT_CONF_DIR) -> FrontStatus:
    """Divert ``qemu`` to ``<qemu>.kvmaccel-real`` and put the front at ``qemu``; add the apt
    hook.  The front is written first beside it, so QEMU's path is missing only between
    dpkg-divert's rename and ours."""
    _check_qemu(qemu)
    real = qemu + REAL_SUFFIX
    if os.path.lexists(real):
        raise HookError(f"{real} exists; refusing to divert {qemu} onto it")
    hook = os.path.join(apt_conf_dir, APT_HOOK_NAME)
    if os.path.lexists(hook):
        raise HookError(f"{hook} exists; remove it first (kvmaccel front uninstall)")
    tmp = _write_front(qemu, render(real, diverted=True), rename=False)
    try:
        _dpkg_divert("--divert", real, "--add", qemu)
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        os.rename(tmp, qemu)
        with open(hook, "x", encoding="utf-8") as f:
            f.write(apt_hook_text(qemu))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        uninstall(qemu, apt_conf_dir)
        raise
    return read_status(qemu)


def uninstall(qemu: str, apt_conf_dir: str = APT_CONF_DIR) -> bool:
    """Undo :func:`install`: the apt hook (if it is ours), the front at ``qemu`` (if it is a
    diverted front), and the diversion, which moves the real binary back.  False when
    ``qemu`` is not diverted by kvmaccel."""
    st = read_status(qemu)
    real = qemu + REAL_SUFFIX
    if os.path.lexists(qemu) and not (st.installed and st.diverted):
        if not os.path.lexists(real):
            return False
        raise HookError(f"{qemu} is not kvmaccel's diverted front; left alone")
    hook = os.path.join(apt_conf_dir, APT_HOOK_NAME)
    with contextlib.suppress(FileNotFoundError), open(hook, encoding="utf-8") as f:
        if f.read().startswith(APT_MARKER):
            os.unlink(hook)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(qemu)
    _dpkg_divert("--remove", qemu)
    return True
