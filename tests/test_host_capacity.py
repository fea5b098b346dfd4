"""kvmaccel.host.capacity: the one check of what a set of (node, page size, bytes) needs
against what is free (:meth:`HostFacts.free_bytes`), for the planner, the engine, the start
path and the benches, on the fake two-node host of tests/data/sysfs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmaccel.errors import CapacityError
from kvmaccel.host.capacity import capacity_checks, check, first_short, require
from kvmaccel.host.facts import HostFacts, HugePagePool, read_host

DATA = Path(__file__).resolve().parent / "data" / "sysfs"
MIB = 1 << 20
GIB = 1 << 30


def two_node() -> HostFacts:
    return read_host(str(DATA / "two-node"))


def with_2m(host: HostFacts, node_free: tuple[int, int], free: int, resv: int) -> HostFacts:
    """``host`` whose 2M pools hold ``node_free`` free pages per node, ``free`` host-wide of
    which ``resv`` are promised to mappings that exist."""
    nodes = {n: dataclasses.replace(host.nodes[n], hugepages={
        **host.nodes[n].hugepages, 2048: HugePagePool(2048, 1000, node_free[n])}) for n in (0, 1)}
    return dataclasses.replace(host, nodes=nodes, hugepages={
        **host.hugepages, 2048: HugePagePool(2048, 2000, free, reserved_pages=resv)})


def test_free_is_what_free_bytes_says() -> None:
    host = two_node()
    for node in (None, 0, 1):
        for kib in (host.base_page_size_kib, 2048, 1048576):
            assert check(host, node, kib, 1).available_bytes == host.free_bytes(node, kib)
    assert check(host, None, 2048, 1).source == (
        "free_hugepages - resv_hugepages (2048 kB), host-wide")
    assert check(host, 1, 2048, 1).source == "free_hugepages (2048 kB) of node 1"
    assert check(host, 0, host.base_page_size_kib, 1).source == "MemFree of node 0"
    assert check(host, None, host.base_page_size_kib, 1).source == "MemAvailable"


def test_a_node_without_a_pool_of_that_size_has_nothing_free() -> None:
    host = two_node()
    node0 = dataclasses.replace(host.nodes[0], hugepages={
        k: v for k, v in host.nodes[0].hugepages.items() if k != 1048576})
    host = dataclasses.replace(host, nodes={**host.nodes, 0: node0})
    c = check(host, 0, 1048576, GIB)
    assert (c.available_bytes, c.ok, c.pool_pages) == (0, False, 0)
    assert c.reason() == (
        "need 1G of 1G pages on node 0 but only 0B is free (free_hugepages (1048576 kB) of "
        "node 0); reserve more huge pages: echo 1 > "
        "/sys/devices/system/node/node0/hugepages/hugepages-1048576kB/nr_hugepages")
    assert check(host, 7, 2048, 2 * MIB).available_bytes == 0  # no such node: nothing free


def test_nodes_that_each_fit_can_be_short_together() -> None:
    """Each node has 100 free pages, but 150 of the host's 200 are promised to mappings that
    exist: the planner said ok to 2 x 60 pages bound to nodes 0 and 1; the engine refused."""
    host = with_2m(two_node(), (100, 100), 200, 150)
    checks = capacity_checks(host, {(0, 2048): 60 * 2 * MIB, (1, 2048): 60 * 2 * MIB})
    assert [(c.node, c.needed_bytes, c.available_bytes, c.ok) for c in checks] == [
        (0, 120 * MIB, 200 * MIB, True), (1, 120 * MIB, 200 * MIB, True),
        (None, 240 * MIB, 100 * MIB, False)]
    with pytest.raises(CapacityError) as info:
        require(checks, who="guest g")
    assert str(info.value) == (
        "guest g needs 240M of 2M pages host-wide but only 100M is free (free_hugepages - "
        "resv_hugepages (2048 kB), host-wide); reserve more huge pages: echo 2070 > "
        "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    e = info.value
    assert (e.node_id, e.page_size_kib, e.needed_bytes, e.available_bytes) == (
        None, 2048, 240 * MIB, 100 * MIB)


def test_unbound_and_bound_add_up_host_wide_zero_needs_drop() -> None:
    host = two_node()
    base = host.base_page_size_kib
    checks = capacity_checks(host, {(None, 2048): 4 * MIB, (1, 2048): 2 * MIB,
                                    (None, base): 0, (0, base): GIB})
    assert [(c.node, c.page_size_kib, c.needed_bytes) for c in checks] == [
        (0, base, GIB), (1, 2048, 2 * MIB), (None, base, GIB), (None, 2048, 6 * MIB)]
    assert first_short(checks) is None


def test_the_first_failure_reported_is_a_nodes_then_host_wide() -> None:
    host = with_2m(two_node(), (100, 0), 50, 0)
    short = first_short(capacity_checks(host, {(0, 2048): 60 * 2 * MIB, (1, 2048): 2 * MIB}))
    assert short is not None and (short.node, short.page_size_kib) == (1, 2048)
    short = first_short(capacity_checks(host, {(0, 2048): 60 * 2 * MIB}))
    assert short is not None and (short.node, short.page_size_kib) == (None, 2048)
    base = check(dataclasses.replace(host, mem_available_kib=0), None, host.base_page_size_kib,
                 64 * MIB)
    assert base.reason() == ("need 64M of 4K pages host-wide but only 0B is free "
                             "(MemAvailable); free memory or ask for less")
    assert "; or choose a smaller --size" in str(base.error(hint="or choose a smaller --size"))
