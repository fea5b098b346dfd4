"""The planner through kvmaccel's emulator front, and ``enable``/``disable`` of the XML.

The issue's acceptance: on every XML of ``tests/data/libvirt-cases`` and ``vm-fixtures``, after
``kvmaccel enable --xml FILE --dry-run``, ``kvmaccel plan`` populates every hugepage-directory
and hugetlb-memfd backend (libvirt cases planned as libvirt's harness host; fixtures as the
two-node fake host, like tests/test_plan.py), and says why for each backend it skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmaccel.cli.main import main
from kvmaccel.model.domain import parse_domain
from kvmaccel.model.qemuconf import QemuConf
from kvmaccel.plan.limits import Limits
from kvmaccel.plan.planner import BackendPlan, plan_domain
from kvmaccel.setup.front import disable_xml, enable_xml, remembered_emulator
from tests.test_plan import FIXTURES, fixture_args
from tests.test_plan_libvirt_cases import CASES_DIR, HARNESS_HUGETLBFS, harness_host

CASE_XML = sorted(CASES_DIR.glob("*.xml"))
ALL_XML = CASE_XML + sorted(FIXTURES.glob("*.xml"))
# Why a backend the front could reach is still skipped: the same reasons as for any file.
ALLOWED_SKIPS = ("virtio-mem", "restrictive", "placement='auto'", "holds guest data")


def front_reachable(b: BackendPlan) -> bool:
    huge = b.page_size_kib > 4
    return huge and (b.mem_path_is_dir or b.qom_type == "memory-backend-memfd")


def check_front_plan(backends: list[BackendPlan]) -> None:
    for b in backends:
        assert b.populate or b.skip_reason, b.backend_id
        if front_reachable(b):
            if b.populate:
                assert b.front and b.file_path is not None
                assert os.path.basename(b.file_path) == f"kvmaccel-{b.backend_id}"
                # in the proof directory the hook makes in the guest's directory
                assert os.path.basename(os.path.dirname(b.file_path)) == ".kvmaccel"
                if b.mem_path_is_dir:
                    assert os.path.dirname(os.path.dirname(b.file_path)) == b.mem_path
            else:
                assert any(r in str(b.skip_reason) for r in ALLOWED_SKIPS), b.skip_reason


@pytest.mark.parametrize("path", CASE_XML, ids=lambda p: p.stem)
def test_every_libvirt_case_is_populated_through_the_front(path: Path) -> None:
    xml = enable_xml(path.read_text()).xml
    domain = parse_domain(xml)
    assert domain.emulator == "/usr/bin/qemu-system-x86_64-kvmaccel"
    kwargs = {"domain_id": -1, "hugetlbfs": HARNESS_HUGETLBFS,
              "auto_nodeset": frozenset(range(4))}
    plan = plan_domain(domain, harness_host(), QemuConf(), Limits(), front=True, **kwargs)
    check_front_plan(list(plan.backends))
    before = plan_domain(parse_domain(path.read_bytes()), harness_host(), QemuConf(), Limits(),
                         **kwargs)
    for b in before.backends:
        if front_reachable(b) and not b.populate and "kvmaccel enable" in str(b.skip_reason):
            assert f"kvmaccel enable {domain.name}" in str(b.skip_reason)
    # libvirt's own answer is unchanged: the front changes what QEMU gets, not libvirt
    assert [(b.backend_id, b.mem_path, b.qom_type) for b in before.backends] == \
        [(b.backend_id, b.mem_path, b.qom_type) for b in plan.backends]


def test_the_corpus_has_front_backends() -> None:
    populated = 0
    for path in CASE_XML:
        plan = plan_domain(parse_domain(enable_xml(path.read_text()).xml), harness_host(),
                           QemuConf(), Limits(), domain_id=-1, hugetlbfs=HARNESS_HUGETLBFS,
                           auto_nodeset=frozenset(range(4)), front=True)
        populated += sum(1 for b in plan.backends if b.front)
    assert populated >= 20


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.xml")))
def test_enable_dry_run_then_plan_populates_every_fixture(name: str, tmp_path: Path) -> None:
    runner = CliRunner()
    enabled = runner.invoke(main, ["enable", "--xml", str(FIXTURES / f"{name}.xml"),
                                   "--dry-run"])
    assert enabled.exit_code == 0, enabled.output
    xml_file = tmp_path / f"{name}.xml"
    xml_file.write_text(enabled.stdout)
    args = fixture_args(name)
    args[0] = str(xml_file)
    result = runner.invoke(main, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    for b in plan["backends"]:
        assert b["populate"] or b["skip_reason"]
        huge = b["page_size_kib"] > 4
        if huge and (b["mem_path_is_dir"] or b["qom_type"] == "memory-backend-memfd"):
            assert b["populate"] or any(r in b["skip_reason"] for r in ALLOWED_SKIPS), b
            if b["populate"]:
                assert b["front"] and b["file"].endswith(f"/.kvmaccel/kvmaccel-{b['id']}")


@pytest.mark.parametrize("path", ALL_XML, ids=lambda p: p.stem)
def test_enable_then_disable_gives_back_the_xml_exactly(path: Path) -> None:
    text = path.read_text()
    enabled = enable_xml(text)
    assert enabled.changed and enabled.old == "/usr/bin/qemu-system-x86_64"
    assert remembered_emulator(enabled.xml) == enabled.old
    assert not enable_xml(enabled.xml).changed
    parse_domain(enabled.xml)  # still a domain
    disabled = disable_xml(enabled.xml)
    assert disabled.xml == text and disabled.new == enabled.old
    assert not disable_xml(text).changed


def test_enable_adds_an_emulator_and_disable_removes_it() -> None:
    text = ("<domain type='kvm'>\n  <name>x</name>\n  <memory>1048576</memory>\n"
            "  <metadata>\n    <other xmlns='urn:x'/>\n  </metadata>\n"
            "  <devices>\n  </devices>\n</domain>\n")
    enabled = enable_xml(text)
    assert parse_domain(enabled.xml).emulator == "/usr/bin/qemu-system-x86_64-kvmaccel"
    assert "<other xmlns='urn:x'/>" in enabled.xml
    assert disable_xml(enabled.xml).xml == text


def test_disable_dry_run_prints_the_change(tmp_path: Path) -> None:
    src = FIXTURES / "small-hugepages.xml"
    enabled = tmp_path / "e.xml"
    runner = CliRunner()
    enabled.write_text(runner.invoke(main, ["enable", "--xml", str(src), "--dry-run"]).stdout)
    result = runner.invoke(main, ["disable", "--xml", str(enabled), "--dry-run"])
    assert result.exit_code == 0
    assert result.stdout == src.read_text()
    assert "/usr/bin/qemu-system-x86_64-kvmaccel -> /usr/bin/qemu-system-x86_64" in result.stderr


def test_plan_text_names_the_file_the_front_hands_qemu(tmp_path: Path) -> None:
    runner = CliRunner()
    enabled = runner.invoke(main, ["enable", "--xml", str(FIXTURES / "memfd-2node.xml"),
                                   "--dry-run"])
    xml_file = tmp_path / "memfd-2node.xml"
    xml_file.write_text(enabled.stdout)
    args = fixture_args("memfd-2node")
    args[0] = str(xml_file)
    result = runner.invoke(main, ["plan", *args])
    assert result.exit_code == 0, result.output
    assert "/.kvmaccel/kvmaccel-ram-node0 (the front's; libvirt passes a memfd)" in result.stdout
    assert "the front is not installed" not in result.stdout or "front install" in result.stdout
    before = runner.invoke(main, ["plan", *fixture_args("memfd-2node")])
    assert "kvmaccel enable nfv-router-a" in before.stdout
