"""``kvmaccel plan`` with a stored tuning and the energy policy: the tuned per-node count is
used when the fingerprint matches and ignored, with the reason, when it does not; the energy
decision and its signal are in the table and the JSON; the plan's limits (what the hook hands
the engine) carry both."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from click.testing import CliRunner

from kvmaccel.cli.main import main
from kvmaccel.host.facts import read_host
from kvmaccel.model.domain import parse_domain
from kvmaccel.model.qemuconf import qemu_conf_from_text
from kvmaccel.plan.energy import EnergyDecision
from kvmaccel.plan.limits import Limits
from kvmaccel.plan.planner import plan_domain
from kvmaccel.plan.tuning import Curve, Tuning, host_fingerprint, resolve_tuning, save_tuning

from .conftest import need
from .test_plan_energy import fake_host

TOP = Path(__file__).resolve().parents[1]
TWO_NODE = TOP / "tests" / "data" / "sysfs" / "two-node"
FIXTURES = TOP / "vm-fixtures"
GIB = 1 << 30


def two_node_tuning(**fingerprint_changes: object) -> Tuning:
    """Node 0 saturates at 4 threads, node 1 at 6 (base pages), as measured on two-node."""
    fp = host_fingerprint(read_host(str(TWO_NODE)), str(TWO_NODE))
    fp = dataclasses.replace(fp, **fingerprint_changes)  # type: ignore[arg-type]

    def curve(node: int, knee: int) -> Curve:
        return Curve(node, 4, "memfd", GIB, tuple(
            (t, (1.0 / min(t, knee),)) for t in range(1, 33)))

    return Tuning(fp, 1764000000.0, 1, (curve(0, 4), curve(1, 6)))


def plan_cli(*args: str, root: str = str(TWO_NODE)) -> tuple[int, str]:
    result = CliRunner().invoke(main, [
        "plan", str(FIXTURES / "interleave.xml"), "--qemu-conf",
        str(FIXTURES / "interleave.qemu.conf"), "--root", root, "--config", os.devnull, *args])
    return result.exit_code, result.stdout + result.stderr


def test_plan_uses_the_tuned_count() -> None:
    save_tuning(two_node_tuning())
    code, out = plan_cli()
    assert code == 0, out
    assert "threads: 9 (the caller and 8 helper(s): node 0 3, node 1 5)" in out
    assert ("  - per-node default measured by kvmaccel tune on 2025-11-24T16:00:00Z: node 0 "
            "3 helper(s) (knee at 4 thread(s)), node 1 5 helper(s) (knee at 6 thread(s))") in out
    assert "  - node 0: per-node cap 3 (measured by kvmaccel tune)" in out
    code, out = plan_cli("--json")
    data = json.loads(out)
    assert data["tuning"]["status"] == "used"
    assert data["tuning"]["helpers_per_node"] == [{"node": 0, "helpers": 3},
                                                  {"node": 1, "helpers": 5}]
    assert data["helpers"]["per_node"] == [{"node": 0, "helpers": 3}, {"node": 1, "helpers": 5}]


def test_plan_ignores_a_tuning_from_another_host() -> None:
    save_tuning(two_node_tuning(kernel_release="5.10.0-28-amd64"))
    code, out = plan_cli()
    assert code == 0, out
    assert "threads: 51 (the caller and 50 helper(s): node 0 25, node 1 25)" in out
    assert ("  - tuning from 2025-11-24T16:00:00Z ignored: the host changed (kernel "
            "5.10.0-28-amd64 -> 6.1.0-18-amd64); run kvmaccel tune again") in out
    data = json.loads(plan_cli("--json")[1])
    assert data["tuning"]["status"] == "ignored" and data["tuning"]["helpers_per_node"] == []


def test_plan_ignores_a_broken_tuning_file(state_dir: str) -> None:
    Path(state_dir, "tuning.json").write_text("{not json")
    code, out = plan_cli()
    assert code == 0, out
    assert "threads: 51" in out and "tuning not used: " in out and "not a kvmaccel tuning" in out


def test_plan_ignores_a_tuning_file_kvmaccel_did_not_write(state_dir: str) -> None:
    """Root read tuning.json by path: a file another user could write set how many threads
    root starts.  It is read as kvmaccel's own file now, and written as one (0600)."""
    need(os.geteuid() == 0, "needs root (a file of nobody's)")
    path = save_tuning(two_node_tuning())
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert plan_cli()[1].count("threads: 9 ") == 1
    os.chown(path, 65534, 65534)
    code, out = plan_cli()
    assert code == 0, out
    assert "threads: 51" in out and "tuning not used: " in out and "uid 65534" in out
    os.chown(path, 0, 0)
    os.chmod(state_dir, 0o777)  # a directory others can write: nothing in it is kvmaccel's
    code, out = plan_cli()
    assert code == 0, out
    assert "threads: 51" in out and "tuning not used: " in out


