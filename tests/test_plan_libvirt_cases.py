"""The planner against libvirt's own qemuxmlconftest output (tests/data/libvirt-cases/).

Every case is planned with that corpus's harness settings (README.md there): id -1,
memory_backing_dir /var/lib/libvirt/qemu/ram, hugetlbfs mounts /dev/hugepages2M (2048 KiB, the
default) and /dev/hugepages1G (1048576 KiB), numad's autoNodeset 0-3, a host with nodes 0-3.
Each memory backend must agree with the ``-object memory-backend-*`` libvirt generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmaccel.host.facts import HostFacts, HugePagePool, Mount, NumaNode
from kvmaccel.model.domain import parse_domain
from kvmaccel.model.qemuconf import QemuConf
from kvmaccel.plan.libvirt import HugetlbfsMount
from kvmaccel.plan.limits import Limits
from kvmaccel.plan.planner import plan_domain

CASES_DIR = Path(__file__).resolve().parent / "data" / "libvirt-cases"
CASES = sorted(p.name[: -len(".expected.json")] for p in CASES_DIR.glob("*.expected.json"))

# Fields the acceptance criterion names, plus the QOM type and prealloc flag.
FIELDS = ("qom_type", "mem_path", "size_bytes", "share", "prealloc", "prealloc_threads",
          "host_nodes", "policy")


def harness_host() -> HostFacts:
    """libvirt's test driver host (tests/vircaps2xmldata/linux-basic): nodes 0-3."""
    pools = {2048: HugePagePool(2048, 4096, 4096), 1048576: HugePagePool(1048576, 16, 16)}
    nodes = {n: NumaNode(n, frozenset({2 * n, 2 * n + 1}), pools, 8 << 20, 6 << 20)
             for n in range(4)}
    return HostFacts(
        nodes=nodes, online_cpus=frozenset(range(8)), mem_available_kib=24 << 20,
        base_page_size_kib=4, hugepages=pools, default_hugepage_kib=2048,
        mounts=(Mount("/", "ext4", None), Mount("/dev/hugepages2M", "hugetlbfs", 2048),
                Mount("/dev/hugepages1G", "hugetlbfs", 1048576)),
    )


HARNESS_HUGETLBFS = (HugetlbfsMount("/dev/hugepages2M", 2048, True),
                     HugetlbfsMount("/dev/hugepages1G", 1048576, False))


def expected_backend(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": raw["id"], "qom_type": raw["qom_type"], "mem_path": raw["mem_path"],
        "size_bytes": raw["size_bytes"], "share": raw["share"],
        "prealloc": bool(raw["prealloc"]), "prealloc_threads": raw["prealloc_threads"],
        "host_nodes": raw["host_nodes"], "policy": raw["policy"],
    }


def test_corpus_is_complete() -> None:
    assert len(CASES) == 20


@pytest.mark.parametrize("case", CASES)
def test_case_matches_libvirt(case: str) -> None:
    domain = parse_domain((CASES_DIR / f"{case}.xml").read_bytes())
    expected = json.loads((CASES_DIR / f"{case}.expected.json").read_text())
    plan = plan_domain(domain, harness_host(), QemuConf(), Limits(), domain_id=-1,
                       hugetlbfs=HARNESS_HUGETLBFS, auto_nodeset=frozenset(range(4)))
    got = [{"id": b.backend_id, **{f: getattr(b, f) for f in FIELDS}} for b in plan.backends]
    for g in got:
        g["host_nodes"] = list(g["host_nodes"]) if g["host_nodes"] is not None else None
    want = [expected_backend(raw) for raw in expected["backends"]]
    assert got == want
