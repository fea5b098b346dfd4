"""On a real two-node kernel: every node's share of a backing lands on that node.

For tmpfs, 2M and 1G hugetlbfs.  The pages are counted where the kernel keeps them
(/proc/self/numa_maps of a fresh mapping of the populated file), never taken from kvmaccel's
own report.  Every test here runs twice: with the right binding, where it must pass, and with
a wrong :func:`kvmaccel.host.sysmem.mbind` (:func:`misbind`: it binds every range to the other
node), where it must fail on an assertion (a strict xfail).  That second run is what shows the
tests can tell the right node from the wrong one.
"""

from __future__ import annotations

import os

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.engine.populate import WorkItem, populate
from kvmaccel.errors import CapacityError
from kvmaccel.host import sysmem
from kvmaccel.host.facts import HostFacts, read_host
from kvmaccel.launch.run import plan_launch, populate_launch
from kvmaccel.plan.limits import Limits
from kvmaccel.pool.manage import Pool, key_for

from .conftest import KINDS, MIB, REAL_MBIND, pages_per_node, record, set_node_hugepages

LIMITS = Limits(idle_cpus_only=False)

WRONG = pytest.mark.xfail(strict=True, raises=AssertionError,
                          reason="a wrong mbind binds every range to the other node")


def misbind(addr: int, length: int, policy: str, nodes: frozenset[int]) -> None:
    """mbind to the wrong node (0 <-> 1, 2 <-> 3, ...): what the engine calls in the
    ``wrong`` runs, in place of :func:`kvmaccel.host.sysmem.mbind`."""
    REAL_MBIND(addr, length, policy, frozenset(node ^ 1 for node in nodes))


