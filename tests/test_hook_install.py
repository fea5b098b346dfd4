"""kvmaccel.setup.install and ``kvmaccel hook install|uninstall|status`` in a temporary libvirt
directory, with an existing hooks/qemu that must keep working; and the installed script run
as libvirt runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from kvmaccel.cli.main import main
from kvmaccel.errors import HookError
from kvmaccel.libvirt import full as hook
from kvmaccel.libvirt import state as hook_state
from kvmaccel.paths import DEFAULT_RUN_DIR
from kvmaccel.setup import install as hook_install

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXISTING = "#!/bin/sh\necho existing hook ran >> \"$(dirname \"$0\")/ran\"\n"


@pytest.fixture
def libvirt_dir(tmp_path: object) -> str:
    d = f"{tmp_path}/libvirt"
    os.makedirs(f"{d}/hooks")
    with open(f"{d}/hooks/qemu", "w") as f:
        f.write(EXISTING)
    os.chmod(f"{d}/hooks/qemu", 0o755)
    return d


def test_source_tree_hook_is_the_rendered_script() -> None:
    with open(f"{TOP}/hooks/qemu") as f:
        assert f.read() == hook_install.render_script("/usr/bin/env python3", None)
    assert os.access(f"{TOP}/hooks/qemu", os.X_OK)


def test_script_checks_the_same_operations_as_the_hook() -> None:
    text = hook_install.render_script("/x", None)
    case = text.split('case "$2 $3" in\n', 1)[1].splitlines()[0].strip().rstrip(") ;")
    pairs = {tuple(p.strip('"').split()) for p in case.split("|")}
    assert pairs == set(hook.HANDLED_OPS)


def test_install_keeps_the_existing_hook(libvirt_dir: str) -> None:
    st = hook_install.install(libvirt_dir, config_path="/etc/k.toml")
    path = f"{libvirt_dir}/hooks/qemu.d/kvmaccel"
    assert st.installed and st.ours and st.path == path and st.python == sys.executable
    assert st.python_ok and st.main_hook == f"{libvirt_dir}/hooks/qemu"
    assert os.stat(path).st_mode & 0o777 == 0o755
    with open(path) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh\n# kvmaccel-hook: ")
    assert f"exec {sys.executable} -S -c " in text
    assert 'config_path="/etc/k.toml"' in text
    with open(f"{libvirt_dir}/hooks/qemu") as f:
        assert f.read() == EXISTING
    # Reinstalling is an upgrade; uninstalling removes qemu.d (install made it) but not
    # hooks/ (it was there before) nor hooks/qemu.
    hook_install.install(libvirt_dir)
    assert hook_install.uninstall(libvirt_dir) == [path, f"{libvirt_dir}/hooks/qemu.d"]
    assert os.listdir(f"{libvirt_dir}/hooks") == ["qemu"]
    assert hook_install.uninstall(libvirt_dir) == []
    assert not hook_install.status(libvirt_dir).installed


def test_install_writes_the_hook_whole_and_follows_no_link(libvirt_dir: str) -> None:
    """The hook went through a fixed temporary name opened by path (``.kvmaccel-tmp``): a
    symlink there was followed, and libvirt runs every executable in ``qemu.d``."""
    qemu_d = f"{libvirt_dir}/hooks/qemu.d"
    os.makedirs(qemu_d)
    victim = f"{libvirt_dir}/victim"
    with open(victim, "w") as f:
        f.write("victim\n")
    os.symlink(victim, f"{qemu_d}/kvmaccel.kvmaccel-tmp")
    hook_install.install(libvirt_dir)
    with open(victim) as f:
        assert f.read() == "victim\n"
    assert sorted(os.listdir(qemu_d)) == ["kvmaccel", "kvmaccel.kvmaccel-tmp"]
    assert os.stat(f"{qemu_d}/kvmaccel").st_mode & 0o777 == 0o755


def test_install_into_a_bare_directory_and_back(tmp_path: object) -> None:
    d = f"{tmp_path}/etc-libvirt"
    os.makedirs(d)
    hook_install.install(d)
    hook_install.uninstall(d)
    assert os.listdir(d) == []


def test_foreign_file_is_refused(libvirt_dir: str) -> None:
    os.makedirs(f"{libvirt_dir}/hooks/qemu.d")
    with open(f"{libvirt_dir}/hooks/qemu.d/kvmaccel", "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    with pytest.raises(HookError, match="not written by kvmaccel"):
        hook_install.install(libvirt_dir)
    with pytest.raises(HookError, match="not written by kvmaccel"):
        hook_install.uninstall(libvirt_dir)
    assert os.path.exists(f"{libvirt_dir}/hooks/qemu.d/kvmaccel")
    st = hook_install.status(libvirt_dir)
    assert st.installed and not st.ours


def test_install_errors(tmp_path: object, libvirt_dir: str) -> None:
    with pytest.raises(HookError, match="is libvirt installed"):
        hook_install.install(f"{tmp_path}/none")
    with pytest.raises(HookError, match="absolute path"):
        hook_install.install(libvirt_dir, config_path="k.toml")
    with pytest.raises(HookError, match="executable absolute path"):
        hook_install.install(libvirt_dir, python="python3")


def test_cli_install_status_uninstall(libvirt_dir: str, tmp_path: object) -> None:
    runner = CliRunner()
    args = ["--libvirt-dir", libvirt_dir]
    r = runner.invoke(main, ["hook", "status", *args])
    assert r.exit_code == 1 and "not installed" in r.output
    config = f"{tmp_path}/k.toml"
    with open(config, "w") as f:
        f.write("strict = true\n")
    r = runner.invoke(main, ["hook", "install", *args, "--config", config])
    assert r.exit_code == 0, r.output
    assert "installed" in r.output and "kept" in r.output
    assert "SIGHUP" in r.output or "no libvirt daemon is running" in r.output
    r = runner.invoke(main, ["hook", "status", *args])
    assert r.exit_code == 0, r.output
    assert "strict = true" in r.output and f"other hook: {libvirt_dir}/hooks/qemu" in r.output
    with open(config, "w") as f:
        f.write("strict = maybe\n")
    r = runner.invoke(main, ["hook", "status", *args])
    assert "BROKEN, the hook fails open" in r.output
    r = runner.invoke(main, ["hook", "install", *args, "--config", config])
    assert r.exit_code == 2 and r.output.startswith("kvmaccel: error: ")
    r = runner.invoke(main, ["hook", "uninstall", *args])
    assert r.exit_code == 0 and "removed" in r.output


def test_installed_script_runs_as_libvirt_runs_it(libvirt_dir: str, tmp_path: object) -> None:
    config = f"{tmp_path}/k.toml"
    with open(config, "w") as f:
        f.write(f'enabled = false\nsyslog = false\nlog_file = "{tmp_path}/h.log"\n')
    st = hook_install.install(libvirt_dir, config_path=config)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C",  # libvirt cleans the environment
           "KVMACCEL_RECORD_FILE": os.environ["KVMACCEL_RECORD_FILE"]}  # (but the test's records)
    t0 = time.monotonic()
    ignored = subprocess.run([st.path, "g", "started", "begin", "-"], env=env,
                             capture_output=True, input=b"", check=False)
    assert (ignored.returncode, ignored.stdout, ignored.stderr) == (0, b"", b"")
    assert time.monotonic() - t0 < 2
    # Without starting Python at all: a python that does not exist is never run.
    fake = f"{tmp_path}/no-python"
    with open(st.path) as f:
        text = f.read().replace(f"exec {sys.executable} ", f"exec {fake} ")
    with open(st.path, "w") as f:
        f.write(text)
    ignored = subprocess.run([st.path, "g", "started", "begin", "-"], env=env,
                             capture_output=True, input=b"", check=False)
    assert (ignored.returncode, ignored.stderr) == (0, b"")
    assert subprocess.run([st.path, "g", "prepare", "begin", "-"], env=env,
                          capture_output=True, input=b"", check=False).returncode == 127
    st = hook_install.install(libvirt_dir, config_path=config)
    # Run as libvirt runs it, the hook keeps what it read of its config in /run/kvmaccel;
    # uninstalling removes it.
    snapshot = hook_state.snapshot_path(config, DEFAULT_RUN_DIR)
    try:
        handled = subprocess.run([st.path, "g", "prepare", "begin", "-"], env=env,
                                 capture_output=True, input=b"<domain/>", check=False)
        assert (handled.returncode, handled.stdout) == (0, b"")
        assert os.path.exists(snapshot)
        bad = subprocess.run([st.path, "only-one"], env=env, capture_output=True, check=False)
        assert bad.returncode == 2 and bad.stdout == b"" and b"usage" in bad.stderr
    finally:
        hook_install.uninstall(libvirt_dir)
    assert not os.path.exists(snapshot)
