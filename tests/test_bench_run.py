"""``kvmaccel bench-run`` on a small guest: every configuration starts QEMU and is timed."""

from __future__ import annotations

import json
import os

from .test_launch_run import kvmaccel, qemu  # noqa: F401 (fixture)


def test_bench_run_small(qemu: str, hugetlbfs: str) -> None:  # noqa: F811
    names = sorted(os.listdir(hugetlbfs))
    proc = kvmaccel("bench-run", "--size", "128M", "--runs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["medians"]) == {"qemu", "kvmaccel", "none"}
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds"].values())
    assert report["ratio_qemu_over_kvmaccel"] > 0
    assert "ratio qemu/kvmaccel" in proc.stderr
    assert sorted(os.listdir(hugetlbfs)) == names


def test_bench_run_not_hugetlbfs(qemu: str, shm_dir: str) -> None:  # noqa: F811
    proc = kvmaccel("bench-run", "--size", "64M", "--dir", shm_dir)
    assert proc.returncode == 1 and "is not on a hugetlbfs mount" in proc.stderr