@pytest.fixture(autouse=True, params=["right", pytest.param("wrong", marks=WRONG)])
def binding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with the right binding, then with the wrong one."""
    if request.param == "wrong":
        monkeypatch.setattr(sysmem, "mbind", misbind)
    return str(request.param)


def halves(path: str, size: int) -> tuple[dict[int, int], dict[int, int]]:
    return pages_per_node(path, 0, size // 2), pages_per_node(path, size // 2, size // 2)


def test_bind_puts_each_nodes_share_on_that_node(
        kind: str, mounts: dict[str, str], host: HostFacts,
        request: pytest.FixtureRequest) -> None:
    """``nodes=(0, 1)``: the first half of the file on node 0, the second on node 1."""
    _, _, size, page = KINDS[kind]
    path = os.path.join(mounts[kind], "bind")
    populate_backings([BackingSpec(path, size, nodes=(0, 1))], host, LIMITS)
    try:
        first, second = halves(path, size)
        record(request, "pages_per_node", {"first_half": first, "second_half": second})
        per_half = size // 2 // page
        assert first == {0: per_half}, f"node 0's half: {first}"
        assert second == {1: per_half}, f"node 1's half: {second}"
    finally:
        os.unlink(path)


def qemu_argv(path: str, size: int, nodes: str, policy: str) -> list[str]:
    return ["qemu-system-x86_64", "-machine", "none", "-nodefaults",
            "-object", f"memory-backend-file,id=ram0,size={size},mem-path={path},share=on,"
                       f"host-nodes={nodes},policy={policy}"]


def run_backend(path: str, size: int, nodes: str, policy: str, host: HostFacts) -> None:
    """What ``kvmaccel run`` does before it execs QEMU, for one memory-backend-file."""
    plan = plan_launch(qemu_argv(path, size, nodes, policy), host)
    assert [a.action for a in plan.actions] == ["file"], plan.actions
    _, backings, _ = populate_launch(plan, host, LIMITS)
    for b in backings:
        b.close()


def test_interleave_spreads_the_backend_evenly(
        kind: str, mounts: dict[str, str], host: HostFacts,
        request: pytest.FixtureRequest) -> None:
    """``policy=interleave,host-nodes=0-1``: half of the pages on each node, in one
    contiguous part per node (kvmaccel's documented way; QEMU's later mbind moves nothing)."""
    _, _, size, page = KINDS[kind]
    path = os.path.join(mounts[kind], "interleave")
    run_backend(path, size, "0-1", "interleave", host)
    try:
        first, second = halves(path, size)
        record(request, "pages_per_node", {"first_half": first, "second_half": second})
        assert first == {0: size // 2 // page} and second == {1: size // 2 // page}
    finally:
        os.unlink(path)


def test_preferred_with_room_is_all_on_that_node(
        kind: str, mounts: dict[str, str], host: HostFacts,
        request: pytest.FixtureRequest) -> None:
    """``policy=preferred,host-nodes=1`` with room on node 1: every page on node 1.  (The 1G
    case gets half the size: node 1 has one 1G page.)"""
    _, _, size, page = KINDS[kind]
    if kind == "1G":
        size //= 2
    path = os.path.join(mounts[kind], "preferred")
    run_backend(path, size, "1", "preferred", host)
    try:
        found = pages_per_node(path, 0, size)
        record(request, "pages_per_node", found)
        assert found == {1: size // page}
    finally:
        os.unlink(path)


def test_preferred_spills_over_where_bind_refuses(
        mounts: dict[str, str], request: pytest.FixtureRequest) -> None:
    """2M pages, node 1 holding only 16 of the 64 needed: the engine's ``preferred`` range
    takes node 1's 16 pages and the rest from node 0; a ``bind`` range fails with a
    CapacityError.  (Through the engine: kvmaccel.engine.backing's capacity check refuses a short
    node before the kernel is asked, for ``preferred`` as for ``bind``.)"""
    assert set_node_hugepages(1, 2048, 16) == 16
    size = 128 * MIB
    path = os.path.join(mounts["2M"], "spill")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        host = read_host()
        populate([WorkItem(fd, 0, size, 2 * MIB, node_id=1, policy="preferred")], host, LIMITS)
        found = pages_per_node(path, 0, size)
        record(request, "pages_per_node", found)
        assert found == {1: 16, 0: 48}
        os.ftruncate(fd, 0)  # give the pages back
        os.ftruncate(fd, size)
        with pytest.raises(CapacityError):
            populate([WorkItem(fd, 0, size, 2 * MIB, node_id=1, policy="bind")], host, LIMITS)
    finally:
        os.close(fd)
        os.unlink(path)
        set_node_hugepages(1, 2048, 256)


def test_pool_file_bound_to_node_1_never_backs_node_0(
        mounts: dict[str, str], host: HostFacts, request: pytest.FixtureRequest) -> None:
    """A clean pool file populated on node 1 is not handed out for a node-0 backend of the
    same size and page size; it is for a node-1 backend, with its pages on node 1."""
    size = 64 * MIB
    pool = Pool(os.path.join(mounts["2M"], ".kvmaccel-pool"))
    on_node_1 = key_for(size, 2048, (1,), "bind")
    pool.fill(on_node_1, 1, host, LIMITS)
    target = os.path.join(mounts["2M"], "guest-ram")
    assert pool.take(key_for(size, 2048, (0,), "bind"), target,
                     domain_uuid="00000000-0000-0000-0000-000000000000",
                     backend_id="ram-node0") is None
    assert not os.path.exists(target)
    uuid = "00000000-0000-0000-0000-000000000001"
    entry = pool.take(on_node_1, target, domain_uuid=uuid, backend_id="ram-node1")
    assert entry is not None
    try:
        found = pages_per_node(target, 0, size)
        record(request, "pages_per_node", found)
        assert found == {1: size // (2 * MIB)}
    finally:
        os.unlink(target)
        pool.release_domain(uuid)
        pool.drain()


def test_the_placement_check_refuses_a_file_on_the_wrong_node(
        kind: str, mounts: dict[str, str], host: HostFacts,
        request: pytest.FixtureRequest) -> None:
    """The check the hook makes before it hands a file to the front (QEMU's mbind does not
    move pages already in a file): a file bound to node 1 passes for node 1 and is refused,
    every page of it, for node 0."""
    from kvmaccel.engine.placement import placement

    _, _, both_nodes, page = KINDS[kind]
    size = both_nodes // 2  # what one node has of this kind (one page of 1G)
    path = os.path.join(mounts[kind], "placed")
    populate_backings([BackingSpec(path, size, nodes=(1,))], host, LIMITS)
    fd = os.open(path, os.O_RDONLY)
    try:
        right = placement(fd, size, page, (1,))
        wrong = placement(fd, size, page, (0,))
        record(request, "placement", {"for_node_1": right.misplaced,
                                      "for_node_0": wrong.misplaced})
        assert right.misplaced == 0, f"pages of a node-1 file off node 1: {right}"
        assert wrong.misplaced == sum(wrong.pages_per_node.values()) > 0, wrong
    finally:
        os.close(fd)
        os.unlink(path)
