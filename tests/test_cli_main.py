"""The populate and release commands, run as a user would: as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import populating_bytes

MIB = 1 << 20


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def test_populate_json_and_release(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "guest")
    proc = kvmaccel("populate", path, "--size", "64M", "--nodes", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["path"] == path and summary["bytes"] == 64 * MIB
    assert summary["bytes_per_node"] == {"0": 64 * MIB}
    assert summary["gib_per_s"] > 0 and summary["threads"] >= 1
    assert os.stat(path).st_size == 64 * MIB
    proc = kvmaccel("release", path)
    assert proc.returncode == 0 and "released 64M" in proc.stdout
    assert not os.path.exists(path)


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--size", "8Q"], "invalid size '8Q'", 2),
    (["--size", "0"], "must be greater than zero", 2),
    (["--size", "8M", "--nodes", "0-"], "invalid CPU or node list", 2),
    (["--size", "8M", "--nodes", "7"], "node 7 does not exist; this host has node(s) 0", 2),
    (["--size", "8M", "--threads", "0"], "threads must be at least 1", 2),
    (["--size", "8M", "--mode", "rw"], "invalid --mode", 2),
    (["--size", "8M", "--owner", "no-such-user-kv"], "unknown user 'no-such-user-kv' in --owner",
     2),
    (["--size", "64T"], "free but 64T is needed", 3),
])
def test_bad_input_one_line_nothing_left(shm_dir: str, args: list[str], message: str,
                                         code: int) -> None:
    path = os.path.join(shm_dir, "bad")
    proc = kvmaccel("populate", path, *args)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmaccel: error: "), proc.stderr
    assert message in lines[0]
    assert not os.path.exists(path)
    assert os.listdir(shm_dir) == []


def test_missing_directory(shm_dir: str) -> None:
    proc = kvmaccel("populate", os.path.join(shm_dir, "no", "such"), "--size", "8M")
    assert proc.returncode == 1
    assert "create the directory first" in proc.stderr


def test_release_refuses_foreign_file(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "foreign")
    with open(path, "w") as f:
        f.write("keep me")
    proc = kvmaccel("release", path)
    assert proc.returncode == 1 and "not created by kvmaccel" in proc.stderr
    with open(path) as f:
        assert f.read() == "keep me"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_cancels_and_leaves_nothing(shm_dir: str, run_dir: str, signum: int) -> None:
    path = os.path.join(shm_dir, "big")
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "populate", path, "--size", "6G",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until population is under way
        if populating_bytes(proc.pid, shm_dir) >= 256 * MIB:
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("population never started")
    t0 = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5, "cancel was not prompt"
    assert proc.returncode == 130, err
    assert "cancelled" in err
    assert not os.path.exists(path) and os.listdir(shm_dir) == []
    records = os.path.join(run_dir, "files")
    assert not os.path.isdir(records) or os.listdir(records) == []


def test_progress_bar_on_a_tty(shm_dir: str) -> None:
    """On a terminal (util-linux's script gives one) populate draws a progress bar."""
    import shlex
    import shutil

    if shutil.which("script") is None:
        pytest.fail("util-linux's script is missing (Debian: bsdutils)")
    path = os.path.join(shm_dir, "tty")
    command = shlex.join([sys.executable, "-m", "kvmaccel", "populate", path, "--size", "512M"])
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stdout
    assert "populating" in proc.stdout and "100%" in proc.stdout
    assert f"{path}: 512M of tmpfs 4K in " in proc.stdout


def test_the_places_a_command_and_the_hook_resolve(tmp_path: object) -> None:
    """Today's precedence, per entry point: the record file is $KVMACCEL_RECORD_FILE, else
    the config's, else the default; the run dir is the hook's config's (over the variable),
    for a command the variable, else /run/kvmaccel; the filler dir follows the run dir."""
    from kvmaccel import paths
    from kvmaccel.cli.main import places_from

    config = f"{tmp_path}/k.toml"
    with open(config, "w") as f:
        f.write('record_file = "/x/records.jsonl"\nrun_dir = "/x/run"\n')
    env = {"KVMACCEL_CONFIG": config}
    command = places_from(env)
    assert command == paths.Places(config, paths.DEFAULT_RUN_DIR, "/x/records.jsonl",
                                   paths.DEFAULT_STATE_DIR, "/run/kvmaccel/fillers")
    assert places_from({**env, "KVMACCEL_RECORD_FILE": "/y.jsonl"}).record_file == "/y.jsonl"
    assert places_from({"KVMACCEL_CONFIG": f"{tmp_path}/missing.toml"}).record_file == (
        paths.DEFAULT_RECORD_FILE)
    hook = paths.resolve({"KVMACCEL_RUN_DIR": "/env/run"}, config_file=config,
                         run_dir="/x/run", record_file="/x/records.jsonl")
    assert (hook.run_dir, hook.filler_dir, hook.record_file) == (
        "/x/run", "/x/run/fillers", "/x/records.jsonl")
    assert paths.resolve(hook.environment()) == hook  # what a started process resolves
