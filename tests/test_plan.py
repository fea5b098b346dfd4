"""kvmaccel.plan.planner and ``kvmaccel plan``: golden plans for vm-fixtures/, decisions, bad input.

Every fixture is planned against the fake two-node host in tests/data/sysfs/two-node with its
``NAME.qemu.conf`` (if any) and ``--id 7``; the JSON must equal ``NAME.plan.json``.  After a
deliberate change, rewrite the golden files with ``pytest tests/test_plan.py --regen-golden``
and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmaccel.cli.main import main
from kvmaccel.errors import PlanError
from kvmaccel.host.facts import read_host
from kvmaccel.model.domain import parse_domain
from kvmaccel.model.qemuconf import QemuConf, qemu_conf_from_text
from kvmaccel.plan.libvirt import shortname
from kvmaccel.plan.limits import Limits
from kvmaccel.plan.planjson import plan_to_json
from kvmaccel.plan.planner import plan_domain, split_by_node

TOP = Path(__file__).resolve().parents[1]
FIXTURES = TOP / "vm-fixtures"
TWO_NODE = TOP / "tests" / "data" / "sysfs" / "two-node"
ONE_NODE = TOP / "tests" / "data" / "sysfs" / "one-node"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.xml"))


def run_plan(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.stdout, result.stderr


def fixture_args(name: str) -> list[str]:
    # An empty config: the energy policy's defaults, whatever /etc/kvmaccel holds here.
    args = [str(FIXTURES / f"{name}.xml"), "--root", str(TWO_NODE), "--id", "7",
            "--config", os.devnull]
    conf = FIXTURES / f"{name}.qemu.conf"
    if conf.exists():
        args += ["--qemu-conf", str(conf)]
    return args


def test_enough_fixtures() -> None:
    assert len(NAMES) >= 8
    assert len([n for n in NAMES if n.startswith("small-")]) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_golden(name: str, regen_golden: bool) -> None:
    code, out, err = run_plan(*fixture_args(name), "--json")
    assert code == 0, err
    got = json.loads(out)
    golden = FIXTURES / f"{name}.plan.json"
    before = json.loads(golden.read_text()) if golden.exists() else None
    if regen_golden and got != before:
        golden.write_text(json.dumps(got, indent=2) + "\n")
        # Never green on a plan that differed: review the change, then run without the switch.
        pytest.fail(f"rewrote {golden.name}; review it (git diff vm-fixtures), then run again")
    assert before is not None, f"no {golden.name}; run pytest --regen-golden"
    assert got == before


@pytest.mark.parametrize("name", NAMES)
def test_fixture_table(name: str) -> None:
    code, out, err = run_plan(*fixture_args(name))
    assert code == 0, err
    assert out.startswith("domain ")
    assert "BACKEND" in out and "threads:" in out


def two_node_plan(xml: str, conf: str = 'memory_backing_dir = "/dev/shm"\n',
                  limits: Limits | None = None) -> dict[str, object]:
    host = read_host(str(TWO_NODE))
    plan = plan_domain(parse_domain(xml), host, qemu_conf_from_text(conf), limits or Limits(),
                       domain_id=3)
    return plan_to_json(plan)


def test_gpu_guest_plan() -> None:
    data = json.loads((FIXTURES / "gpu-320g-2node.plan.json").read_text())
    b0, b1 = data["backends"]
    assert b0["mem_path"] == "/dev/hugepages/libvirt/qemu/7-gpu-render-01/ram-node0"
    assert (b0["size_bytes"], b0["page_size_kib"], b0["host_nodes"], b0["policy"]) == (
        160 << 30, 2048, [0], "bind")
    assert b0["populate"] and b1["populate"] and b1["host_nodes"] == [1]
    assert data["helpers"]["threads"] == 16  # <allocation threads='16'/>
    assert data["libvirt"]["created_dirs"] == ["/dev/hugepages/libvirt/qemu/7-gpu-render-01"]
    assert [c["ok"] for c in data["capacity"]] == [True, True, True]  # nodes 0, 1, host-wide
    assert any("VFIO" in n for n in data["notes"])


def test_small_fixtures_populate_on_shm_and_hugetlbfs() -> None:
    shm = json.loads((FIXTURES / "small-shm.plan.json").read_text())["backends"]
    huge = json.loads((FIXTURES / "small-hugetlbfs-node0.plan.json").read_text())["backends"]
    assert [(b["populate"], b["filesystem"], b["size_bytes"]) for b in shm] == [
        (True, "tmpfs", 1 << 30)]
    assert [(b["populate"], b["filesystem"], b["host_nodes"]) for b in huge] == [
        (True, "hugetlbfs", [0])]


def test_interleave_splits_work_between_nodes() -> None:
    data = json.loads((FIXTURES / "interleave.plan.json").read_text())
    assert data["work"] == [{"node": 0, "bytes": 32 << 30}, {"node": 1, "bytes": 32 << 30}]


def test_capacity_reports_shortage_with_numbers() -> None:
    data = json.loads((FIXTURES / "hugepages-1g-per-node.plan.json").read_text())
    node1 = [c for c in data["capacity"] if c["node"] == 1][0]
    assert (node1["needed_bytes"], node1["available_bytes"], node1["ok"]) == (
        64 << 30, 60 << 30, False)


@pytest.mark.parametrize(("name", "reason"), [
    ("small-hugepages", "directory"), ("memfd-2node", "memfd"), ("private-file", "private"),
    ("auto-placement", "numad"), ("restrictive", "restrictive"), ("disk-backing-dir", "ext4"),
])
def test_skip_reasons(name: str, reason: str) -> None:
    data = json.loads((FIXTURES / f"{name}.plan.json").read_text())
    assert all(not b["populate"] and reason in b["skip_reason"] for b in data["backends"])
    assert data["work"] == []


def test_plan_does_not_mutate_inputs() -> None:
    domain = parse_domain((FIXTURES / "dimm-hotplug.xml").read_bytes())
    host = read_host(str(TWO_NODE))
    conf = QemuConf(memory_backing_dir="/dev/hugepages/libvirt/qemu")
    limits = Limits(threads=4)
    before = copy.deepcopy((domain, host, conf, limits))
    first = plan_domain(domain, host, conf, limits)
    assert (domain, host, conf, limits) == before
    assert plan_to_json(first) == plan_to_json(plan_domain(domain, host, conf, limits))


def test_allocation_threads_and_configured_limit_take_the_smaller() -> None:
    xml = (FIXTURES / "gpu-320g-2node.xml").read_text()
    conf = (FIXTURES / "gpu-320g-2node.qemu.conf").read_text()
    assert two_node_plan(xml, conf, Limits(threads=4))["helpers"]["threads"] == 4  # type: ignore[index]
    assert two_node_plan(xml, conf, Limits(threads=64))["helpers"]["threads"] == 16  # type: ignore[index]


def test_nodeset_missing_on_host_is_a_plan_error() -> None:
    xml = (FIXTURES / "small-hugetlbfs-node0.xml").read_text().replace(
        "nodeset='0'", "nodeset='0,2-3'")
    with pytest.raises(PlanError, match=r"node\(s\) 2-3 .* it has node\(s\) 0-1"):
        two_node_plan(xml)


def test_shortname_truncates_to_20_characters() -> None:
    assert shortname("SomeDummyHugepagesGuest", -1) == "-1-SomeDummyHugepagesGu"
    assert shortname("ελληνικό-όνομα-μεγάλο-πολύ", 4) == "4-ελληνικό-όνομα-μεγάλ"


def test_split_by_node_keeps_whole_pages() -> None:
    data = json.loads((FIXTURES / "interleave.plan.json").read_text())
    assert data["backends"][0]["file_size_bytes"] == 64 << 30
    domain = parse_domain((FIXTURES / "interleave.xml").read_bytes())
    plan = plan_domain(domain, read_host(str(TWO_NODE)),
                       QemuConf(memory_backing_dir="/dev/shm/libvirt/qemu"), Limits())
    parts = split_by_node(plan.backends[0])
    assert sum(parts.values()) == 64 << 30 and all(v % 4096 == 0 for v in parts.values())


def test_one_node_host_small_guest() -> None:
    code, out, err = run_plan(str(FIXTURES / "small-shm.xml"), "--root", str(ONE_NODE),
                              "--qemu-conf", str(FIXTURES / "small-shm.qemu.conf"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["domain"]["shortname"] == "-1-kvmaccel-small-shm"
    assert data["backends"][0]["populate"] is True
    assert data["helpers"]["per_node"] == [{"node": None, "helpers": 1}]


# --- bad input: one clear line on stderr, non-zero exit -------------------------------------

GOOD = (FIXTURES / "small-shm.xml").read_text()


@pytest.mark.parametrize(("xml", "message"), [
    ("<domain type='kvm'><name>x</name><memory>1024</memory>", "malformed domain XML"),
    (GOOD.replace("unit='MiB'>1024</memory>", "unit='MiBs'>1024</memory>"), "unknown unit 'MiBs'"),
    (GOOD.replace("<memory unit='MiB'>1024</memory>", ""), "missing <memory>"),
    ((FIXTURES / "dimm-hotplug.xml").read_text().replace("unit='GiB'>128</maxMemory>",
                                                         "unit='GiB'>32</maxMemory>"),
     "add up to"),
    (GOOD.replace("<name>kvmaccel-small-shm</name>", "<name>..</name>"),
     "cannot be used in a path"),
    (GOOD.replace("<name>kvmaccel-small-shm</name>", "<name>../../etc</name>"),
     "cannot be used in a path"),
    (GOOD.replace("kvmaccel-small-shm", "a\0b"), "NUL byte at line"),
    ((FIXTURES / "small-hugetlbfs-node0.xml").read_text().replace("nodeset='0'", "nodeset='5'"),
     "node(s) 5 that this host lacks; it has node(s) 0-1"),
])
def test_bad_input(tmp_path: Path, xml: str, message: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_bytes(xml.encode())
    code, out, err = run_plan(str(path), "--root", str(TWO_NODE), "--qemu-conf",
                              str(FIXTURES / "small-hugetlbfs-node0.qemu.conf"))
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmaccel: error: ")
    assert message in lines[0]


def test_missing_domain_file(tmp_path: Path) -> None:
    code, _, err = run_plan(str(tmp_path / "nope.xml"))
    assert code == 2 and "cannot read" in err