def test_plan_shows_tuned_count_and_energy_decision_together(tmp_path: Path) -> None:
    save_tuning(two_node_tuning())
    root = fake_host(tmp_path, "powersave", "balance_power")
    code, out = plan_cli(root=root)
    assert code == 0, out
    assert "threads: 1 (the caller and 0 helper(s)" in out
    assert ("  - energy policy: energy = auto, signal powersave_epp (powersave/EPP balance_power"
            " on 64 CPU(s)): at most 1 thread(s), the caller included") in out
    assert "per-node default measured by kvmaccel tune" in out
    data = json.loads(plan_cli("--json", root=root)[1])
    assert data["energy"] == {
        "mode": "auto", "max_threads": 1, "deciding_signal": "powersave_epp",
        "reason": "energy = auto, signal powersave_epp (powersave/EPP balance_power on 64 "
                  "CPU(s)): at most 1 thread(s), the caller included",
        "signals": [{"name": "powersave_epp", "detail": "powersave/EPP balance_power on 64 CPU(s)"},
                    {"name": "powersave_governor",
                     "detail": "powersave/EPP balance_power on 64 CPU(s)"},
                    {"name": "energy_epp", "detail": "powersave/EPP balance_power on 64 CPU(s)"}]}


def test_plan_limits_are_what_the_engine_runs_with() -> None:
    host = read_host(str(TWO_NODE))
    tuned = resolve_tuning(two_node_tuning(), host_fingerprint(host, str(TWO_NODE)))
    domain = parse_domain((FIXTURES / "gpu-320g-2node.xml").read_bytes())
    conf = qemu_conf_from_text((FIXTURES / "gpu-320g-2node.qemu.conf").read_text())
    plan = plan_domain(domain, host, conf, Limits(), tuned=tuned,
                       energy=EnergyDecision(2, "on_battery", "on battery"))
    assert plan.limits.threads == 2  # <allocation threads='16'/>, then the energy cap
    assert plan.limits.tuned_helpers_per_node == ((0, 3), (1, 5))
    assert plan.helpers.reasons[:2] == ("<allocation threads='16'/> in the domain XML",
                                        "energy policy: on battery")
    plain = plan_domain(domain, host, conf, Limits())
    assert plain.limits == Limits(threads=16) and plain.tuning is None and plain.energy is None


def test_the_hook_runs_the_engine_with_the_plans_limits() -> None:
    """The hook's engine limits are the plan's: energy cap and tuned counts included."""
    from kvmaccel.libvirt.ops import make_plan
    from kvmaccel.plan.config import parse_config

    host = read_host()
    fp = host_fingerprint(host)
    save_tuning(Tuning(fp, 1764000000.0, 1, tuple(
        Curve(n, 4, "memfd", GIB, ((1, (1.0,)), (2, (0.5,)))) for n, _ in fp.nodes)))
    xml = (FIXTURES / "small-shm.xml").read_bytes()
    plan, limits = make_plan(xml, parse_config('energy = "powersave"\nenergy_threads = 2\n'))
    assert limits == plan.limits and limits.threads == 2
    assert limits.tuned_helpers_per_node == tuple((n, 1) for n, _ in fp.nodes)
    assert plan.energy is not None and plan.energy.deciding_signal == "energy=powersave"
    _, limits = make_plan(xml, parse_config('energy = "performance"\n'))
    assert limits.threads is None
