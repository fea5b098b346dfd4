"""What a run says it populated: ``hugetlbfs 2M``, ``tmpfs 4K`` in the summary and the JSON of
``populate``, and a warning for a ``hugepages`` directory that is not hugetlbfs (the empty
/dev/hugepages on devtmpfs, which statfs reports as tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvmaccel.engine.report import hugepage_name_warning

MIB = 1 << 20


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def test_warning_only_for_a_hugepages_name_off_hugetlbfs() -> None:
    warning = hugepage_name_warning("/dev/hugepages/guest0", "tmpfs", 4096)
    assert warning is not None
    assert "on tmpfs with 4K pages, not hugetlbfs" in warning and "'hugepages'" in warning
    assert hugepage_name_warning("/dev/hugepages/guest0", "hugetlbfs", 2 * MIB) is None
    assert hugepage_name_warning("/mnt/hugepages-1G/g", "tmpfs", 4096) is not None
    assert hugepage_name_warning("/dev/shm/guest0", "tmpfs", 4096) is None
    assert hugepage_name_warning("/dev/shm/hugepages.img", "tmpfs", 4096) is None  # a file name


def test_populate_names_tmpfs_4k(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "guest")
    proc = kvmaccel("populate", path, "--size", "16M", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["memory"] == "tmpfs 4K"
    assert summary["filesystems"] == [{"filesystem": "tmpfs", "page_size_kib": 4,
                                       "bytes": 16 * MIB}]
    assert summary["warnings"] == [] and "WARNING" not in proc.stderr
    assert kvmaccel("release", path).returncode == 0
    proc = kvmaccel("populate", path, "--size", "16M")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: 16M of tmpfs 4K in ")
    assert kvmaccel("release", path).returncode == 0


def test_populate_warns_on_an_empty_hugepages_directory(shm_dir: str) -> None:
    """A directory named hugepages with no hugetlbfs on it: the run works, on 4K pages, and
    says so on stderr and in the JSON."""
    directory = os.path.join(shm_dir, "hugepages")
    os.mkdir(directory)
    path = os.path.join(directory, "guest0")
    proc = kvmaccel("populate", path, "--size", "8M", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["memory"] == "tmpfs 4K"
    assert len(summary["warnings"]) == 1 and "not hugetlbfs" in summary["warnings"][0]
    assert "WARNING" in proc.stderr and "is hugetlbfs mounted there?" in proc.stderr
    assert kvmaccel("release", path).returncode == 0


def test_populate_names_hugetlbfs_2m(hugetlbfs: str) -> None:
    path = os.path.join(hugetlbfs, "guest")
    proc = kvmaccel("populate", path, "--size", "8M", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["memory"] == "hugetlbfs 2M" and summary["warnings"] == []
    assert kvmaccel("release", path).returncode == 0
