"""The host-dependent inputs of a plan, read now: the tuned per-node counts (if the stored
``kvmaccel tune`` result matches this host) and the energy policy's decision.

:func:`kvmaccel.plan.planner.plan_domain` stays pure; :func:`kvmaccel.plan.forhost.for_host`
(which every caller plans through) calls :func:`host_policy` and passes both in, and the engine
then runs with the plan's ``limits``.
"""

from __future__ import annotations

import logging

from ..errors import HostError
from ..host.facts import HostFacts, read_energy
from .energy import EnergyDecision, EnergySettings, decide
from .tuning import NO_TUNING, TunedDefault, host_fingerprint, load_tuning, resolve_tuning

log = logging.getLogger(__name__)


def host_policy(settings: EnergySettings, host: HostFacts, root: str = "/",
                state_file: str | None = None) -> tuple[TunedDefault, EnergyDecision]:
    """Read the tuning state file and the energy facts under ``root``.  Never raises for
    either: an unusable state file is ignored with its reason, and unreadable energy facts
    are signals that do not hold."""
    try:
        stored = load_tuning(state_file)
        tuned = NO_TUNING if stored is None else resolve_tuning(
            stored, host_fingerprint(host, root))
    except HostError as e:
        log.warning("tuning not used: %s", e)
        tuned = TunedDefault("ignored", f"tuning not used: {e}")
    return tuned, decide(settings, read_energy(root))
