"""``kvmaccel front install --divert`` (kvmaccel/setup/divert.py) with the real dpkg-divert.

dpkg-divert is real (it records the diversion in dpkg's database, and each test removes what
it added); the "QEMU" is a script at a throwaway path, except in one round trip on the host's
own ``/usr/bin/qemu-system-x86_64``, which is compared byte for byte with a copy saved first
and put back in a ``finally`` whatever happens.  One test builds two versions of a tiny
package with ``dpkg-deb --build`` and upgrades it with ``dpkg -i``, as apt would.  Run under
the host lock (``ptest --host``): they change dpkg's database and /usr.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmaccel.errors import HookError
from kvmaccel.setup import divert, front

from .conftest import need

pytestmark = pytest.mark.root

THROWAWAY = "/usr/local/libexec/kvmaccel-test-qemu"
PACKAGE = "kvmaccel-test-qemu"


def need_dpkg() -> None:
    need(os.geteuid() == 0 and shutil.which("dpkg-divert") is not None,
         "needs root and dpkg-divert")


def script(version: int) -> str:
    return f"#!/bin/sh\necho real-qemu-{version} \"$@\"\n"


def diversions(path: str) -> str:
    return subprocess.run(["dpkg-divert", "--list", path], capture_output=True, text=True,
                          check=True).stdout


def undivert(path: str) -> None:
    """Remove any diversion of ``path`` from dpkg's database (the tests' cleanup)."""
    subprocess.run(["dpkg-divert", "--local", "--no-rename", "--remove", path],
                   capture_output=True, check=True)


def remove_our_apt_hook() -> None:
    """The apt hook a CLI install wrote (the tests' cleanup; never anyone else's file)."""
    hook = os.path.join(divert.APT_CONF_DIR, divert.APT_HOOK_NAME)
    with contextlib.suppress(FileNotFoundError):
        with open(hook) as f:
            ours = f.read().startswith(divert.APT_MARKER)
        if ours:
            os.unlink(hook)


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def runs(path: str, *args: str) -> str:
    """What ``path`` prints when run (raises if it fails)."""
    return subprocess.run([path, *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[str]:
    need_dpkg()
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(script(1))
    path.chmod(0o755)
    yield str(path)
    with contextlib.suppress(subprocess.CalledProcessError):
        undivert(str(path))


@pytest.fixture
def throwaway() -> Iterator[str]:
    """A stand-in "package binary" under /usr/local (not QEMU), cleaned up whatever a test
    leaves: its diversion, both names, the apt hook of a CLI install."""
    need_dpkg()
    os.makedirs(os.path.dirname(THROWAWAY), exist_ok=True)
    for name in (THROWAWAY, THROWAWAY + divert.REAL_SUFFIX):
        assert not os.path.lexists(name), f"{name} left over from an earlier run"
    Path(THROWAWAY).write_text(script(1))
    os.chmod(THROWAWAY, 0o755)
    try:
        yield THROWAWAY
    finally:
        undivert(THROWAWAY)
        for name in (THROWAWAY, THROWAWAY + divert.REAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True)
        remove_our_apt_hook()
        assert THROWAWAY not in diversions(THROWAWAY)


def test_divert_installs_and_uninstalls_cleanly(fake_qemu: str, tmp_path: Path) -> None:
    apt = tmp_path / "apt.conf.d"
    apt.mkdir()
    original = Path(fake_qemu).read_bytes()
    st = divert.install(fake_qemu, str(apt))
    real = fake_qemu + ".kvmaccel-real"
    try:
        assert (st.installed, st.diverted, st.qemu) == (True, True, real)
        assert Path(real).read_bytes() == original
        assert f"to {real}" in diversions(fake_qemu)
        assert runs(fake_qemu, "-machine", "none") == "real-qemu-1 -machine none\n"
        hook = (apt / divert.APT_HOOK_NAME).read_text()
        assert hook.startswith(divert.APT_MARKER)
        with pytest.raises(HookError, match="itself kvmaccel's front"):
            divert.install(fake_qemu, str(apt))

        # A QEMU upgrade: dpkg writes the new binary beside the diverted name and renames it
        # over it.  The apt hook then touches the front, whose ctime libvirt's capability
        # cache is keyed on.
        time.sleep(1.1)  # stat %Z has one-second resolution
        new = Path(real + ".dpkg-new")
        new.write_text(script(2))
        new.chmod(0o755)
        os.rename(new, real)
        before = os.stat(fake_qemu).st_ctime
        command = re.search(r'Post-Invoke \{ "(.*)"; \};', hook)
        assert command is not None
        subprocess.run(["sh", "-c", command.group(1)], check=True)
        assert os.stat(fake_qemu).st_ctime > before
        again = os.stat(fake_qemu).st_ctime
        subprocess.run(["sh", "-c", command.group(1)], check=True)  # nothing new: no touch
        assert os.stat(fake_qemu).st_ctime == again
        assert runs(fake_qemu) == "real-qemu-2\n"
    finally:
        assert divert.uninstall(fake_qemu, str(apt))
    assert Path(fake_qemu).read_text() == script(2)
    assert not os.path.exists(real) and not front.read_status(fake_qemu).installed
    assert fake_qemu not in diversions(fake_qemu)
    assert list(apt.iterdir()) == []
    assert not divert.uninstall(fake_qemu, str(apt))  # nothing of kvmaccel's left


def test_uninstall_leaves_a_foreign_file_alone(fake_qemu: str, tmp_path: Path) -> None:
    Path(fake_qemu + ".kvmaccel-real").write_text("someone else's\n")
    with pytest.raises(HookError, match="not kvmaccel's diverted front"):
        divert.uninstall(fake_qemu, str(tmp_path))
    with pytest.raises(HookError, match="exists; refusing to divert"):
        divert.install(fake_qemu, str(tmp_path))
    assert Path(fake_qemu).read_text() == script(1)


def test_install_repairs_a_leftover_diversion(throwaway: str, tmp_path: Path) -> None:
    """A failed uninstall leaves the diversion registered with QEMU back at its own path.
    dpkg-divert --add then "leaves" it and renames nothing, and install used to rename the
    front over the real binary: the front then exec'd a binary that did not exist, and QEMU
    was gone.  Now the leftover goes from dpkg's database and QEMU is diverted again."""
    real = throwaway + divert.REAL_SUFFIX
    subprocess.run(["dpkg-divert", "--local", "--no-rename", "--divert", real, "--add",
                    throwaway], capture_output=True, check=True)
    apt = tmp_path / "apt"
    apt.mkdir()
    divert.install(throwaway, str(apt))
    assert Path(real).read_text() == script(1)  # the real binary, intact, diverted
    assert front.read_status(throwaway).installed
    assert runs(throwaway, "--version") == "real-qemu-1 --version\n"
    assert f"{throwaway} to {real}" in diversions(throwaway)
    assert divert.uninstall(throwaway, str(apt))
    assert Path(throwaway).read_text() == script(1)
    assert throwaway not in diversions(throwaway)

    # The same leftover, undone by uninstall instead: it only leaves dpkg's database.
    subprocess.run(["dpkg-divert", "--local", "--no-rename", "--divert", real, "--add",
                    throwaway], capture_output=True, check=True)
    status = kvmaccel("front", "status", "--qemu", throwaway)
    assert "a leftover of kvmaccel's" in status.stdout, status.stdout
    done = divert.uninstall(throwaway, str(apt))
    assert done is not None and "leftover" in done
    assert Path(throwaway).read_text() == script(1) and not os.path.lexists(real)
    assert throwaway not in diversions(throwaway)


