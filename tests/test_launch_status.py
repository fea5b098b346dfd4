"""``kvmaccel status``: smaps/numa_maps parsing on a copied /proc tree, and a real QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmaccel.launch.status import qemu_status, read_vm_areas

from .test_launch_run import BASE, QEMU, pid_of, qemu, wait_gone  # noqa: F401 (fixture)

MIB = 1 << 20

# Two mappings as QEMU 7.2 showed them: 64 MiB of a hugetlbfs file it preallocated, and
# anonymous RAM of which 1 MiB is resident.
SMAPS = """\
7f2a00000000-7f2a04000000 rw-s 00000000 00:27 26939 /dev/hugepages/qemu_back_mem.m0.Xz3 (deleted)
Size:              65536 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
Rss:                   0 kB
Shared_Hugetlb:    65536 kB
Private_Hugetlb:       0 kB
VmFlags: rd wr sh mr mw me ms de ht sd
7f2a10000000-7f2a14000000 rw-p 00000000 00:00 0
Size:              65536 kB
KernelPageSize:        4 kB
Rss:                1024 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
"""
NUMA_MAPS = """\
7f2a00000000 bind:0 file=/dev/hugepages/qemu_back_mem.m0.Xz3\\040(deleted) huge dirty=32 N0=32 \
kernelpagesize_kB=2048
7f2a10000000 default anon=256 dirty=256 N0=200 N1=56 kernelpagesize_kB=4
"""


@pytest.fixture
def fake_proc(tmp_path: os.PathLike[str]) -> Iterator[str]:
    root = str(tmp_path)
    os.makedirs(f"{root}/42")
    for name, text in (("smaps", SMAPS), ("numa_maps", NUMA_MAPS)):
        with open(f"{root}/42/{name}", "w", encoding="utf-8") as f:
            f.write(text)
    argv = [QEMU, "-machine", "none", "-object",
            "memory-backend-file,id=m0,size=64M,mem-path=/dev/hugepages,share=on,host-nodes=0,policy=bind",
            "-object", "memory-backend-ram,id=r,size=64M,"
            "host-nodes=1,policy=bind"]
    with open(f"{root}/42/cmdline", "wb") as f:
        f.write(b"\0".join(a.encode() for a in argv) + b"\0")
    yield root


def test_read_vm_areas(fake_proc: str) -> None:
    huge, anon = read_vm_areas(42, fake_proc)
    assert huge.mapped_bytes == 64 * MIB and huge.kernel_page_kib == 2048
    assert huge.pages_per_node == {0: 32} and huge.numa_policy == "bind:0"
    assert anon.path == "" and anon.mapped_bytes == MIB
    assert anon.pages_per_node == {0: 200, 1: 56}


def test_status_matches_backends_and_compares_nodes(fake_proc: str) -> None:
    m0, r = qemu_status(42, proc=fake_proc)
    assert m0.backend_id == "m0" and m0.path.startswith("/dev/hugepages/qemu_back_mem.")
    assert m0.off_node_pages == 0
    assert r.backend_id == "r" and r.path == "(anonymous)" and r.allocated_bytes is None
    assert r.requested_nodes == (1,) and r.off_node_pages == 200
    # a domain plan's nodes win over the command line's
    (m0, r) = qemu_status(42, {"r": (0, 1)}, proc=fake_proc)
    assert r.off_node_pages == 0


def test_missing_process(tmp_path: os.PathLike[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "status", "--pid", "999999999"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "no such process" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "status"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and "either --domain NAME or --pid PID" in proc.stderr


def test_status_of_real_qemu_with_its_own_prealloc(qemu: str, hugetlbfs: str,  # noqa: F811
                                                   tmp_path: os.PathLike[str]) -> None:
    """Plain QEMU (no kvmaccel) preallocating: every page mapped, all on node 0."""
    pidfile = os.path.join(str(tmp_path), "q.pid")
    subprocess.run([*BASE, "-daemonize", "-pidfile", pidfile, "-object",
                    f"memory-backend-file,id=mem0,size=64M,mem-path={hugetlbfs},share=on,"
                    "prealloc=on,host-nodes=0,policy=bind", "-object",
                    "memory-backend-ram,id=ram0,size=16M,prealloc=on"], check=True)
    pid = pid_of(["-pidfile", pidfile])
    try:
        proc = subprocess.run([sys.executable, "-m", "kvmaccel", "status", "--pid", str(pid),
                               "--json"], capture_output=True, text=True, check=True)
        report = json.loads(proc.stdout)
        mem0, ram0 = report["backends"]
        assert mem0["id"] == "mem0" and mem0["path"].startswith(f"{hugetlbfs}/qemu_back_mem.")
        assert mem0["mapped_bytes"] == 64 * MIB and mem0["allocated_bytes"] == 64 * MIB
        assert mem0["pages_per_node"] == {"0": 32} and mem0["numa_policy"] == "bind:0"
        assert mem0["off_node_pages"] == 0 and mem0["requested_nodes"] == [0]
        assert ram0["id"] == "ram0" and ram0["path"] == "(anonymous)"
        assert ram0["mapped_bytes"] == 16 * MIB and ram0["pages_per_node"] == {"0": 4096}
        text = subprocess.run([sys.executable, "-m", "kvmaccel", "status", "--pid", str(pid)],
                              capture_output=True, text=True, check=True).stdout
        assert "mem0: " in text and "N0=32 (asked 0 ok)" in text
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
