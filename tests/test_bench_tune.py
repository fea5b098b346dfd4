"""kvmaccel.bench.tune and kvmaccel.plan.tuning: the knee, scratch sizes, the state file, and real
tuning runs on this machine (memfd, and at most 256 MiB of the shared 2M pages).  Nothing here
depends on timing: the knee of a real run is only checked to be one of the counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmaccel.bench.tune import measure, measure_limits, plan_scratch
from kvmaccel.cli.main import main
from kvmaccel.errors import HostError, UsageError
from kvmaccel.host.facts import allowed_cpus, read_host
from kvmaccel.plan.limits import Limits, distribute_helpers
from kvmaccel.plan.tuning import (
    Curve,
    Fingerprint,
    Tuning,
    find_knee,
    host_fingerprint,
    load_tuning,
    resolve_tuning,
    save_tuning,
    state_path,
)

from .conftest import need

DATA = Path(__file__).resolve().parent / "data" / "sysfs"
GIB = 1 << 30
MIB = 1 << 20


@pytest.mark.parametrize(("rates", "knee"), [
    ({1: 1.0}, 1),
    ({1: 1.0, 2: 2.0, 3: 2.0}, 2),
    ({1: 1.0, 2: 1.9, 3: 1.99, 4: 2.0}, 2),  # 1.9 is exactly 95% of 2.0
    ({1: 1.0, 2: 1.89, 3: 2.0}, 3),
    ({1: 2.0, 2: 1.0}, 1),  # more threads made it slower
    ({1: 1.0, 2: 2.0, 3: 1.5, 4: 2.05}, 2),
])
def test_find_knee(rates: dict[int, float], knee: int) -> None:
    assert find_knee(rates) == knee


def curve(node: int, page_kib: int, seconds_by_threads: dict[int, float]) -> Curve:
    return Curve(node, page_kib, "memfd", GIB,
                 tuple((t, (s, s * 1.01, s * 0.99)) for t, s in seconds_by_threads.items()))


def test_node_count_is_the_largest_knee_over_page_sizes() -> None:
    fp = Fingerprint("cpu", "6.1", ((0, "0-3"), (1, "4-7")), (4, 2048))
    tuning = Tuning(fp, 0.0, 3, (
        curve(0, 4, {1: 1.0, 2: 0.5, 3: 0.34, 4: 0.34}),      # knee 3
        curve(0, 2048, {1: 0.2, 2: 0.1, 3: 0.1, 4: 0.1}),      # knee 2
        curve(1, 4, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}),         # knee 1
    ))
    assert tuning.knee_threads_per_node == {0: 3, 1: 1}
    assert tuning.helpers_per_node == {0: 2, 1: 0}


def test_state_file_round_trip(tmp_path: Path) -> None:
    fp = host_fingerprint(read_host(str(DATA / "two-node")), str(DATA / "two-node"))
    assert fp == Fingerprint("Intel(R) Xeon(R) Gold 6226R CPU @ 2.90GHz", "6.1.0-18-amd64",
                             ((0, "0-15,32-47"), (1, "16-31,48-63")), (4, 2048, 1048576))
    tuning = Tuning(fp, 1700000000.0, 3, (curve(0, 4, {1: 1.0, 2: 0.5}),), 12.5, ("a note",))
    path = save_tuning(tuning, str(tmp_path / "deep" / "tuning.json"))
    assert load_tuning(path) == tuning
    data = json.loads(Path(path).read_text())
    assert data["schema"] == "kvmaccel.tuning/1" and data["measured"] == "2023-11-14T22:13:20Z"
    assert data["nodes"] == [{"node": 0, "knee_threads": 2, "helpers": 1}]
    assert load_tuning(str(tmp_path / "missing.json")) is None
    Path(path).write_text('{"schema": "kvmaccel.tuning/1"}')
    with pytest.raises(HostError, match="not a kvmaccel tuning file"):
        load_tuning(path)


def test_state_path_follows_the_environment(state_dir: str) -> None:
    assert state_path() == os.path.join(state_dir, "tuning.json")


def test_fingerprint_differences() -> None:
    a = Fingerprint("cpu A", "6.1", ((0, "0-3"),), (4, 2048))
    b = Fingerprint("cpu A", "6.2", ((0, "0-1"),), (4,))
    assert a.differences(a) == ()
    assert a.differences(b) == ("kernel 6.1 -> 6.2", "nodes [node 0: CPUs 0-3] -> "
                                "[node 0: CPUs 0-1]", "page sizes [4, 2048] KiB -> [4] KiB")
    used = resolve_tuning(Tuning(a, 0.0, 1, (curve(0, 4, {1: 1.0, 2: 0.5}),)), a)
    assert used.status == "used" and used.helpers_per_node == ((0, 1),)
    ignored = resolve_tuning(Tuning(a, 0.0, 1, ()), b)
    assert ignored.status == "ignored" and "kernel 6.1 -> 6.2" in (ignored.reason or "")


def test_tuned_caps_replace_the_80_percent_rule() -> None:
    work: dict[int | None, int] = {0: 64 * GIB, 1: 64 * GIB}
    cpus = {0: 32, 1: 32}
    default = distribute_helpers(work, cpus, 64, Limits())
    assert default.helpers_per_node == {0: 25, 1: 25}
    tuned = distribute_helpers(work, cpus, 64, Limits(tuned_helpers_per_node=((0, 3), (1, 5))))
    assert tuned.helpers_per_node == {0: 3, 1: 5}
    assert "node 0: per-node cap 3 (measured by kvmaccel tune)" in tuned.reasons
    configured = Limits(max_helpers_per_node=7, tuned_helpers_per_node=((0, 3), (1, 5)))
    assert distribute_helpers(work, cpus, 64, configured).helpers_per_node == {0: 7, 1: 7}


def test_unbound_memory_gets_the_knees_of_all_nodes() -> None:
    work: dict[int | None, int] = {None: 64 * GIB}
    tuned = Limits(tuned_helpers_per_node=((0, 3), (1, 5)))
    plan = distribute_helpers(work, {0: 32, 1: 32}, 64, tuned)
    assert plan.helpers_per_node == {None: 9}  # 4 + 6 threads, one of them the caller
    assert "any node: cap 9 (the knees of all nodes, measured by kvmaccel tune)" in plan.reasons
    assert distribute_helpers(work, {0: 32, 1: 32}, 64, Limits()).helpers_per_node == {None: 51}
    configured = Limits(max_helpers_per_node=7, tuned_helpers_per_node=((0, 3), (1, 5)))
    assert distribute_helpers(work, {0: 32, 1: 32}, 64, configured).helpers == 51


def test_scratch_sizes_on_the_two_node_tree() -> None:
    host = read_host(str(DATA / "two-node"))
    scratch, notes = plan_scratch(host, 1, 32)
    # base pages and 2M: 1 GiB; 1G pages: 32 would be needed, node 1 has 60 free: 60/4 < 32
    assert [(s.page_size_kib, s.size_bytes, s.mount) for s in scratch] == [
        (4, GIB, None), (2048, GIB, "/dev/hugepages")]
    assert notes == ["node 1: 1G pages skipped: 60G free holds fewer than 32 page(s), one per "
                     "thread"]
    scratch, notes = plan_scratch(host, 0, 2, size_bytes=256 * MIB, page_sizes_kib=[2048])
    assert [(s.page_size_kib, s.size_bytes) for s in scratch] == [(2048, 256 * MIB)]


def test_measure_limits_give_every_thread_work() -> None:
    limits = measure_limits(4, 64 * MIB, 2 * MIB)
    plan = distribute_helpers({0: 64 * MIB}, {0: 4}, 4, limits)
    assert plan.threads == 4 and limits.nice == 0 and not limits.idle_cpus_only


def test_measure_rejects_unknown_nodes() -> None:
    host = read_host()
    with pytest.raises(UsageError, match="do not exist"):
        measure(host, host_fingerprint(host), nodes=[99])


def test_tune_this_machine_on_memfd_and_hugetlbfs(hugetlbfs: str) -> None:
    """A real run, small: 64 MiB of base pages and 64 MiB of 2M pages per run."""
    host = read_host()
    seen: list[tuple[int, int, str]] = []
    tuning = measure(host, host_fingerprint(host), size_bytes=64 * MIB, rounds=2,
                     progress=lambda done, total, label: seen.append((done, total, label)))
    node0 = host.nodes[0].cpus & allowed_cpus()
    counts = tuple(range(1, len(node0) + 1))
    pages = {(c.node_id, c.page_size_kib) for c in tuning.curves}
    assert (0, 4) in pages and (0, 2048) in pages
    for c in tuning.curves:
        assert c.threads == counts and all(len(runs) == 2 for _, runs in c.seconds)
        assert c.knee_threads in counts
    assert 1 <= tuning.knee_threads_per_node[0] <= len(node0)
    total = seen[-1][1]
    assert [d for d, _, _ in seen] == list(range(1, total + 1))
    assert total == len(tuning.curves) * (1 + 2 * len(counts))


def run_tune(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["tune", *args])
    return result.exit_code, result.stdout + result.stderr


def test_tune_command_saves_and_shows(state_dir: str) -> None:
    need(len(allowed_cpus()) >= 2, "needs 2 CPUs for a curve")
    code, out = run_tune("--size", "64M", "--rounds", "1", "--page-size", "4K")
    assert code == 0, out
    assert "node 0, 4K pages (memfd, 64M per run):" in out and "<- knee" in out
    assert f"saved to {state_dir}/tuning.json" in out
    code, out = run_tune("--show")
    assert code == 0 and "matches this host: yes" in out
    code, out = run_tune("--show", "--json")
    data = json.loads(out)
    assert data["matches_host"] and data["saved"]
    assert data["curves"][0]["page_size_kib"] == 4
    assert [p["threads"] for p in data["curves"][0]["points"]][:2] == [1, 2]


def test_tune_show_without_a_file_says_what_to_do(state_dir: str) -> None:
    code, out = run_tune("--show")
    assert code == 1
    assert out.strip() == (f"kvmaccel: error: no tuning file at {state_dir}/tuning.json; "
                           "run kvmaccel tune to measure")


def test_tune_no_save_json(state_dir: str) -> None:
    code, out = run_tune("--size", "32M", "--rounds", "1", "--page-size", "4K",
                         "--max-threads", "1", "--no-save", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert not data["saved"] and data["nodes"][0]["knee_threads"] == 1
    assert not os.path.exists(os.path.join(state_dir, "tuning.json"))


def test_tune_with_nothing_to_measure() -> None:
    code, out = run_tune("--page-size", "16K")
    assert code == 2 and "nothing to measure" in out
