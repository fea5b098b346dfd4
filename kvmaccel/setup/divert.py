"""``kvmaccel front install --divert``: the front at QEMU's own path, host-wide.

For hosts whose domain XML a manager writes (OpenStack nova regenerates it at every hard
reboot), ``kvmaccel enable`` would not last.  ``dpkg-divert --local --rename`` moves the real
binary to ``<qemu>.kvmaccel-real`` (a name the guest's AppArmor profile still lets it run:
``/usr/bin/qemu-system-*``) and makes dpkg put every later upgrade there too; the front
takes QEMU's path.  Uninstall removes the diversion and moves the real binary back over the
front.

dpkg's database, not the files, says what is diverted, and the two can disagree: an
uninstall that failed half-way leaves the diversion registered with QEMU back at its path,
and anyone can remove a diversion with ``dpkg-divert --remove`` behind kvmaccel's back.
``dpkg-divert --add`` of a diversion already registered does nothing ("Leaving ...") and
renames nothing, so both ends ask dpkg first (``--truename``, ``--listpackage``) and check
the files against its answer:

* install repairs a leftover diversion of kvmaccel's (``<qemu>.kvmaccel-real``, local, with
  no file there: QEMU is at its own path) by removing it from the database, refuses any other
  one, and puts the front at QEMU's path only with ``link()``, which never replaces a file,
  after checking that dpkg-divert moved QEMU's very inode away;
* uninstall removes the diversion from the database first (``--no-rename``) and then renames
  the real binary over the front, so QEMU's path is never empty; when it cannot put QEMU
  back (no diversion of kvmaccel's registered any more, the real binary missing) it leaves
  the front in place, which still execs the real binary, and says what to do
  (:class:`~kvmaccel.errors.HookError`).

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
import logging
import os
import shlex
import stat
import subprocess
from dataclasses import dataclass

from ..errors import HookError
from .front import FrontStatus, _check_qemu, _write_front, read_status, render

REAL_SUFFIX = ".kvmaccel-real"
APT_CONF_DIR = "/etc/apt/apt.conf.d"
APT_HOOK_NAME = "80kvmaccel-front"
APT_MARKER = "// kvmaccel-front-apt-hook"
LOCAL = "LOCAL"  # what dpkg-divert --listpackage prints for a --local diversion

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Diversion:
    """What dpkg's database says of ``path``: diverted to ``divert_to`` by ``package``
    (``LOCAL`` for a local diversion), or not diverted (both None)."""

    path: str
    divert_to: str | None
    package: str | None

    def is_kvmaccels(self) -> bool:
        return self.divert_to == self.path + REAL_SUFFIX and self.package == LOCAL

    def describe(self) -> str:
        by = "locally" if self.package == LOCAL else f"by package {self.package}"
        return f"{self.path} is diverted to {self.divert_to} ({by})"


def _run_dpkg_divert(*args: str) -> str:
    try:
        proc = subprocess.run(["dpkg-divert", *args], check=True, capture_output=True,
                              text=True)
    except FileNotFoundError:
        raise HookError("dpkg-divert not found: --divert needs dpkg (Debian, Ubuntu)") from None
    except subprocess.CalledProcessError as e:
        raise HookError(f"dpkg-divert {' '.join(args)}: {e.stderr.strip()}") from None
    return proc.stdout.strip()


def diversion(path: str) -> Diversion:
    """Ask dpkg whether ``path`` is diverted.  Raises :class:`HookError` without dpkg."""
    true_name = _run_dpkg_divert("--truename", path)
    if not true_name or true_name == path:
        return Diversion(path, None, None)
    return Diversion(path, true_name, _run_dpkg_divert("--listpackage", path) or None)


def _remove_from_database(qemu: str) -> None:
    """Remove kvmaccel's diversion of ``qemu`` from dpkg's database only; no file moves."""
    _run_dpkg_divert("--local", "--no-rename", "--remove", qemu)


def _move_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` only while nothing is at ``dst`` (``link`` never replaces a
    file, then the old name goes).  Raises :class:`OSError` (``FileExistsError``)."""
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def install(qemu: str, apt_conf_dir: str = APT_CONF_DIR) -> FrontStatus:
    """Divert ``qemu`` to ``<qemu>.kvmaccel-real`` and put the front at ``qemu``; add the apt
    hook.  The front is written first beside it, so QEMU's path is missing only between
    dpkg-divert's rename and the front's ``link``.  A leftover diversion of kvmaccel's
    (registered, with QEMU at its own path and nothing at the diverted name) is removed from
    dpkg's database first; any other diversion of ``qemu`` is refused.  Raises
    :class:`HookError` with QEMU where it was."""
    _check_qemu(qemu)
    real = qemu + REAL_SUFFIX
    if os.path.lexists(real):
        raise HookError(f"{real} exists; refusing to divert {qemu} onto it (look at both: "
                        "the newer one is QEMU, dpkg-divert --list shows the diversions)")
    hook = os.path.join(apt_conf_dir, APT_HOOK_NAME)
    if os.path.lexists(hook):
        raise HookError(f"{hook} exists; remove it first (kvmaccel front uninstall)")
    found = diversion(qemu)
    if found.is_kvmaccels():
        _remove_from_database(qemu)
        log.warning("%s: removed a leftover diversion to %s from dpkg's database (QEMU was "
                    "back at its own path); diverting it again", qemu, real)
    elif found.divert_to is not None:
        raise HookError(f"{found.describe()}, not by kvmaccel; kvmaccel diverts only an "
                        "undiverted QEMU: remove that diversion first, or install the front "
                        "beside QEMU (kvmaccel front install without --divert)")
    original = os.lstat(qemu)
    tmp = _write_front(qemu, render(real, diverted=True), rename=False)
    try:
        _run_dpkg_divert("--local", "--rename", "--divert", real, "--add", qemu)
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        moved = os.lstat(real) if os.path.lexists(real) else None
        if os.path.lexists(qemu) or moved is None or (moved.st_dev, moved.st_ino) != (
                original.st_dev, original.st_ino):
            raise HookError(f"dpkg-divert did not move {qemu} to {real}; the front was not "
                            f"installed and {qemu} is left as it is")
        _move_no_replace(tmp, qemu)
        with open(hook, "x", encoding="utf-8") as f:
            f.write(apt_hook_text(qemu))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _undo_install(qemu, real, hook)
        if isinstance(e, OSError):
            raise HookError(f"cannot put the front at {qemu} or write {hook}: {e.strerror}; "
                            f"undone as far as {qemu} allowed (kvmaccel front status shows "
                            "what is left)") from None
        raise
    return read_status(qemu)


