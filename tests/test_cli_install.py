"""scripts/install.sh, as an operator of a Debian 12 host runs it: into a temporary prefix
with Debian's own /usr/bin/python3 and its python3-libvirt, python3-click and python3-psutil;
then ``kvmaccel --version``, ``hook install`` and ``doctor`` from the installed command, an
upgrade that keeps the hook's config, and an uninstall that leaves nothing."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need

TOP = Path(__file__).resolve().parents[1]
SCRIPT = TOP / "scripts" / "install.sh"
DEBIAN_PYTHON = "/usr/bin/python3"


def _debian_python_ready() -> bool:
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return False
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import venv, libvirt, click, psutil"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def debian_python() -> None:
    need(_debian_python_ready(), f"{DEBIAN_PYTHON} with python3-libvirt, python3-click, "
         "python3-psutil and python3-venv (scripts/test.sh installs them)")


def _run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # nothing of ours
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          check=check, timeout=300)


def _hook_sys_path(hook: Path) -> list[str]:
    line = next(x for x in hook.read_text().splitlines() if x.startswith("sys.path[:0] = "))
    value = ast.literal_eval(line.split("=", 1)[1].strip())
    assert isinstance(value, list)
    return [str(p) for p in value]


def test_install_run_upgrade_uninstall(tmp_path: Path, debian_python: None) -> None:
    prefix, bin_dir, libvirt = tmp_path / "kvmaccel", tmp_path / "bin", tmp_path / "lv"
    libvirt.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _run(SCRIPT, "--prefix", prefix, "--bin-dir", bin_dir, "--libvirt-dir", libvirt, "--no-apt")
    kvmaccel = bin_dir / "kvmaccel"
    assert kvmaccel.is_symlink() and os.readlink(kvmaccel) == f"{prefix}/bin/kvmaccel"
    # Its own environment, made by Debian's Python, serving Debian's packages.
    cfg = (prefix / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    assert os.path.realpath(prefix / "bin" / "python") == os.path.realpath(DEBIAN_PYTHON)
    out = _run(kvmaccel, "--version").stdout
    assert "kvmaccel, version" in out

    # The hook the install wrote runs that environment's Python, and finds Debian's
    # libvirt, click and psutil although it runs without site (-S).
    hook = libvirt / "hooks" / "qemu.d" / "kvmaccel"
    assert f"exec {prefix}/bin/python -S -c" in hook.read_text()
    code = (f"import sys; sys.path[:0] = {_hook_sys_path(hook)!r}; import libvirt, click, "
            "psutil, kvmaccel.libvirt.full, kvmaccel.libvirt.entry; print(kvmaccel.__file__)")
    where = _run(prefix / "bin" / "python", "-S", "-c", code).stdout.strip()
    assert where.startswith(str(prefix))

    # `hook install` from the installed command, with a config; `doctor` reports on it.
    config = tmp_path / "kvmaccel.toml"
    config.write_text("strict = false\n")
    _run(kvmaccel, "hook", "install", "--libvirt-dir", libvirt, "--config", config)
    doctor = _run(kvmaccel, "doctor", "--libvirt-dir", libvirt, "--config", config,
                  "--no-guests", check=False)
    assert doctor.returncode in (0, 1), doctor.stderr
    lines = doctor.stdout.splitlines()
    assert any(f"python {prefix}/bin/python" in x and "hook:" in x for x in lines), lines
    assert any(x.startswith("ok    kvmaccel:") and str(prefix) in x for x in lines), lines
    assert "not installed (kvmaccel front install)" in doctor.stdout

    # An upgrade keeps the hook's config.
    _run(SCRIPT, "--prefix", prefix, "--bin-dir", bin_dir, "--libvirt-dir", libvirt, "--no-apt")
    assert f'config_path="{config}"' in hook.read_text()

    _run(SCRIPT, "--uninstall", "--prefix", prefix, "--bin-dir", bin_dir)
    config.unlink()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before


def test_install_refuses_a_prefix_it_did_not_make(tmp_path: Path, debian_python: None) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep").write_text("x")
    r = _run(SCRIPT, "--prefix", tmp_path / "other", "--bin-dir", tmp_path / "bin",
             "--libvirt-dir", "", "--no-apt", check=False)
    assert r.returncode != 0 and "not a kvmaccel install" in r.stderr
    assert (tmp_path / "other" / "keep").read_text() == "x"
    assert not (tmp_path / "bin").exists()
