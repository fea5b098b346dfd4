"""Bad input and hostile conditions at the command line: each gets one clear line, the exit
code README.md gives, and nothing left behind (issue: the review's smaller findings)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from .conftest import populating_bytes
from .test_cli_main import kvmaccel
from .test_pool_isolation import ATTACKER_PYTHON

MIB = 1 << 20
NOBODY = 65534


def run(*args: str, env: dict[str, str] | None = None, umask: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120, env=env,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmaccel: error: "), proc.stderr[:2000]
    assert len(lines[0]) < 400, lines[0][:400]
    return lines[0]


def test_a_symlink_then_dotdot_does_not_pass_the_filesystem_check(shm_dir: str,
                                                                   tmp_path: str) -> None:
    """``tmpfs/link/../name``: read lexically it is on tmpfs; the kernel puts it beside the
    link's target, on ext4.  The check is made on the directory the file is created in."""
    os.mkdir(os.path.join(str(tmp_path), "sub"))
    os.symlink(os.path.join(str(tmp_path), "sub"), os.path.join(shm_dir, "link"))
    proc = kvmaccel("populate", os.path.join(shm_dir, "link", "..", "guest"), "--size", "4M")
    assert proc.returncode == 2
    assert "is not on hugetlbfs or tmpfs" in one_line(proc)
    assert not os.path.exists(os.path.join(str(tmp_path), "guest"))
    assert sorted(os.listdir(shm_dir)) == ["link"]


def test_two_runs_for_one_path_cannot_both_win(shm_dir: str, run_dir: str) -> None:
    """Two populates of one path: the second used to reuse the first's file and report it
    done, and the first's cancel then deleted it.  Now each populates a file of its own,
    unnamed, and only a complete one is named."""
    path = os.path.join(shm_dir, "guest")
    args = [sys.executable, "-m", "kvmaccel", "populate", path, "--size", "3G", "--threads", "1"]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(first.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    second = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while populating_bytes(second.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    assert first.poll() is None and second.poll() is None, "too fast to race"
    first.send_signal(signal.SIGTERM)
    _, err1 = first.communicate(timeout=60)
    _, err2 = second.communicate(timeout=120)
    assert first.returncode == 130, err1
    assert second.returncode == 0, err2
    st = os.stat(path)  # what the second reported done is there, whole
    assert st.st_size == 3 << 30 and st.st_blocks * 512 == 3 << 30
    assert kvmaccel("release", path).returncode == 0


def test_a_second_run_that_finds_the_name_taken_keeps_nothing(shm_dir: str) -> None:
    """A name that appears while a populate runs (another run, another user) is never
    replaced: the run fails with one line and its own file goes with it."""
    path = os.path.join(shm_dir, "guest")
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "populate", path, "--size", "2G",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(proc.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    with open(path, "w") as f:
        f.write("someone else's")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "appeared while kvmaccel populated it" in err
    with open(path) as f:
        assert f.read() == "someone else's"
    assert os.listdir(shm_dir) == ["guest"]


def test_node_and_cpu_lists_are_bounded_before_expansion(shm_dir: str, tmp_path: str) -> None:
    t0 = time.monotonic()
    proc = kvmaccel("populate", os.path.join(shm_dir, "g"), "--size", "4M",
                    "--nodes", "0-3000000")
    assert proc.returncode == 2 and "above the kernel's limit of 1023" in one_line(proc)
    assert time.monotonic() - t0 < 10 and os.listdir(shm_dir) == []
    xml = os.path.join(str(tmp_path), "d.xml")
    with open(xml, "w") as f:
        f.write("<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory>"
                "<numatune><memory mode='strict' nodeset='0-3000000'/></numatune>"
                "<os><type arch='x86_64'>hvm</type></os></domain>")
    proc = kvmaccel("plan", xml)
    assert proc.returncode == 2 and "limit of 1023" in one_line(proc)


def test_owner_and_mode_are_range_checked(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "g")
    proc = kvmaccel("populate", path, "--size", "4M", "--owner", "99999999999")
    assert proc.returncode == 2 and "above the largest possible" in one_line(proc)
    proc = kvmaccel("populate", path, "--size", "4M", "--mode", "4755")
    assert proc.returncode == 2 and "setuid" in one_line(proc)
    assert os.listdir(shm_dir) == []


def test_the_filesystem_and_page_size_mistakes_are_usage_errors(hugetlbfs: str,
                                                                 tmp_path: str) -> None:
    """Exit 2, as README.md says for bad input."""
    proc = kvmaccel("populate", os.path.join(hugetlbfs, "g"), "--size", "3M")
    assert proc.returncode == 2 and "not a multiple of its 2048 KiB pages" in one_line(proc)
    proc = kvmaccel("populate", os.path.join(str(tmp_path), "g"), "--size", "4M")
    assert proc.returncode == 2 and "not on hugetlbfs or tmpfs" in one_line(proc)
    assert os.listdir(hugetlbfs) == [] and not os.path.exists(os.path.join(str(tmp_path), "g"))


def modes(top: str) -> dict[str, int]:
    out = {}
    for where, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(where, name)
            out[os.path.relpath(path, top)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_state_is_private_under_umask_000(shm_dir: str, tmp_path: str) -> None:
    """Run and pool state, slot files: directories 0700 and files 0600 whatever the umask
    (any local user could otherwise rewrite a pool state to 'clean', or hold every slot)."""
    run_dir = os.path.join(str(tmp_path), "fresh", "run")
    env = {**os.environ, "KVMACCEL_RUN_DIR": run_dir}
    assert run("populate", os.path.join(shm_dir, "g"), "--size", "1G", "--threads", "2",
               "--ignore-load", env=env, umask=0).returncode == 0
    assert run("pool", "fill", "--dir", shm_dir, "--size", "4M", env=env,
               umask=0).returncode == 0
    found = modes(os.path.join(str(tmp_path), "fresh"))
    assert any(p.startswith("run/slots/slot-") for p in found)
    assert any(p.startswith("run/files/") for p in found)
    assert any(p.startswith("run/pool/") and p.endswith(".json") for p in found)
    for path, mode in found.items():
        is_dir = os.path.isdir(os.path.join(str(tmp_path), "fresh", path))
        assert mode == (0o700 if is_dir else 0o600), (path, oct(mode))
    # So nobody else can open a slot, and holding one needs only an open file.
    slot = next(p for p in found if p.startswith("run/slots/slot-"))
    probe = subprocess.run(
        [ATTACKER_PYTHON, "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY)",
         os.path.join(str(tmp_path), "fresh", slot)],
        preexec_fn=lambda: (os.setgroups([]), os.setgid(NOBODY), os.setuid(NOBODY)),
        capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pool_fill_cancels_and_leaves_nothing(shm_dir: str, run_dir: str, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "pool", "fill", "--dir", shm_dir,
                             "--size", "4G"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(proc.pid, shm_dir) < 256 * MIB:
        assert time.monotonic() < deadline, "the fill never started"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "cancelled" in err, err
    assert os.listdir(os.path.join(shm_dir, ".kvmaccel-pool")) == []
    states = [n for _, _, files in os.walk(os.path.join(run_dir, "pool")) for n in files
              if n.endswith(".json")]
    records = os.path.join(run_dir, "files")
    assert states == [] and (not os.path.isdir(records) or os.listdir(records) == [])