def _undo_install(qemu: str, real: str, hook: str) -> None:
    """An install that failed after dpkg-divert: QEMU back at its path if it is free, the
    diversion out of the database, the hook (if ours) gone."""
    with contextlib.suppress(OSError):
        if read_status(qemu).installed:
            os.rename(real, qemu)  # over our own front, never over anything else
        elif not os.path.lexists(qemu):
            _move_no_replace(real, qemu)
    if not os.path.lexists(real):
        with contextlib.suppress(HookError):
            _remove_from_database(qemu)
    _remove_apt_hook(hook)


def _remove_apt_hook(hook: str) -> None:
    with contextlib.suppress(FileNotFoundError), open(hook, encoding="utf-8") as f:
        if f.read().startswith(APT_MARKER):
            os.unlink(hook)


def uninstall(qemu: str, apt_conf_dir: str = APT_CONF_DIR) -> str | None:
    """Undo :func:`install`: the diversion (from dpkg's database), then the real binary
    renamed over the front, then the apt hook (if it is ours).  Returns what was done, one
    line; None when nothing at ``qemu`` is kvmaccel's.

    When QEMU cannot be put back (dpkg has no diversion of kvmaccel's any more, the real
    binary is missing), the front stays where it is and :class:`HookError` says what to do;
    so does a file at ``qemu`` that is not kvmaccel's front while the diverted name exists."""
    st = read_status(qemu)
    real = qemu + REAL_SUFFIX
    hook = os.path.join(apt_conf_dir, APT_HOOK_NAME)
    real_there = os.path.lexists(real)
    if os.path.lexists(qemu) and not (st.installed and st.diverted):
        if real_there:
            raise HookError(f"{qemu} is not kvmaccel's diverted front; left alone")
        with contextlib.suppress(HookError):  # no dpkg: nothing of kvmaccel's
            if diversion(qemu).is_kvmaccels():  # what a failed uninstall left
                _remove_from_database(qemu)
                _remove_apt_hook(hook)
                return (f"removed a leftover diversion of {qemu} to {real} from dpkg's "
                        f"database; {qemu} is QEMU")
        return None
    if not os.path.lexists(qemu):  # an install or uninstall that died half-way
        if not real_there:
            return None
        found = diversion(qemu)
        if found.is_kvmaccels():
            _remove_from_database(qemu)
        elif found.divert_to is not None:
            raise HookError(f"{found.describe()}, not by kvmaccel, and nothing is at {qemu}; "
                            f"left alone: move {real} back by hand if it is QEMU")
        _put_back(real, qemu, replace=False)
        _remove_apt_hook(hook)
        return f"moved {real} back to {qemu} (nothing was at {qemu}); {qemu} is QEMU again"
    found = diversion(qemu)
    if not found.is_kvmaccels():
        what = (found.describe() + ", not by kvmaccel" if found.divert_to
                else "dpkg has no diversion of it any more (removed outside kvmaccel)")
        raise HookError(f"{qemu} is kvmaccel's front but {what}, so dpkg may put QEMU "
                        f"elsewhere; left the front in place (it execs {real}): to undo by "
                        f"hand, mv {real} {qemu} and rm {hook}")
    if not real_there or not stat.S_ISREG(os.lstat(real).st_mode):
        raise HookError(f"{real}, the real QEMU, is missing or not a file; left the front at "
                        f"{qemu} and the diversion in place: reinstall QEMU's package (dpkg "
                        f"puts it at {real}) and run uninstall again")
    _remove_from_database(qemu)
    _put_back(real, qemu, replace=True)
    _remove_apt_hook(hook)
    return (f"removed the front at {qemu}, the apt hook and the diversion: {qemu} is the "
            "real QEMU again")


def _put_back(real: str, qemu: str, *, replace: bool) -> None:
    """Rename the real binary to QEMU's path: over the front (``replace``), or only while
    nothing is there.  The diversion is gone from dpkg's database by now."""
    try:
        if replace:
            os.rename(real, qemu)
        else:
            _move_no_replace(real, qemu)
    except OSError as e:
        raise HookError(f"removed the diversion of {qemu} but cannot move {real} back: "
                        f"{e.strerror}; {'the front is left in place; ' if replace else ''}"
                        f"run: mv {real} {qemu}") from None
