"""Backings: capacity refused before anything is created, undo after failure, ownership."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from kvmaccel.engine.backing import BackingSpec, created_by_us, populate_backings, release
from kvmaccel.engine.slots import HostSlots
from kvmaccel.errors import BackingError, CapacityError
from kvmaccel.host.facts import HugePagePool, read_host
from kvmaccel.model.units import format_size
from kvmaccel.plan.limits import Limits

from .conftest import free_hugepages_2m

MIB = 1 << 20


def test_too_few_huge_pages_refused_before_creating(hugetlbfs: str) -> None:
    path = os.path.join(hugetlbfs, "kvtest-too-big")
    free = free_hugepages_2m()
    with pytest.raises(CapacityError) as info:
        populate_backings([BackingSpec(path, (free + 10) * 2 * MIB)], read_host())
    message = str(info.value)
    assert (f"need {format_size((free + 10) * 2 * MIB)} of 2M pages host-wide but only "
            f"{format_size(free * 2 * MIB)} is free (free_hugepages - resv_hugepages") in message
    nr = read_host().hugepages[2048].nr_pages
    assert f"reserve more huge pages: echo {nr + 10} > /sys/kernel/mm/hugepages/" in message
    assert not os.path.exists(path)
    assert free_hugepages_2m() == free


def test_too_few_huge_pages_on_a_node(hugetlbfs: str) -> None:
    """Enough pages host-wide, too few on the target node (as on a two-node host whose pool
    sits on the other node)."""
    path = os.path.join(hugetlbfs, "kvtest-node")
    real = read_host()
    node0 = dataclasses.replace(real.nodes[0], hugepages={2048: HugePagePool(2048, 10, 3)})
    host = dataclasses.replace(real, nodes={0: node0})
    with pytest.raises(CapacityError, match=r"need 16M of 2M pages on node 0 but only 6M is "
                       r"free \(free_hugepages \(2048 kB\) of node 0\); reserve more huge pages: "
                       "echo 15 > /sys/devices/system/node/node0/") as info:
        populate_backings([BackingSpec(path, 16 * MIB, nodes=(0,))], host)
    assert info.value.node_id == 0 and info.value.page_size_kib == 2048
    assert not os.path.exists(path)


def test_pool_exhausted_midway_removes_the_file(hugetlbfs: str) -> None:
    """The host said there were pages (a stale reading): the kernel then refuses.  The error
    is clear, the file this run created is gone and every page is back."""
    free = free_hugepages_2m()
    real = read_host()
    liar = dataclasses.replace(real, hugepages={2048: HugePagePool(2048, 100000, 100000)})
    path = os.path.join(hugetlbfs, "kvtest-exhaust")
    with pytest.raises(CapacityError, match="huge pages|could not allocate"):
        populate_backings([BackingSpec(path, (free + 64) * 2 * MIB)], liar)
    assert not os.path.exists(path)
    assert not created_by_us(path)
    assert free_hugepages_2m() == free


def test_memavailable_checked_for_tmpfs(shm_dir: str) -> None:
    host = dataclasses.replace(read_host(), mem_available_kib=1024)
    path = os.path.join(shm_dir, "guest")
    with pytest.raises(CapacityError, match=r"need 64M of 4K pages host-wide but only 1M is "
                       r"free \(MemAvailable\); free memory"):
        populate_backings([BackingSpec(path, 64 * MIB)], host)
    assert not os.path.exists(path)


def test_existing_file_not_ours_is_never_touched(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "theirs")
    with open(path, "wb") as f:
        f.write(b"precious")
    with pytest.raises(BackingError, match="not created by kvmaccel"):
        populate_backings([BackingSpec(path, 64 * MIB)], read_host())
    with pytest.raises(BackingError, match="not created by kvmaccel"):
        release(path)
    with open(path, "rb") as f:
        assert f.read() == b"precious"


def test_release_removes_only_what_we_created(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "ours")
    populate_backings([BackingSpec(path, 16 * MIB)], read_host())
    assert created_by_us(path)
    # Populating it again with the same size reuses it; another size is refused.
    populate_backings([BackingSpec(path, 16 * MIB)], read_host())
    with pytest.raises(BackingError, match="release"):
        populate_backings([BackingSpec(path, 32 * MIB)], read_host())
    assert release(path) == 16 * MIB
    assert not os.path.exists(path)
    # A new file at the same path is not ours, even though the path once was.
    with open(path, "wb") as f:
        f.write(b"x")
    with pytest.raises(BackingError):
        release(path)
    assert os.path.exists(path)


def test_filesystem_must_be_tmpfs_or_hugetlbfs(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "on-disk")
    with pytest.raises(BackingError, match="not on hugetlbfs or tmpfs"):
        populate_backings([BackingSpec(path, 16 * MIB)], read_host())
    assert not os.path.exists(path)


def test_size_must_be_whole_huge_pages(hugetlbfs: str) -> None:
    path = os.path.join(hugetlbfs, "kvtest-odd")
    with pytest.raises(BackingError, match="multiple of its 2048 KiB pages"):
        populate_backings([BackingSpec(path, 3 * MIB)], read_host())
    assert not os.path.exists(path)


def test_owner_and_mode(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "owned")
    populate_backings([BackingSpec(path, 4 * MIB, mode=0o640, uid=65534, gid=65534)],
                      read_host())
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    release(path)


def test_host_wide_cap_holds_across_processes(shm_dir: str) -> None:
    """Another process holds the only host-wide helper slot: this run gets no helper."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "from kvmaccel import paths\n"
         "from kvmaccel.engine.slots import HostSlots\n"
         "paths.use(paths.resolve(os.environ))  # what an entry point does\n"
         "s = HostSlots(1)\n"
         "assert s.acquire(1) == 1\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert HostSlots(1).acquire(1) == 0
        limits = Limits(threads=2, max_helpers_host=1, min_chunk_bytes=16 * MIB,
                        idle_cpus_only=False)
        _, result = populate_backings([BackingSpec(os.path.join(shm_dir, "a"), 64 * MIB)],
                                      read_host(), limits)
        assert result.threads == 1 and sum(result.helpers_per_node.values()) == 0
        assert any("other kvmaccel runs hold host-wide slots" in r for r in result.reasons)
    finally:
        holder.communicate("")
    # The holder is gone, so is its lock: the slot is free again.
    _, result = populate_backings([BackingSpec(os.path.join(shm_dir, "b"), 64 * MIB)],
                                  read_host(), limits)
    assert result.threads == 2
