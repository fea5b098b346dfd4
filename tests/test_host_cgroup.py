"""Helper counts follow the CPU quota of the caller's cgroup (v1 here, for real; v2 from a
tree shaped like the kernel's, since this machine mounts no v2 cpu controller)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmaccel.host.facts import CpuQuota, read_cpu_quota
from kvmaccel.plan.limits import Limits, distribute_helpers

from .conftest import need

CPU_V1 = "/sys/fs/cgroup/cpu"


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_v2_cpu_max_tightest_along_the_path(tmp_path: str) -> None:
    root = str(tmp_path)
    write(f"{root}/proc/self/cgroup", "0::/machine.slice/kvmaccel\n")
    write(f"{root}/proc/mounts", "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0\n")
    write(f"{root}/sys/fs/cgroup/cpu.max", "max 100000\n")
    write(f"{root}/sys/fs/cgroup/machine.slice/cpu.max", "300000 100000\n")
    write(f"{root}/sys/fs/cgroup/machine.slice/kvmaccel/cpu.max", "150000 100000\n")
    quota = read_cpu_quota(root)
    assert quota == CpuQuota(1.5, f"{root}/sys/fs/cgroup/machine.slice/kvmaccel/cpu.max")
    write(f"{root}/sys/fs/cgroup/machine.slice/kvmaccel/cpu.max", "max 100000\n")
    assert read_cpu_quota(root) == CpuQuota(3.0, f"{root}/sys/fs/cgroup/machine.slice/cpu.max")


def test_no_quota_and_no_cgroup_files(tmp_path: str) -> None:
    root = str(tmp_path)
    assert read_cpu_quota(root) is None  # no /proc/self/cgroup at all
    write(f"{root}/proc/self/cgroup", "1:cpu,cpuacct:/\n")
    write(f"{root}/proc/mounts", "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n")
    write(f"{root}/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(f"{root}/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert read_cpu_quota(root) is None


def test_the_quota_caps_helpers_with_a_reason() -> None:
    work = {0: 8 << 30, 1: 8 << 30}
    plan = distribute_helpers(work, {0: 16, 1: 16}, 32, Limits(),
                              CpuQuota(4.5, "/sys/fs/cgroup/x/cpu.max"))
    assert plan.helpers == 3
    assert any("cgroup CPU quota of 4.5 CPU(s) (/sys/fs/cgroup/x/cpu.max)" in r
               for r in plan.reasons)
    assert distribute_helpers(work, {0: 16, 1: 16}, 32, Limits()).helpers == 24


@pytest.fixture
def v1_cpu_cgroup() -> Iterator[str]:
    """A real v1 cpu cgroup of the test's own, removed afterwards."""
    need(os.geteuid() == 0, "needs root")
    need(os.path.isfile(os.path.join(CPU_V1, "cpu.cfs_quota_us")), "no v1 cpu controller")
    path = os.path.join(CPU_V1, f"kvtest-quota-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)


def populate_json(shm_dir: str, cgroup: str | None) -> dict[str, object]:
    def enter() -> None:
        if cgroup is not None:
            with open(os.path.join(cgroup, "tasks"), "w") as f:
                f.write(str(os.getpid()))

    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "populate",
                           os.path.join(shm_dir, "g"), "--size", "1G", "--threads", "2",
                           "--ignore-load", "--min-chunk", "64M", "--json"],
                          capture_output=True, text=True, timeout=120, preexec_fn=enter)
    assert proc.returncode == 0, proc.stderr
    os.unlink(os.path.join(shm_dir, "g"))
    return dict(json.loads(proc.stdout))


def test_helpers_follow_a_real_cgroups_quota(shm_dir: str, v1_cpu_cgroup: str) -> None:
    free = populate_json(shm_dir, None)
    assert free["threads"] == 2
    write(os.path.join(v1_cpu_cgroup, "cpu.cfs_period_us"), "100000")
    write(os.path.join(v1_cpu_cgroup, "cpu.cfs_quota_us"), "100000")  # one CPU
    capped = populate_json(shm_dir, v1_cpu_cgroup)
    assert capped["threads"] == 1
    reasons = " ".join(map(str, capped["reasons"]))  # type: ignore[call-overload]
    assert f"cgroup CPU quota of 1 CPU(s) ({v1_cpu_cgroup}/cpu.cfs_quota_us)" in reasons


def test_fills_run_in_the_configured_cgroup_at_the_lowest_share(shm_dir: str, tmp_path: str
                                                                ) -> None:
    need(os.geteuid() == 0, "needs root")
    need(os.path.isfile(os.path.join(CPU_V1, "cpu.shares")), "no v1 cpu controller")
    name = f"kvtest-cg-{os.getpid()}"
    cfg = os.path.join(str(tmp_path), "kvmaccel.toml")
    write(cfg, f'cgroup = "{name}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "pool", "fill", "--dir", shm_dir,
                             "--size", "2G", "--threads", "1"],
                            env={**os.environ, "KVMACCEL_CONFIG": cfg},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while proc.poll() is None and f"cpu:/{name}" not in seen:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                seen = f.read()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"cpu:/{name}" in seen
        with open(os.path.join(CPU_V1, name, "cpu.shares")) as f:
            assert f.read().strip() == "2"
    finally:
        proc.kill()
        proc.wait()
        if os.path.isdir(os.path.join(CPU_V1, name)):
            os.rmdir(os.path.join(CPU_V1, name))
