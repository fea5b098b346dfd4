"""The energy policy: when kvmaccel holds its helper threads back.  Pure: no I/O.

Populating memory with every CPU is the fastest way to start a big guest, and the most
power-hungry one.  Where energy matters more than start time, the operator says so
explicitly, or kvmaccel recognises a host that is saving energy.  Reviewers of the kernel's
ktask objected that a cpufreq governor alone is a poor signal (intel_pstate's ``powersave``
is its normal dynamic mode), so the governor counts only together with an energy-leaning
EPP, and every decision names the signal that made it.

Settings (:class:`EnergySettings`; in the config file once it carries them)::

    energy = "auto"          # "auto", "performance" or "powersave"
    energy_threads = 1       # threads in all, the caller included, when the policy limits
    energy_signals = ["on_battery", "powersave_epp"]   # the signals auto listens to

* ``performance``: no limit, whatever the signals say (they are still listed).
* ``powersave``: always at most ``energy_threads`` threads.
* ``auto``: at most ``energy_threads`` threads while any signal of ``energy_signals`` holds,
  else no limit.  The first signal that holds, in the order of :data:`SIGNALS`, decides.

Signals (:data:`SIGNALS`):

* ``on_battery``: psutil's rule (``psutil/_pslinux.py``, ``sensors_battery``): a system
  battery exists and no mains supply is online, or, with no mains entry, the battery says
  ``Discharging``.  Batteries with ``scope`` ``Device`` (a wireless mouse) do not count.
* ``powersave_epp``: every CPU with cpufreq runs the ``powersave`` governor with an EPP of
  ``power`` or ``balance_power``: the host leans to energy on purpose.
* ``powersave_governor``: every CPU with cpufreq runs ``powersave``, whatever its EPP (off by
  default: on intel_pstate this is the normal mode of most hosts).
* ``energy_epp``: every CPU with an EPP has ``power`` or ``balance_power``, whatever the
  governor.

A signal that cannot be read (no cpufreq in a VM, no power supply on a server) does not
hold.  Errors: :class:`~kvmaccel.errors.UsageError` for an unknown mode or signal, or fewer
than 1 thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError
from .limits import Limits

if TYPE_CHECKING:  # the hook imports this at every start: keep it light
    from ..host.facts import CpuEnergy, EnergyFacts, PowerSupply

log = logging.getLogger(__name__)

MODES = ("auto", "performance", "powersave")
SIGNALS = ("on_battery", "powersave_epp", "powersave_governor", "energy_epp")
DEFAULT_SIGNALS = ("on_battery", "powersave_epp")
ENERGY_LEANING_EPP = ("power", "balance_power")
DEFAULT_ENERGY_THREADS = 1


@dataclass(frozen=True)
class EnergySettings:
    """The operator's energy policy (see the module docstring for each field).

    ``threads`` counts the calling thread: 1 means the caller alone, no helper at all.
    Raises :class:`UsageError` for an unknown mode or signal, or ``threads`` below 1.
    """

    mode: str = "auto"
    threads: int = DEFAULT_ENERGY_THREADS
    signals: tuple[str, ...] = DEFAULT_SIGNALS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"energy must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.threads < 1:
            raise UsageError(f"energy_threads must be at least 1, not {self.threads}")
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise UsageError(f"unknown energy signal(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(SIGNALS)}")


@dataclass(frozen=True)
class EnergyDecision:
    """What the policy decided.  ``max_threads`` None: no limit.  ``deciding_signal``: the
    signal that imposed the limit, ``energy=powersave``/``energy=performance`` when the mode
    alone decided, None when auto found no signal.  ``holding``: every known signal that
    holds right now, with its description (listed even when it did not decide)."""

    max_threads: int | None
    deciding_signal: str | None
    reason: str
    mode: str = "auto"
    holding: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "max_threads": self.max_threads,
                "deciding_signal": self.deciding_signal, "reason": self.reason,
                "signals": [{"name": n, "detail": d} for n, d in self.holding]}


def _system_batteries(supplies: tuple[PowerSupply, ...]) -> list[PowerSupply]:
    return [s for s in supplies if (s.supply_type == "Battery" or s.name.startswith("BAT"))
            and s.scope != "Device"]


def on_battery(facts: EnergyFacts) -> str | None:
    """A description when the host runs on battery, else None (psutil's rule, see above)."""
    batteries = _system_batteries(facts.supplies)
    if not batteries:
        return None
    bat = batteries[0]
    charge = f" at {bat.capacity_percent}%" if bat.capacity_percent is not None else ""
    mains = [s for s in facts.supplies if s.supply_type == "Mains" and s.online is not None]
    if mains:
        if any(s.online for s in mains):
            return None
        names = ", ".join(s.name for s in mains)
        return f"on battery: {bat.name}{charge}, mains {names} offline"
    if (bat.status or "").lower() == "discharging":
        return f"on battery: {bat.name} discharging{charge}"
    return None


def _every_cpu(facts: EnergyFacts, test: Callable[[CpuEnergy], bool], only_with_epp: bool
               ) -> str | None:
    """A description when ``test`` holds for every CPU with cpufreq (with an EPP, when
    ``only_with_epp``), else None; no such CPU at all is None too."""
    cpus = [c for c in facts.cpus if c.epp is not None or not only_with_epp]
    if not cpus or not all(test(c) for c in cpus):
        return None
    kinds = sorted({c.governor if c.epp is None else f"{c.governor}/EPP {c.epp}" for c in cpus})
    return f"{', '.join(kinds)} on {len(cpus)} CPU(s)"


def signals_holding(facts: EnergyFacts) -> tuple[tuple[str, str], ...]:
    """Every signal of :data:`SIGNALS` that holds, in that order, with a description."""
    found: list[tuple[str, str]] = []
    battery = on_battery(facts)
    if battery:
        found.append(("on_battery", battery))
    checks: list[tuple[str, Callable[[CpuEnergy], bool], bool]] = [
        ("powersave_epp", lambda c: c.governor == "powersave" and c.epp in ENERGY_LEANING_EPP,
         False),
        ("powersave_governor", lambda c: c.governor == "powersave", False),
        ("energy_epp", lambda c: c.epp in ENERGY_LEANING_EPP, True),
    ]
    for name, test, only_with_epp in checks:
        detail = _every_cpu(facts, test, only_with_epp)
        if detail:
            found.append((name, detail))
    return tuple(found)


def decide(settings: EnergySettings, facts: EnergyFacts) -> EnergyDecision:
    """Apply ``settings`` to the host's current ``facts``; never raises."""
    holding = signals_holding(facts)
    n = settings.threads
    cap = f"at most {n} thread(s), the caller included"
    if settings.mode == "performance":
        also = (f" (ignored: {'; '.join(d for _, d in holding)})" if holding else "")
        return EnergyDecision(None, "energy=performance",
                              f"energy = performance: no limit, signals ignored{also}",
                              settings.mode, holding)
    if settings.mode == "powersave":
        return EnergyDecision(n, "energy=powersave", f"energy = powersave: {cap}",
                              settings.mode, holding)
    for name, detail in holding:
        if name in settings.signals:
            return EnergyDecision(n, name, f"energy = auto, signal {name} ({detail}): {cap}",
                                  settings.mode, holding)
    listened = ", ".join(settings.signals) or "none configured"
    return EnergyDecision(None, None, f"energy = auto: no signal holds ({listened}): no limit",
                          settings.mode, holding)


def apply_energy(limits: Limits, decision: EnergyDecision) -> Limits:
    """``limits`` with ``threads`` lowered to the decision's cap (the smaller one wins).
    Returns ``limits`` itself when the decision does not lower it."""
    cap = decision.max_threads
    if cap is None or (limits.threads is not None and limits.threads <= cap):
        return limits
    log.debug("energy policy: %s", decision.reason)
    return dataclasses.replace(limits, threads=cap)
