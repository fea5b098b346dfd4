"""``kvmaccel pool keep --daemon`` (kvmaccel/setup/keeper.py): its start tells the truth, one
keeper runs at a time, and its pidfile never follows a symlink.

Each keeper runs in a mount namespace that sees only the test's own tmpfs mounts
(:func:`tests.test_pool_squat.isolated`), so that its passes never scrub anyone else's pool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from .conftest import private_mount
from .test_pool_isolation import NOBODY, as_nobody
from .test_pool_squat import isolated

ROUNDS = 30


def write_config(tmp_path: str, shm_dir: str, run_dir: str) -> str:
    """A keeper with nothing to fill (no targets): it scrubs what it finds and waits."""
    path = os.path.join(tmp_path, "kvmaccel.toml")
    with open(path, "w") as f:
        f.write(f'run_dir = "{run_dir}"\nlog_file = "{tmp_path}/log/hook.log"\n'
                "[pool]\nkeep_domains = false\nkeep_free_mib = 0\n")
    return path


def keep_daemon(config: str, pidfile: str, mounts: list[str]
                ) -> subprocess.CompletedProcess[str]:
    return isolated([sys.executable, "-m", "kvmaccel", "pool", "keep", "--config", config,
                     "--daemon", "--interval", "3600", "--pidfile", pidfile], mounts)


def keepers(config: str) -> list[int]:
    """The pids of every live ``pool keep`` of this config (parents, daemons)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if config.encode() in argv and b"keep" in argv and not zombie:
            found.append(int(name))
    return found


def stop(pid: int, config: str) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while keepers(config):
        assert time.monotonic() < deadline, f"keeper {pid} did not stop"
        time.sleep(0.02)


@pytest.fixture
def stop_keepers(tmp_path: str) -> Iterator[list[str]]:
    """Configs whose keepers are killed at the end whatever happened."""
    configs: list[str] = []
    yield configs
    for config in configs:
        for pid in keepers(config):
            os.kill(pid, signal.SIGKILL)


def test_a_keeper_that_dies_at_once_is_an_error(tmp_path: str, shm_dir: str, run_dir: str,
                                                stop_keepers: list[str]) -> None:
    """The daemon cannot open its log (a directory is at its name): it stops right after
    the fork.  ``--daemon`` used to say "keeper started" all the same, exit 0."""
    config = write_config(str(tmp_path), shm_dir, run_dir)
    stop_keepers.append(config)
    os.makedirs(os.path.join(str(tmp_path), "log", "pool-keep.log"))
    pidfile = os.path.join(str(tmp_path), "keep.pid")
    proc = keep_daemon(config, pidfile, [shm_dir])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "keeper started" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the keeper stopped as it started" in lines[0], lines
    assert "pool-keep.log" in lines[0]  # the reason: its log cannot be opened
    assert not os.path.lexists(pidfile)  # nothing left behind
    assert keepers(config) == []


def test_two_keepers_never_run_together(tmp_path: str, shm_dir: str, run_dir: str,
                                        stop_keepers: list[str]) -> None:
    """Two ``--daemon`` starts at once: each used to check the pidfile before its fork and
    write it after, so both could pass the check and run.  Now the pidfile's lock is taken
    before the fork and held by the daemon: exactly one runs, every time."""
    config = write_config(str(tmp_path), shm_dir, run_dir)
    stop_keepers.append(config)
    pidfile = os.path.join(str(tmp_path), "keep.pid")
    overlapped = 0
    for _ in range(ROUNDS):
        results: list[tuple[float, float, subprocess.CompletedProcess[str]]] = []
        go = threading.Barrier(2)

        def start(go: threading.Barrier = go, results: list[tuple[
                float, float, subprocess.CompletedProcess[str]]] = results) -> None:
            go.wait()
            t0 = time.monotonic()
            proc = keep_daemon(config, pidfile, [shm_dir])
            results.append((t0, time.monotonic(), proc))

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (a0, a1, a), (b0, b1, b) = results
        overlapped += max(a0, b0) < min(a1, b1)  # the race fired: both were starting
        started = [p for p in (a, b) if p.returncode == 0]
        refused = [p for p in (a, b) if p.returncode != 0]
        assert len(started) == 1, [(p.returncode, p.stdout, p.stderr) for p in (a, b)]
        assert refused[0].returncode == 2 and "a keeper already runs" in refused[0].stderr
        live = keepers(config)
        assert len(live) == 1, live
        assert "keeper started" in started[0].stdout
        with open(pidfile) as f:
            assert int(f.read()) == live[0]
        stop(live[0], config)
        assert not os.path.lexists(pidfile)
    assert overlapped > 0


