"""Every caller plans a domain for this host the way the hook does (:mod:`kvmaccel.plan.forhost`).

One config that sets ``qemu_conf`` (a qemu.conf with its own owner), ``[limits]`` and the
energy policy; every vm-fixture as it is and with kvmaccel's front as its ``<emulator>``.  The
hook (``make_plan``), the keeper (``domain_targets``), ``doctor``, ``kvmaccel plan``,
``pool fill --for``, ``prealloc`` and ``status`` each plan it; what each hands to the planner
is caught at :func:`kvmaccel.plan.planner.plan_domain` and the plans are compared whole.  The
host is the two-node tree of the vm-fixtures for all of them, so that free memory moving
between two calls changes nothing.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import kvmaccel.cli.main
import kvmaccel.cli.plan
import kvmaccel.cli.pool
import kvmaccel.cli.run
import kvmaccel.launch.prealloc
import kvmaccel.libvirt.ops
import kvmaccel.pool.keep
import kvmaccel.setup.doctor
from kvmaccel.host import facts
from kvmaccel.model.domain import parse_domain
from kvmaccel.plan import planner
from kvmaccel.plan.config import read_config
from kvmaccel.plan.planjson import plan_to_json
from kvmaccel.plan.planner import DomainPlan
from kvmaccel.setup import front
from tests.conftest import use_environment

TOP = Path(__file__).resolve().parents[1]
FIXTURES = TOP / "vm-fixtures"
TWO_NODE = TOP / "tests" / "data" / "sysfs" / "two-node"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.xml"))
QEMU = "/usr/bin/qemu-system-x86_64"
LIMIT_ARGS = ["--threads", "3", "--max-helpers-per-node", "1", "--min-chunk", "64M"]
CONFIG = """qemu_conf = "{qemu_conf}"
energy = "powersave"
energy_threads = 2
[limits]
threads = 3
max_helpers_per_node = 1
min_chunk_mib = 64
"""


class Stop(Exception):
    """Raised once a command has planned: what it would do next is not under test."""


@dataclass
class Spy:
    plans: list[DomainPlan] = field(default_factory=list)
    stop: bool = False

    def plan(self, *args: Any, **kwargs: Any) -> DomainPlan:
        result = ORIGINAL(*args, **kwargs)
        self.plans.append(result)
        if self.stop:
            raise Stop
        return result

    def only(self) -> dict[str, object]:
        assert len(self.plans) == 1, self.plans
        return plan_to_json(self.plans.pop())


ORIGINAL = planner.plan_domain
READ_HOST = facts.read_host


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    """plan_domain and read_host replaced wherever a kvmaccel module holds them."""
    assert kvmaccel.cli.main  # every command's module is loaded
    watcher = Spy()
    host = READ_HOST(str(TWO_NODE))
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("kvmaccel"):
            continue
        if getattr(module, "plan_domain", None) is ORIGINAL:
            monkeypatch.setattr(module, "plan_domain", watcher.plan)
        if getattr(module, "read_host", None) is READ_HOST:
            monkeypatch.setattr(module, "read_host", lambda root="/": host)
    yield watcher


@dataclass(frozen=True)
class Case:
    xml_path: str
    xml: str
    config_path: str


@pytest.fixture(params=[(n, f) for n in NAMES for f in (False, True)],
                ids=lambda p: f"{p[0]}-{'front' if p[1] else 'plain'}")
def case(request: pytest.FixtureRequest, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Case:
    name, through_front = request.param
    xml = (FIXTURES / f"{name}.xml").read_text()
    if through_front:
        path = tmp_path / "qemu-system-x86_64-kvmaccel"
        path.write_text(front.render(QEMU))
        xml = xml.replace(f"<emulator>{QEMU}</emulator>", f"<emulator>{path}</emulator>")
        assert front.is_front(str(path)) and str(path) in xml
    conf = FIXTURES / f"{name}.qemu.conf"
    text = conf.read_text() if conf.exists() else 'memory_backing_dir = "/dev/shm"\n'
    lines = [x for x in text.splitlines() if not x.startswith(("user", "group"))]
    qemu_conf = tmp_path / "qemu.conf"
    qemu_conf.write_text("\n".join([*lines, 'user = "nobody"', 'group = "nogroup"', ""]))
    config = tmp_path / "kvmaccel.toml"
    config.write_text(CONFIG.format(qemu_conf=qemu_conf))
    use_environment(monkeypatch, KVMACCEL_CONFIG=str(config))
    xml_path = tmp_path / f"{name}.xml"
    xml_path.write_text(xml)
    return Case(str(xml_path), xml, str(config))


def fake_libvirt(xml: str) -> types.SimpleNamespace:
    """libvirt-python as the keeper uses it, with one persistent domain."""

    class Dom:
        def name(self) -> str:
            return "guest"

        def autostart(self) -> bool:
            return False

        def XMLDesc(self, flags: int) -> str:  # noqa: N802 (libvirt's name)
            return xml

    class Conn:
        def listAllDomains(self, flags: int) -> list[Dom]:  # noqa: N802
            return [Dom()]

        def close(self) -> None:
            pass

    return types.SimpleNamespace(openReadOnly=lambda uri: Conn(), libvirtError=RuntimeError,
                                 VIR_CONNECT_LIST_DOMAINS_PERSISTENT=2,
                                 VIR_DOMAIN_XML_INACTIVE=1)


def cli(spy: Spy, *args: str) -> dict[str, object]:
    """The plan the command made, or what it said instead of planning."""
    spy.stop = True
    result = CliRunner().invoke(kvmaccel.cli.main.main, list(args))
    spy.stop = False
    if not isinstance(result.exception, Stop):
        assert not spy.plans
        return {"error": f"{result.exception!r}: {result.output.strip()}"}
    return spy.only()


def test_every_caller_plans_a_domain_as_the_hook_does(
        case: Case, spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    config = read_config(case.config_path)
    kvmaccel.libvirt.ops.make_plan(case.xml.encode(), config)
    hook = spy.only()
    domain = parse_domain(case.xml)
    got: dict[str, dict[str, object]] = {}

    monkeypatch.setitem(sys.modules, "libvirt", fake_libvirt(case.xml))
    kvmaccel.pool.keep.domain_targets(config, READ_HOST(str(TWO_NODE)), "test:///")
    got["keeper"] = spy.only()

    kvmaccel.setup.doctor.check_guests(kvmaccel.setup.doctor.DoctorInput(
        config_path=case.config_path, domains=[("guest", case.xml)],
        host=READ_HOST(str(TWO_NODE))))
    got["doctor"] = spy.only()

    got["plan"] = cli(spy, "plan", case.xml_path, "--config", case.config_path, "--json")

    domain_id = domain.domain_id if domain.domain_id is not None else -1
    monkeypatch.setattr(kvmaccel.cli.run, "domain_xml", lambda name, uri: (case.xml, domain_id))
    got["status"] = cli(spy, "status", "--domain", "guest")

    populated = [b for b in hook["backends"] if b["populate"]]  # type: ignore[union-attr]
    if populated:  # fill --for refuses a domain kvmaccel populates nothing of
        got["pool fill --for"] = cli(spy, "pool", "fill", "--for", case.xml_path, *LIMIT_ARGS)

    prealloc = cli(spy, "prealloc", case.xml_path, *LIMIT_ARGS)
    if "kvmaccel" not in (domain.emulator or ""):
        got["prealloc"] = prealloc
    else:  # prealloc makes the files libvirt names, never the front's (the hook's, per start)
        assert "error" not in prealloc, prealloc["error"]
        assert not any(b["front"] for b in prealloc["backends"])  # type: ignore[union-attr]

    differ = {caller: plan.get("error") or sorted(k for k in hook if plan.get(k) != hook[k])
              for caller, plan in got.items() if plan != hook}
    assert differ == {}


def test_plan_with_a_config_that_does_not_exist_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess

    missing = tmp_path / "no-such.toml"
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "plan",
                           str(FIXTURES / "small-shm.xml"), "--config", str(missing)],
                          capture_output=True, text=True, timeout=60)
    # old: exit 0, the plan with the defaults, as if no --config were given
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