def test_install_refuses_a_diversion_of_someone_elses(throwaway: str, tmp_path: Path) -> None:
    other = throwaway + ".distrib"
    subprocess.run(["dpkg-divert", "--local", "--no-rename", "--divert", other, "--add",
                    throwaway], capture_output=True, check=True)
    proc = kvmaccel("front", "install", "--divert", "--qemu", throwaway)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"diverted to {other}" in lines[0], lines
    assert "not by kvmaccel" in lines[0] and "remove that diversion first" in lines[0]
    assert Path(throwaway).read_text() == script(1)
    assert not os.path.lexists(throwaway + divert.REAL_SUFFIX)
    assert not os.path.lexists(os.path.join(divert.APT_CONF_DIR, divert.APT_HOOK_NAME))
    assert f"to {other}" in diversions(throwaway)  # theirs, untouched


def test_uninstall_without_the_diversion_leaves_the_front(throwaway: str,
                                                          tmp_path: Path) -> None:
    """The diversion removed from dpkg's database behind kvmaccel's back: uninstall used to
    remove the front, find no diversion to undo, report success, and leave nothing at
    QEMU's path.  Now the front stays (it still execs the real binary) and uninstall says
    what to do, exit 1."""
    apt = tmp_path / "apt"
    apt.mkdir()
    real = throwaway + divert.REAL_SUFFIX
    divert.install(throwaway, str(apt))
    undivert(throwaway)  # behind kvmaccel's back
    proc = kvmaccel("front", "uninstall", "--qemu", throwaway)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "left the front in place" in lines[0], lines
    assert f"mv {real} {throwaway}" in lines[0]
    assert front.read_status(throwaway).installed
    assert runs(throwaway, "--version") == "real-qemu-1 --version\n"  # QEMU still runs
    assert Path(real).read_text() == script(1)
    status = kvmaccel("front", "status", "--qemu", throwaway)
    assert "does not divert it" in status.stdout, status.stdout

    # The path emptied too (an install or uninstall that died between its renames): the
    # real binary goes back, as nothing is there to lose.
    os.unlink(throwaway)
    done = divert.uninstall(throwaway, str(apt))
    assert done is not None and "moved" in done
    assert Path(throwaway).read_text() == script(1) and not os.path.lexists(real)
    assert list(apt.iterdir()) == []


