"""kvmaccel.engine.placement: where a populated file's pages are, on real files."""

from __future__ import annotations

import os

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.engine.placement import check_placement, placement
from kvmaccel.errors import BackingError
from kvmaccel.host.facts import read_host

MIB = 1 << 20


def _populated(directory: str, size: int) -> int:
    path = os.path.join(directory, "g")
    populate_backings([BackingSpec(path, size, nodes=(0,))], read_host())
    return os.open(path, os.O_RDONLY)


def test_every_huge_page_is_counted_on_its_node(hugetlbfs: str) -> None:
    fd = _populated(hugetlbfs, 64 * MIB)
    try:
        found = placement(fd, 64 * MIB, 2 * MIB, (0,))
        assert found.pages_per_node == {0: 32} and found.misplaced == 0
        check_placement(fd, 64 * MIB, 2 * MIB, (0,), "g")
        # The same file against a node its pages are not on (this host has one node, so
        # the backend's nodes are what differ): every page is counted as misplaced.
        wrong = placement(fd, 64 * MIB, 2 * MIB, (1,))
        assert wrong.misplaced == 32
        with pytest.raises(BackingError, match=r"32 page\(s\) are not on node\(s\) 1 "
                                               r"\(node 0: 32\)"):
            check_placement(fd, 64 * MIB, 2 * MIB, (1,), "g")
    finally:
        os.close(fd)


def test_base_pages_are_sampled_one_per_2_mib(shm_dir: str) -> None:
    fd = _populated(shm_dir, 64 * MIB)
    try:
        assert placement(fd, 64 * MIB, 4096, (0,)).pages_per_node == {0: 32}
    finally:
        os.close(fd)


def test_an_incomplete_file_is_refused_and_not_filled(hugetlbfs: str) -> None:
    path = os.path.join(hugetlbfs, "hole")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 * MIB)
        with pytest.raises(BackingError, match="not complete"):
            placement(fd, 8 * MIB, 2 * MIB, (0,))
        assert os.fstat(fd).st_blocks == 0  # looking allocated nothing
    finally:
        os.close(fd)
        os.unlink(path)
