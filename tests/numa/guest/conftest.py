"""Fixtures for the tests that run inside the two-node guest (see tests/numa/vm.py).

These tests run only there: ``tests/numa/conftest.py`` keeps pytest on the host from
collecting this directory.  The guest has nodes 0 and 1 of 4 GiB with CPUs 0-1 and 2-3, one
boot-time 1 GiB page on each node, and nothing else reserved; the session fixtures below
reserve 2M pages per node and mount private hugetlbfs (2M, 1G) and tmpfs filesystems.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from kvmaccel.host import sysmem
from kvmaccel.host.facts import HostFacts, read_host
from kvmaccel.launch.status import read_vm_areas

from ...conftest import private_mount

REAL_MBIND = sysmem.mbind
"""The real mbind: a test that binds through a wrong one replaces ``sysmem.mbind``."""
MIB = 1 << 20
GIB = 1 << 30
MADV_POPULATE_READ = 22  # Linux 5.14, commit 4ca9b3859dac: maps existing pages, allocates none
HUGEPAGES_2M_PER_NODE = 256  # 512 MiB per node
NODE_SYSFS = "/sys/devices/system/node"

# name -> (mount type, mount options, size of the test backing, page size)
KINDS = {
    "tmpfs": ("tmpfs", "mode=0755", 256 * MIB, 4096),
    "2M": ("hugetlbfs", "pagesize=2M,mode=0755", 256 * MIB, 2 * MIB),
    "1G": ("hugetlbfs", "pagesize=1G,mode=0755", 2 * GIB, GIB),
}


def nr_hugepages_path(node: int, page_kib: int) -> str:
    return f"{NODE_SYSFS}/node{node}/hugepages/hugepages-{page_kib}kB/nr_hugepages"


def set_node_hugepages(node: int, page_kib: int, count: int) -> int:
    """Reserve ``count`` pages of ``page_kib`` on ``node``; return how many the kernel gave."""
    with open(nr_hugepages_path(node, page_kib), "w") as f:
        f.write(str(count))
    with open(nr_hugepages_path(node, page_kib)) as f:
        return int(f.read())


@pytest.fixture(scope="session")
def host() -> HostFacts:
    """The guest's real host facts; fails unless it is the two-node guest."""
    facts = read_host()
    assert sorted(facts.nodes) == [0, 1], f"expected nodes 0 and 1, /sys shows {facts.nodes}"
    assert facts.nodes[0].cpus == {0, 1} and facts.nodes[1].cpus == {2, 3}
    return facts


@pytest.fixture(scope="session", autouse=True)
def reserved_2m() -> None:
    for node in (0, 1):
        got = set_node_hugepages(node, 2048, HUGEPAGES_2M_PER_NODE)
        assert got == HUGEPAGES_2M_PER_NODE, f"node {node}: only {got} 2M pages"


@pytest.fixture(scope="session")
def mounts() -> Iterator[dict[str, str]]:
    """One private tmpfs and hugetlbfs per kind, for the whole session."""
    paths: dict[str, str] = {}
    managers = []
    try:
        for kind, (fs, options, _, _) in KINDS.items():
            manager = private_mount(fs, options, prefix=f"numa-{kind}-")
            paths[kind] = manager.__enter__()
            managers.append(manager)
        yield paths
    finally:
        for manager in reversed(managers):
            manager.__exit__(None, None, None)


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pages_per_node(path: str, offset_bytes: int, length_bytes: int) -> dict[int, int]:
    """On which node each page of ``path``'s range lies: ``{node: pages}``.

    Maps the range shared, faults in the pages the file already holds (MADV_POPULATE_READ
    allocates none on hugetlbfs, and finds every page of a populated tmpfs file), and reads
    the mapping's ``N<node>=<pages>`` from /proc/self/numa_maps (via kvmaccel.launch.status).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        addr = sysmem.mmap_shared(fd, length_bytes, offset_bytes)
        try:
            sysmem.madvise(addr, length_bytes, MADV_POPULATE_READ)
            area = next(a for a in read_vm_areas(os.getpid()) if a.start == addr)
            return dict(area.pages_per_node)
        finally:
            sysmem.munmap(addr, length_bytes)
    finally:
        os.close(fd)


def record(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """Keep a measurement in the junit XML (the host-side test reports it) and in
    ``$KVMACCEL_NUMA_OUT/measurements.jsonl``."""
    request.node.user_properties.append((name, json.dumps(value)))
    out = os.environ.get("KVMACCEL_NUMA_OUT")
    if out:
        with open(os.path.join(out, "measurements.jsonl"), "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, name: value,
                                "misbind": sysmem.mbind is not REAL_MBIND})
                    + "\n")
