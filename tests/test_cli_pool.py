"""``kvmaccel pool`` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MIB = 1 << 20


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def shm_pool(shm_dir: str) -> str:
    """The pool directory of a private tmpfs."""
    return os.path.join(shm_dir, ".kvmaccel-pool")


def test_fill_list_scrub_drain(shm_dir: str, shm_pool: str) -> None:
    proc = kvmaccel("pool", "fill", "--size", "16M", "--count", "2", "--nodes", "0", "--json",
                    "--dir", shm_dir)
    assert proc.returncode == 0, proc.stderr
    filled = json.loads(proc.stdout)
    assert len(filled) == 2 and all(r["pool"] == shm_pool for r in filled)
    listed = json.loads(kvmaccel("pool", "list", "--dir", shm_dir, "--json").stdout)
    assert [(e["state"], e["size_bytes"], e["host_nodes"]) for e in listed] == [
        ("clean", 16 * MIB, [0]), ("clean", 16 * MIB, [0])]
    table = kvmaccel("pool", "list", "--dir", shm_dir).stdout
    assert table.startswith("STATE") and table.count("clean") == 2
    assert kvmaccel("pool", "scrub", "--dir", shm_dir).returncode == 0
    proc = kvmaccel("pool", "drain", "--dir", shm_dir)
    assert proc.returncode == 0 and "drained 32M" in proc.stdout
    assert json.loads(kvmaccel("pool", "list", "--dir", shm_dir, "--json").stdout) == []


def test_fill_on_hugetlbfs_and_drain_gives_pages_back(hugetlbfs: str) -> None:
    pool_dir = os.path.join(hugetlbfs, ".kvmaccel-pool")
    proc = kvmaccel("pool", "fill", "--size", "8M", "--page-size", "2M", "--dir", hugetlbfs)
    assert proc.returncode == 0, proc.stderr
    (name,) = os.listdir(pool_dir)
    assert os.stat(os.path.join(pool_dir, name)).st_blocks * 512 == 8 * MIB  # 4 huge pages
    assert kvmaccel("pool", "drain", "--dir", hugetlbfs).returncode == 0
    assert os.listdir(pool_dir) == []


def test_pool_limit_stops_filling(shm_dir: str, shm_pool: str) -> None:
    proc = kvmaccel("pool", "fill", "--size", "16M", "--count", "3", "--max-bytes", "32M",
                    "--dir", shm_dir)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"kvmaccel: error: pool {shm_pool} holds 32M")
    assert len(proc.stderr.strip().splitlines()) == 1
    kvmaccel("pool", "drain", "--dir", shm_dir)


@pytest.mark.parametrize(("args", "message"), [
    (["--dir", "{shm}"], "give --size"),
    (["--size", "8M", "--page-size", "64K"], "no hugetlbfs mount with 64K pages"),
    (["--size", "3M", "--page-size", "2M"], "not a multiple of 2048 KiB pages"),
    (["--for", "vm-fixtures/small-shm.xml", "--size", "1G"], "--for takes sizes"),
    (["--size", "8M", "--dir", "/var/tmp"], "not hugetlbfs or tmpfs"),
])
def test_bad_fill(args: list[str], message: str, shm_dir: str, shm_pool: str) -> None:
    proc = kvmaccel("pool", "fill", *[a.format(shm=shm_dir) for a in args])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not os.listdir(shm_pool) if os.path.isdir(shm_pool) else True
