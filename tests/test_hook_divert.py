"""``kvmaccel front install --divert`` (kvmaccel/hook/divert.py) on a stand-in QEMU binary.

dpkg-divert is real (it records the diversion in dpkg's database, and the test removes it);
the "QEMU" is a script in a temporary directory, so the host's QEMU is never touched.  What a
QEMU upgrade does to the diverted binary (dpkg unpacks the new file beside it and renames it
over the old one) is played by hand, then the apt hook's command runs as apt would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvmaccel.errors import HookError
from kvmaccel.hook import divert, front

pytestmark = pytest.mark.root


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    if os.geteuid() != 0 or shutil.which("dpkg-divert") is None:
        pytest.skip("needs root and dpkg-divert")
    path = tmp_path / "qemu-system-x86_64"
    path.write_text("#!/bin/sh\necho real-qemu-1 \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def diversions(path: str) -> str:
    return subprocess.run(["dpkg-divert", "--list", path], capture_output=True, text=True,
                          check=True).stdout


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
        out = subprocess.run([fake_qemu, "-machine", "none"], capture_output=True, text=True,
                             check=True).stdout
        assert out == "real-qemu-1 -machine none\n"  # the front execs the real one
        hook = (apt / divert.APT_HOOK_NAME).read_text()
        assert hook.startswith(divert.APT_MARKER)
        with pytest.raises(HookError, match="itself kvmaccel's front"):
            divert.install(fake_qemu, str(apt))

        # A QEMU upgrade: dpkg writes the new binary beside the diverted name and renames it
        # over it.  The apt hook then touches the front, whose ctime libvirt's capability
        # cache is keyed on.
        time.sleep(1.1)  # stat %Z has one-second resolution
        new = Path(real + ".dpkg-new")
        new.write_text("#!/bin/sh\necho real-qemu-2 \"$@\"\n")
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
        out = subprocess.run([fake_qemu], capture_output=True, text=True, check=True).stdout
        assert out == "real-qemu-2\n"
    finally:
        assert divert.uninstall(fake_qemu, str(apt))
    assert Path(fake_qemu).read_text().startswith("#!/bin/sh\necho real-qemu-2")
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
    assert Path(fake_qemu).read_text().startswith("#!/bin/sh\necho real-qemu-1")