def test_uninstall_with_the_real_binary_missing_leaves_everything(throwaway: str,
                                                                  tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    real = throwaway + divert.REAL_SUFFIX
    divert.install(throwaway, str(apt))
    os.rename(real, str(tmp_path / "saved"))
    with pytest.raises(HookError, match="missing or not a file; left the front"):
        divert.uninstall(throwaway, str(apt))
    assert front.read_status(throwaway).installed
    assert f"to {real}" in diversions(throwaway)
    os.rename(str(tmp_path / "saved"), real)  # the package reinstalled: uninstall works
    assert divert.uninstall(throwaway, str(apt))
    assert Path(throwaway).read_text() == script(1)


def build_deb(tmp_path: Path, version: int) -> str:
    root = tmp_path / f"deb-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}.0\nArchitecture: all\n"
        "Maintainer: kvmaccel tests <tests@invalid>\n"
        "Description: stand-in QEMU binary for kvmaccel's divert tests\n")
    binary = root / THROWAWAY.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text(script(version))
    binary.chmod(0o755)
    out = str(tmp_path / f"{PACKAGE}_{version}.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), out],
                   capture_output=True, check=True)
    return out


def test_a_dpkg_upgrade_lands_on_the_diverted_name(throwaway: str, tmp_path: Path) -> None:
    """The package's next version goes to the diverted name: the front stays at QEMU's
    path and execs the new binary; uninstall puts the new binary back."""
    os.unlink(throwaway)  # the package ships it
    subprocess.run(["dpkg", "-i", build_deb(tmp_path, 1)], capture_output=True, check=True)
    assert runs(throwaway) == "real-qemu-1\n"
    apt = tmp_path / "apt"
    apt.mkdir()
    divert.install(throwaway, str(apt))
    subprocess.run(["dpkg", "-i", build_deb(tmp_path, 2)], capture_output=True, check=True)
    real = throwaway + divert.REAL_SUFFIX
    assert Path(real).read_text() == script(2)
    assert front.read_status(throwaway).installed
    assert runs(throwaway, "-S") == "real-qemu-2 -S\n"
    assert divert.uninstall(throwaway, str(apt))
    assert Path(throwaway).read_text() == script(2) and not os.path.lexists(real)
    subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True, check=True)
    assert not os.path.lexists(throwaway)  # dpkg owned it again, and removed it


REAL_QEMU = "/usr/bin/qemu-system-x86_64"


def test_a_round_trip_on_the_hosts_qemu(tmp_path: Path) -> None:
    """``front install --divert`` on the real QEMU, ``--version`` through the front, and
    ``uninstall``: the binary at QEMU's path is the very same bytes afterwards."""
    need_dpkg()
    need(os.path.isfile(REAL_QEMU) and not front.read_status(REAL_QEMU).installed,
         f"needs {REAL_QEMU} (not a front)")
    saved = str(tmp_path / "qemu-saved")
    shutil.copy2(REAL_QEMU, saved)
    hook = os.path.join(divert.APT_CONF_DIR, divert.APT_HOOK_NAME)
    assert not os.path.lexists(hook) and REAL_QEMU not in diversions(REAL_QEMU)
    expected = runs(saved, "--version")
    try:
        proc = kvmaccel("front", "install", "--divert")
        assert proc.returncode == 0, proc.stderr
        assert front.read_status(REAL_QEMU).diverted
        assert runs("qemu-system-x86_64", "--version") == expected
        proc = kvmaccel("front", "uninstall")
        assert proc.returncode == 0, proc.stderr
        assert "is the real QEMU again" in proc.stdout
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            undivert(REAL_QEMU)
        intact = (os.path.isfile(REAL_QEMU) and not os.path.islink(REAL_QEMU)
                  and filecmp.cmp(REAL_QEMU, saved, shallow=False))
        if not intact:
            tmp = REAL_QEMU + ".kvmaccel-test-restore"
            shutil.copy2(saved, tmp)
            os.rename(tmp, REAL_QEMU)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(REAL_QEMU + divert.REAL_SUFFIX)
        remove_our_apt_hook()
    subprocess.run(["cmp", saved, REAL_QEMU], check=True)
    assert not os.path.lexists(REAL_QEMU + divert.REAL_SUFFIX) and not os.path.lexists(hook)
    assert REAL_QEMU not in diversions(REAL_QEMU)
