"""On a real two-node kernel: helper threads run on their node's CPUs and keep to the caps.

The helpers' affinity and the CPU each last ran on are read from /proc/self/task while they
work: from the populate call's progress callback, which the calling thread makes only after
every helper has pinned itself and passed the start barrier.
"""

from __future__ import annotations

import collections
import contextlib
import os

import pytest

from kvmaccel.engine.backing import BackingSpec, populate_backings
from kvmaccel.host.facts import HostFacts
from kvmaccel.plan.limits import Limits

from .conftest import MIB, record


def last_cpu(tid: int) -> int:
    """Field 39 of /proc/self/task/TID/stat: the CPU the thread last ran on."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[36])  # fields[0] is field 3 (state)


def helper_threads() -> dict[int, str]:
    """``{tid: name}`` of this process's kvmaccel helpers (``kvmaccel-<node>-<index>``)."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except (FileNotFoundError, ProcessLookupError):  # the thread exited meanwhile (ESRCH
            continue  # when it goes between the open and the read)
        if name.startswith("kvmaccel-"):
            found[int(tid)] = name
    return found


@pytest.mark.parametrize("per_node_cap", [1, 2])
def test_helpers_run_on_their_nodes_cpus(
        per_node_cap: int, mounts: dict[str, str], host: HostFacts,
        request: pytest.FixtureRequest) -> None:
    """512 MiB of tmpfs over nodes 0 and 1 in 8 MiB chunks: each node gets exactly
    ``per_node_cap`` helpers, and every sample of a node-N helper shows it allowed on, and
    last run on, node N's CPUs only."""
    samples: dict[int, list[tuple[str, frozenset[int], int]]] = collections.defaultdict(list)

    def progress(done: int, total: int) -> None:
        for tid, name in helper_threads().items():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # just exited
                samples[tid].append((name, frozenset(os.sched_getaffinity(tid)), last_cpu(tid)))

    limits = Limits(max_helpers_per_node=per_node_cap, max_helpers_host=8,
                    min_chunk_bytes=8 * MIB, idle_cpus_only=False)
    path = os.path.join(mounts["tmpfs"], "helpers")
    try:
        _, result = populate_backings([BackingSpec(path, 512 * MIB, nodes=(0, 1))], host,
                                      limits, progress=progress)
    finally:
        os.unlink(path)
    seen: dict[int, set[int]] = collections.defaultdict(set)
    for tid, observations in samples.items():
        for name, allowed, cpu in observations:
            node = int(name.split("-")[1])
            seen[node].add(tid)
            cpus = host.nodes[node].cpus
            assert allowed <= cpus, f"{name} allowed on {sorted(allowed)}, node {node} " \
                                    f"has {sorted(cpus)}"
            assert cpu in cpus, f"{name} ran on CPU {cpu}, node {node} has {sorted(cpus)}"
    record(request, "helpers", {"planned": {str(k): v for k, v in
                                            result.helpers_per_node.items()},
                                "seen": {str(k): len(v) for k, v in seen.items()},
                                "samples": sum(len(o) for o in samples.values()),
                                "seconds": round(result.seconds, 2)})
    assert result.helpers_per_node == {0: per_node_cap, 1: per_node_cap}
    assert {n: len(t) for n, t in seen.items()} == {0: per_node_cap, 1: per_node_cap}, \
        f"helpers seen per node: {dict(seen)} (samples: {sum(map(len, samples.values()))})"