def next_pids(count: int) -> list[int]:
    """The pids the next ``count`` processes will likely get."""
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    return [300 + (last + i - 300) % (pid_max - 300) for i in range(1, count + 1)]


PLANT = r"""
import os, sys
directory, victim = sys.argv[1], sys.argv[2]
for pid in sys.argv[3].split(","):
    os.symlink(victim, os.path.join(directory, "keep.pid." + pid))
if len(sys.argv) > 4:
    os.symlink(victim, os.path.join(directory, "keep.pid"))
"""


def test_the_pidfile_never_follows_a_symlink(tmp_path: str, shm_dir: str, run_dir: str,
                                             stop_keepers: list[str]) -> None:
    """The pidfile was written as ``<pidfile>.<pid>`` with ``open(..., "w")``: a symlink at
    that name, which anyone able to write the directory could plant for the next pids,
    made the keeper truncate and write the file it points to (here a root file).  Now the
    pidfile is opened O_NOFOLLOW in its checked directory and written by descriptor."""
    config = write_config(str(tmp_path), shm_dir, run_dir)
    stop_keepers.append(config)
    victim = os.path.join(str(tmp_path), "root-only")
    with open(victim, "w") as f:
        f.write("root's own\n")
    os.chmod(victim, 0o600)

    def untouched() -> None:
        with open(victim) as f:
            assert f.read() == "root's own\n"

    with private_mount("tmpfs", "mode=1777", prefix="kvtest-pid-") as sticky:
        # A directory another user owns: refused outright, nothing written.
        theirs = os.path.join(shm_dir, "theirs")
        os.mkdir(theirs, 0o755)
        os.chown(theirs, NOBODY, NOBODY)
        plant = as_nobody(PLANT, theirs, victim, ",".join(map(str, next_pids(4000))))
        assert plant.wait() == 0
        proc = keep_daemon(config, os.path.join(theirs, "keep.pid"), [shm_dir, sticky])
        untouched()
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "uid 65534's" in proc.stderr and "only root can write" in proc.stderr
        assert not os.path.lexists(os.path.join(theirs, "keep.pid"))

        # A sticky directory (as /tmp): a symlink at the pidfile's own name is refused and
        # left; with it gone, the keeper runs beside the planted temporary names.
        plant = as_nobody(PLANT, sticky, victim, ",".join(map(str, next_pids(4000))), "+")
        assert plant.wait() == 0
        pidfile = os.path.join(sticky, "keep.pid")
        proc = keep_daemon(config, pidfile, [shm_dir, sticky])
        untouched()
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "is not a keeper's pidfile (not a regular file)" in proc.stderr
        assert os.path.islink(pidfile)
        os.unlink(pidfile)  # what its owner would do
        proc = keep_daemon(config, pidfile, [shm_dir, sticky])
        untouched()
        assert proc.returncode == 0, proc.stderr
        (pid,) = keepers(config)
        st = os.lstat(pidfile)
        assert st.st_uid == 0 and st.st_nlink == 1 and not os.path.islink(pidfile)
        with open(pidfile) as f:
            assert f.read() == f"{pid}\n"
        stop(pid, config)
        untouched()
