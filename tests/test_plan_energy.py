"""The energy policy on fake /sys trees (copies of tests/data/sysfs/two-node with the governor,
EPP and power supplies a laptop or a tuned server has), and its config keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvmaccel.errors import ConfigError, UsageError
from kvmaccel.host.facts import PowerSupply, read_cpu_energy, read_energy, read_power_supplies
from kvmaccel.plan.config import parse_config
from kvmaccel.plan.energy import EnergyDecision, EnergySettings, apply_energy, decide
from kvmaccel.plan.limits import Limits

TOP = Path(__file__).resolve().parents[1]
TWO_NODE = TOP / "tests" / "data" / "sysfs" / "two-node"
ONE_NODE = TOP / "tests" / "data" / "sysfs" / "one-node"


def fake_host(tmp_path: Path, governor: str = "performance", epp: str | None = "performance",
              battery: str | None = None, ac_online: bool | None = None,
              mouse: bool = False) -> str:
    """two-node with every CPU at ``governor``/``epp`` (None: no EPP file, as on acpi-cpufreq)
    and, as on a laptop, ``BAT0`` with ``status`` ``battery`` and ``AC`` with ``online``."""
    root = tmp_path / "host"
    shutil.copytree(TWO_NODE, root)
    for d in (root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"):
        (d / "scaling_governor").write_text(f"{governor}\n")
        if epp is None:
            for name in ("energy_performance_preference",
                         "energy_performance_available_preferences"):
                (d / name).unlink()
        else:
            (d / "energy_performance_preference").write_text(f"{epp}\n")
    supplies = root / "sys/class/power_supply"
    supplies.mkdir(parents=True)
    if battery is not None:
        bat = supplies / "BAT0"
        bat.mkdir()
        for name, value in (("type", "Battery"), ("status", battery), ("capacity", "43"),
                            ("present", "1"), ("technology", "Li-ion")):
            (bat / name).write_text(f"{value}\n")
    if ac_online is not None:
        ac = supplies / "AC"
        ac.mkdir()
        (ac / "type").write_text("Mains\n")
        (ac / "online").write_text(f"{int(ac_online)}\n")
    if mouse:
        dev = supplies / "hidpp_battery_0"
        dev.mkdir()
        for name, value in (("type", "Battery"), ("scope", "Device"),
                            ("status", "Discharging"), ("capacity", "10")):
            (dev / name).write_text(f"{value}\n")
    return str(root)


def test_reads_governor_epp_and_supplies(tmp_path: Path) -> None:
    root = fake_host(tmp_path, "powersave", "balance_power", battery="Discharging",
                     ac_online=False, mouse=True)
    cpus = read_cpu_energy(root)
    assert len(cpus) == 64 and {(c.governor, c.epp) for c in cpus} == {
        ("powersave", "balance_power")}
    assert read_power_supplies(root) == (
        PowerSupply("AC", "Mains", online=False),
        PowerSupply("BAT0", "Battery", status="Discharging", capacity_percent=43),
        PowerSupply("hidpp_battery_0", "Battery", status="Discharging", capacity_percent=10,
                    scope="Device"),
    )


def test_this_machine_and_a_vm_tree_have_no_signals() -> None:
    assert read_energy(str(ONE_NODE)).cpus == ()
    decision = decide(EnergySettings(), read_energy())
    assert decision.mode == "auto"  # whatever this machine reports, deciding never fails


AUTO = EnergySettings()
POWERSAVE = EnergySettings(mode="powersave")
PERFORMANCE = EnergySettings(mode="performance")
ALL_SIGNALS = EnergySettings(signals=("on_battery", "powersave_epp", "powersave_governor",
                                      "energy_epp"))


@pytest.mark.parametrize(("host", "settings", "max_threads", "signal"), [
    # servers: intel_pstate in its two governors, acpi-cpufreq without EPP
    ({}, AUTO, None, None),
    ({"governor": "powersave", "epp": "balance_performance"}, AUTO, None, None),
    ({"governor": "powersave", "epp": "balance_power"}, AUTO, 1, "powersave_epp"),
    ({"governor": "powersave", "epp": "power"}, AUTO, 1, "powersave_epp"),
    ({"governor": "powersave", "epp": None}, AUTO, None, None),
    ({"governor": "schedutil", "epp": None}, AUTO, None, None),
    ({"governor": "powersave", "epp": "default"}, ALL_SIGNALS, 1, "powersave_governor"),
    ({"governor": "performance", "epp": "power"}, AUTO, None, None),
    ({"governor": "performance", "epp": "power"}, ALL_SIGNALS, 1, "energy_epp"),
    # laptops: battery and mains
    ({"battery": "Discharging", "ac_online": False}, AUTO, 1, "on_battery"),
    ({"battery": "Discharging"}, AUTO, 1, "on_battery"),  # no mains entry: the status says
    ({"battery": "Charging", "ac_online": True}, AUTO, None, None),
    ({"battery": "Full", "ac_online": True}, AUTO, None, None),
    ({"battery": "Not charging", "ac_online": True}, AUTO, None, None),
    ({"mouse": True}, AUTO, None, None),  # a wireless mouse's battery is not the host's
    ({"battery": "Discharging", "ac_online": False}, EnergySettings(signals=("powersave_epp",)),
     None, None),
    ({"battery": "Discharging", "ac_online": False, "governor": "powersave",
      "epp": "power"}, AUTO, 1, "on_battery"),  # the first signal in SIGNALS order decides
    # the explicit modes
    ({"battery": "Discharging", "ac_online": False}, PERFORMANCE, None, "energy=performance"),
    ({}, POWERSAVE, 1, "energy=powersave"),
    ({}, EnergySettings(mode="powersave", threads=3), 3, "energy=powersave"),
    ({"governor": "powersave", "epp": "power"}, EnergySettings(threads=2), 2, "powersave_epp"),
])
def test_decisions(tmp_path: Path, host: dict[str, object], settings: EnergySettings,
                   max_threads: int | None, signal: str | None) -> None:
    decision = decide(settings, read_energy(fake_host(tmp_path, **host)))  # type: ignore[arg-type]
    assert (decision.max_threads, decision.deciding_signal) == (max_threads, signal)
    assert decision.reason.startswith(f"energy = {settings.mode}")
    if signal and not signal.startswith("energy="):
        assert signal in decision.reason


def test_reasons_name_what_was_seen(tmp_path: Path) -> None:
    on_battery = decide(AUTO, read_energy(fake_host(tmp_path, battery="Discharging",
                                                    ac_online=False)))
    assert on_battery.reason == ("energy = auto, signal on_battery (on battery: BAT0 at 43%, "
                                 "mains AC offline): at most 1 thread(s), the caller included")
    ignored = decide(PERFORMANCE, read_energy(str(tmp_path / "host")))
    assert "signals ignored (ignored: on battery: BAT0 at 43%" in ignored.reason
    assert [name for name, _ in ignored.holding] == ["on_battery"]


def test_apply_energy_takes_the_smaller() -> None:
    cap = EnergyDecision(2, "on_battery", "r")
    assert apply_energy(Limits(), cap).threads == 2
    assert apply_energy(Limits(threads=8), cap).threads == 2
    assert apply_energy(Limits(threads=1), cap).threads == 1
    unlimited = EnergyDecision(None, None, "r")
    assert apply_energy(Limits(threads=8), unlimited) == Limits(threads=8)


@pytest.mark.parametrize("kwargs", [{"mode": "eco"}, {"threads": 0}, {"signals": ("lid",)}])
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        EnergySettings(**kwargs)  # type: ignore[arg-type]


def test_config_keys() -> None:
    assert parse_config("").energy == EnergySettings()
    conf = parse_config('energy = "powersave"\nenergy_threads = 2\n'
                        'energy_signals = ["on_battery", "energy_epp"]\n')
    assert conf.energy == EnergySettings("powersave", 2, ("on_battery", "energy_epp"))
    for bad, match in [('energy = "eco"', "energy must be one of"),
                       ("energy_threads = 0", "at least 1"),
                       ('energy_signals = ["lid"]', "unknown energy signal"),
                       ("energy_signals = [1]", "list of names"),
                       ('energy_threads = "1"', "must be a int")]:
        with pytest.raises(ConfigError, match=match):
            parse_config(bad, "/etc/kvmaccel/kvmaccel.toml")
