from __future__ import annotations

import pytest

from kvmaccel.errors import UsageError
from kvmaccel.plan.limits import Limits, chunk_size_bytes, default_cap, distribute_helpers

GIB = 1 << 30
MIB = 1 << 20


def test_default_cap_is_80_percent() -> None:
    assert [default_cap(n) for n in (1, 2, 5, 16, 64)] == [1, 1, 4, 12, 51]


def test_two_node_host_caps() -> None:
    plan = distribute_helpers({0: 160 * GIB, 1: 160 * GIB}, {0: 16, 1: 16}, 32, Limits())
    assert plan.helpers_per_node == {0: 12, 1: 12}
    assert plan.threads == 25
    assert any("per-node cap 12 (80% of 16 CPU(s))" in r for r in plan.reasons)


def test_host_cap_and_requested_threads() -> None:
    plan = distribute_helpers({0: 64 * GIB, 1: 64 * GIB}, {0: 16, 1: 16}, 32,
                              Limits(max_helpers_host=5))
    assert plan.helpers == 5 and "host-wide cap 5 helper(s) (configured)" in plan.reasons
    plan = distribute_helpers({0: 64 * GIB}, {0: 16}, 16, Limits(threads=4))
    assert plan.helpers_per_node == {0: 3}
    assert "4 thread(s) requested, the caller included" in plan.reasons


def test_helpers_follow_the_work() -> None:
    plan = distribute_helpers({0: 30 * GIB, 1: 10 * GIB}, {0: 8, 1: 8}, 16, Limits(threads=5))
    assert plan.helpers_per_node == {0: 3, 1: 1}


def test_small_jobs_get_few_threads() -> None:
    plan = distribute_helpers({0: 200 * MIB}, {0: 16}, 16, Limits())
    assert plan.helpers == 1  # two 128 MiB chunks: the caller and one helper
    assert distribute_helpers({0: 0}, {0: 4}, 4, Limits()).helpers == 0


def test_chunk_size() -> None:
    assert chunk_size_bytes(8 * GIB, 2, 2 * MIB) == 1 * GIB
    assert chunk_size_bytes(256 * MIB, 4, 2 * MIB) == 128 * MIB  # never below the minimum
    assert chunk_size_bytes(10 * GIB, 3, GIB) == 1 * GIB  # aligned to 1G pages


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"nice": 20}, {"max_helpers_host": -1},
                                    {"min_chunk_bytes": 0}])
def test_limits_reject(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        Limits(**kwargs)  # type: ignore[arg-type]
