"""kvmaccel.host.facts against the fake one- and two-node trees in tests/data/sysfs (copies of the
shape of real hosts), and against this machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvmaccel.errors import HostError
from kvmaccel.host.facts import CpuFreq, read_cpufreq, read_host

DATA = Path(__file__).resolve().parent / "data" / "sysfs"


def test_two_node_tree() -> None:
    host = read_host(str(DATA / "two-node"))
    assert sorted(host.nodes) == [0, 1]
    assert host.nodes[0].cpus == frozenset(range(0, 16)) | frozenset(range(32, 48))
    assert host.nodes[1].cpus == frozenset(range(16, 32)) | frozenset(range(48, 64))
    assert len(host.online_cpus) == 64
    pool = host.nodes[1].hugepages[1048576]
    assert (pool.nr_pages, pool.free_pages) == (64, 60)
    assert host.hugepages[2048].free_pages == 90112 + 86016
    assert host.hugepages[2048].available_pages == 90112 + 86016  # resv 0
    assert host.default_hugepage_kib == 2048
    assert [(m.path, m.page_size_kib) for m in host.hugetlbfs_mounts] == [
        ("/dev/hugepages", 2048), ("/dev/hugepages1G", 1048576)]
    assert host.mem_available_kib == 201245312
    assert host.nodes[0].mem_free_kib == 98234112
    assert host.cpufreq == CpuFreq("intel_pstate", ("performance",))


def test_one_node_tree_has_no_cpufreq() -> None:
    host = read_host(str(DATA / "one-node"))
    assert list(host.nodes) == [0] and host.nodes[0].cpus == frozenset({0, 1})
    assert host.cpufreq is None
    assert [m.fs_type for m in host.mounts if m.path == "/dev/shm"] == ["tmpfs"]


def test_mixed_governors(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shutil.copytree(DATA / "two-node", root)
    (root / "sys/devices/system/cpu/cpu5/cpufreq/scaling_governor").write_text("powersave\n")
    assert read_cpufreq(str(root)) == CpuFreq("intel_pstate", ("performance", "powersave"))


def test_unreadable_required_fact(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shutil.copytree(DATA / "one-node", root)
    (root / "sys/devices/system/node/node0/cpulist").unlink()
    with pytest.raises(HostError, match="cpulist"):
        read_host(str(root))


def test_this_machine() -> None:
    host = read_host()
    assert host.nodes and host.online_cpus
    assert host.mem_available_kib > 0
