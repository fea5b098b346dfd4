"""Unlinked (O_TMPFILE) backings: populated, named nowhere, freed with their last descriptor."""

from __future__ import annotations

import os

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.errors import BackingError
from kvmaccel.host.facts import read_host

from .conftest import free_hugepages_2m

MIB = 1 << 20


def test_tmpfile_on_hugetlbfs_is_populated_and_leaves_nothing(hugetlbfs: str) -> None:
    before_names = set(os.listdir(hugetlbfs))
    free = free_hugepages_2m()
    spec = BackingSpec(None, 64 * MIB, tmpfile_dir=hugetlbfs)
    backings, result = populate_backings([spec], read_host())
    (backing,) = backings
    try:
        assert result.bytes_total == 64 * MIB
        assert backing.fd >= 0 and backing.fs_kind == "hugetlbfs"
        assert backing.page_size_bytes == 2 * MIB
        assert os.fstat(backing.fd).st_size == 64 * MIB
        assert os.readlink(f"/proc/self/fd/{backing.fd}").endswith("(deleted)")
        assert free_hugepages_2m() <= free - 32  # its pages are faulted in
        assert set(os.listdir(hugetlbfs)) == before_names
    finally:
        backing.close()
    assert free_hugepages_2m() >= free - 1  # allow one page of noise from other users


def test_tmpfile_on_tmpfs(shm_dir: str) -> None:
    backings, result = populate_backings([BackingSpec(None, 8 * MIB, tmpfile_dir=shm_dir)],
                                         read_host())
    try:
        assert result.bytes_total == 8 * MIB
        assert backings[0].spec.label == f"tmpfile:{shm_dir}"
        assert os.fstat(backings[0].fd).st_blocks * 512 == 8 * MIB
        assert os.listdir(shm_dir) == []
    finally:
        backings[0].close()


def test_tmpfile_dir_must_be_hugetlbfs_or_tmpfs(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BackingError, match="not on hugetlbfs or tmpfs"):
        populate_backings([BackingSpec(None, MIB, tmpfile_dir=str(tmp_path))], read_host())


def test_tmpfile_dir_missing() -> None:
    with pytest.raises(BackingError, match="cannot use tmpfile:/nonexistent/x"):
        populate_backings([BackingSpec(None, MIB, tmpfile_dir="/nonexistent/x")], read_host())


def test_path_and_tmpfile_dir_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        BackingSpec("/dev/shm/x", MIB, tmpfile_dir="/dev/shm")
