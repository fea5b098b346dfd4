"""``kvmaccel run``: plans from QEMU's arguments, and real QEMU started with populated memory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kvmaccel.errors import UsageError
from kvmaccel.host.facts import read_host
from kvmaccel.launch.run import plan_launch, rewrite_argv
from kvmaccel.launch.status import qemu_status

from .conftest import need

MIB = 1 << 20
QEMU = "qemu-system-x86_64"
BASE = [QEMU, "-machine", "none", "-display", "none", "-nodefaults"]


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} did not exit"


@pytest.fixture
def qemu() -> str:
    need(shutil.which(QEMU) is not None, f"{QEMU} is not installed")
    return QEMU


@pytest.fixture
def daemon(tmp_path: os.PathLike[str]) -> Iterator[list[str]]:
    """``-daemonize -pidfile``: a started QEMU is killed at the end of the test."""
    pidfile = os.path.join(str(tmp_path), "qemu.pid")
    yield ["-daemonize", "-pidfile", pidfile]
    if os.path.exists(pidfile):
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read())
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)


def pid_of(daemon_args: list[str]) -> int:
    with open(daemon_args[-1], encoding="ascii") as f:
        return int(f.read())


# --- planning, no QEMU ---------------------------------------------------------------------

def test_plan_both_forms(hugetlbfs: str, shm_dir: str) -> None:
    argv = [*BASE, "-mem-prealloc",
            "-object", f"memory-backend-file,id=dir,size=64M,mem-path={hugetlbfs},share=on,"
                       "host-nodes=0,policy=bind",
            "-object", json.dumps({"qom-type": "memory-backend-memfd", "id": "fd", "size": 3 * MIB,
                                   "hugetlb": True, "hugetlbsize": 2 * MIB}),
            "-object", f"memory-backend-file,id=new,size=8M,mem-path={shm_dir}/f,share=on",
            "-object", f"memory-backend-file,id=priv,size=8M,mem-path={shm_dir}",
            "-object", "memory-backend-ram,id=ram,size=8M",
            "-object", "memory-backend-memfd,id=vm,size=8M",
            "-device", "virtio-mem-pci,id=vmem0,memdev=vm"]
    plan = plan_launch(argv, read_host())
    actions = {a.backend_id: a for a in plan.actions}
    assert actions["dir"].action == "tmpfile" and actions["dir"].nodes == (0,)
    assert actions["dir"].spec().tmpfile_dir == hugetlbfs
    assert actions["fd"].action == "memfd" and actions["fd"].page_size_kib == 2048
    assert actions["fd"].size_bytes == 4 * MIB  # rounded up to whole huge pages
    assert actions["new"].action == "file" and actions["new"].spec().path == f"{shm_dir}/f"
    assert actions["priv"].action == "skip" and "share=off" in actions["priv"].reason
    assert actions["ram"].action == "skip" and "anonymous" in actions["ram"].reason
    assert actions["vm"].action == "skip" and "virtio-mem" in actions["vm"].reason

    out = rewrite_argv(plan, {"dir": 7, "fd": 8})
    assert out[out.index("-mem-prealloc")] == "-mem-prealloc"  # still serves the others
    assert out[8] == ("memory-backend-file,id=dir,size=64M,mem-path=/proc/self/fd/7,share=on,"
                      "host-nodes=0,policy=bind,prealloc=off")
    assert json.loads(out[10]) == {"qom-type": "memory-backend-file", "id": "fd",
                                   "size": 3 * MIB, "share": True,
                                   "mem-path": "/proc/self/fd/8", "prealloc": False}
    assert out[12].endswith(",prealloc=off")
    assert out[14:] == argv[14:]


def test_existing_foreign_file_is_left_to_qemu(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "data")
    with open(path, "wb") as f:
        f.truncate(MIB)
    plan = plan_launch([QEMU, "-object", f"memory-backend-file,id=m,size=1M,mem-path={path},"
                        "share=on"], read_host())
    assert plan.actions[0].action == "skip"
    assert "not created by kvmaccel" in plan.actions[0].reason


def test_implicit_ram_is_private(hugetlbfs: str) -> None:
    plan = plan_launch([QEMU, "-m", "64M", "-mem-path", hugetlbfs], read_host())
    (action,) = plan.actions
    assert action.backend_id == "pc.ram" and action.action == "skip"
    assert "implicit RAM backend" in action.reason


@pytest.mark.parametrize(("obj", "message"), [
    ("memory-backend-file,id=m,size=8M,mem-path=/dev/shm,share=on,host-nodes=0",
     "host-nodes needs a policy other than default"),
    ("memory-backend-file,id=m,size=8M,mem-path=/dev/shm,share=on,policy=bind",
     "policy=bind needs host-nodes"),
])
def test_policy_checks(obj: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_launch([QEMU, "-object", obj], read_host())


@pytest.mark.parametrize(("args", "message"), [
    (["-object", '{"qom-type": "memory-backend-file", "id": '],
     "-object at argument 2: invalid JSON"),
    (["-object", "id=m,size=8M"], "no qom-type"),
    (["-object", "memory-backend-file,id=m,mem-path=/dev/shm"], "'m': no size; add size="),
    (["-object", "memory-backend-shm,id=m,size=8M", "-machine", "memory-backend=m"],
     "memory-backend-shm, which kvmaccel does not support"),
    (["-object", "memory-backend-file,id=m,size=8M"], "needs mem-path=PATH"),
    (["-object", "memory-backend-ram,id=m,size=8Q"], "size '8Q' is not a size"),
    (["-numa", "node,memdev=nope"], "no memory backend 'nope'"),
])
def test_bad_arguments_one_line(qemu: str, args: list[str], message: str) -> None:
    proc = kvmaccel("run", "--dry-run", "--", qemu, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kvmaccel: error: ")
    assert message in proc.stderr
    assert proc.stdout == ""


def test_no_program() -> None:
    proc = kvmaccel("run", "--", "no-such-qemu", "-m", "1G")
    assert proc.returncode == 2 and "no-such-qemu: no such program" in proc.stderr
    proc = kvmaccel("run")
    assert proc.returncode == 2 and "no QEMU command line" in proc.stderr


def test_dry_run_prints_plan_and_command(qemu: str, hugetlbfs: str) -> None:
    proc = kvmaccel("run", "--dry-run", "--", qemu, "-machine", "none", "-object",
                    f"memory-backend-file,id=m,size=64M,mem-path={hugetlbfs},share=on")
    assert proc.returncode == 0, proc.stderr
    assert f"populate m (memory-backend-file {hugetlbfs} 64M): directory on hugetlbfs" \
        in proc.stdout
    assert ("exec: qemu-system-x86_64 -machine none -object memory-backend-file,id=m,size=64M,"
            "mem-path=/proc/self/fd/N,share=on,prealloc=off") in proc.stdout


# --- real QEMU -----------------------------------------------------------------------------

def test_directory_backend_then_kill_leaves_nothing(qemu: str, hugetlbfs: str,
                                                    daemon: list[str]) -> None:
    """keyval form, mem-path a directory: QEMU maps kvmaccel's populated unlinked file."""
    names = sorted(os.listdir(hugetlbfs))
    proc = kvmaccel("run", "--", *BASE, *daemon, "-object",
                    f"memory-backend-file,id=mem0,size=128M,mem-path={hugetlbfs},share=on,"
                    "prealloc=on,host-nodes=0,policy=bind")
    assert proc.returncode == 0, proc.stderr
    pid = pid_of(daemon)
    (st,) = qemu_status(pid)
    assert st.path is not None and st.path.startswith(f"{hugetlbfs}/#")
    assert st.path.endswith("(deleted)")
    assert st.allocated_bytes == 128 * MIB  # populated by kvmaccel, before QEMU ran
    assert st.numa_policy == "bind:0" and st.requested_nodes == (0,)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"mem-path=/proc/self/fd/" in f.read()
    assert sorted(os.listdir(hugetlbfs)) == names
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert sorted(os.listdir(hugetlbfs)) == names


def test_directory_backend_qemu_exits(qemu: str, hugetlbfs: str) -> None:
    """QEMU in the foreground (kvmaccel became it), ended by SIGTERM: a clean exit."""
    names = sorted(os.listdir(hugetlbfs))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmaccel", "run", "--", *BASE, "-object",
         f"memory-backend-file,id=mem0,size=64M,mem-path={hugetlbfs},share=on"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the exec has happened
            with open(f"/proc/{proc.pid}/comm", encoding="ascii") as f:
                if f.read().startswith("qemu"):
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        (st,) = qemu_status(proc.pid)
        while st.path is None:  # until QEMU has mapped the backend (it starts up meanwhile)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
            (st,) = qemu_status(proc.pid)
        assert st.allocated_bytes == 64 * MIB  # all of it populated before QEMU ran
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(os.listdir(hugetlbfs)) == names


def test_json_memfd_backend(qemu: str, hugetlbfs: str, daemon: list[str]) -> None:
    """JSON form, memory-backend-memfd with huge pages: handed over as a shared file backend."""
    obj = json.dumps({"qom-type": "memory-backend-memfd", "id": "mem0", "size": 64 * MIB,
                      "hugetlb": True, "hugetlbsize": 2 * MIB, "prealloc": True})
    proc = kvmaccel("run", "--", *BASE, *daemon, "-object", obj)
    assert proc.returncode == 0, proc.stderr
    pid = pid_of(daemon)
    (st,) = qemu_status(pid)
    assert st.path == "/memfd:kvmaccel-mem0 (deleted)"
    assert st.allocated_bytes == 64 * MIB and st.page_size_kib == 2048


def test_numa_guest(qemu: str, hugetlbfs: str, shm_dir: str, daemon: list[str]) -> None:
    """A TCG guest with two NUMA nodes, one backend each, both bound to host node 0."""
    proc = kvmaccel(
        "run", "--", qemu, "-machine", "pc,accel=tcg", "-display", "none", "-nodefaults", "-S",
        *daemon, "-m", "96M",
        "-object", f"memory-backend-file,id=m0,size=64M,mem-path={hugetlbfs},share=on,"
                   "host-nodes=0,policy=bind",
        "-object", json.dumps({"qom-type": "memory-backend-file", "id": "m1", "size": 32 * MIB,
                               "mem-path": f"{shm_dir}/m1", "share": True, "host-nodes": [0],
                               "policy": "preferred"}),
        "-numa", "node,nodeid=0,memdev=m0", "-numa", "node,nodeid=1,memdev=m1")
    assert proc.returncode == 0, proc.stderr
    by_id = {s.backend_id: s for s in qemu_status(pid_of(daemon))}
    assert by_id["m0"].allocated_bytes == 64 * MIB and by_id["m0"].numa_policy == "bind:0"
    assert by_id["m1"].path == f"{shm_dir}/m1"
    assert by_id["m1"].allocated_bytes == 32 * MIB
    assert by_id["m1"].numa_policy == "prefer:0"
    assert by_id["m0"].off_node_pages == 0 and by_id["m1"].off_node_pages == 0
