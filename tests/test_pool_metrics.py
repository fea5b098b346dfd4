"""``kvmaccel metrics``: the records and the warm pool, checked with prometheus_client's own
parser of the text format."""

from __future__ import annotations

import glob
import os
import stat
import subprocess
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvmaccel.engine import records
from kvmaccel.pool.metrics import render

from .conftest import need

MIB = 1 << 20


def kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``text`` parsed by prometheus_client, by (name, sorted labels)."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_starts_by_outcome_histogram_and_pool_ratio() -> None:
    recs: list[dict[str, Any]] = [
        {"time": 1, "event": "start", "result": "ok", "source": "pool", "seconds": 0.04,
         "bytes": 8 << 30},
        {"time": 2, "event": "start", "result": "ok", "source": "pool", "seconds": 0.3},
        {"time": 3, "event": "start", "result": "ok", "source": "fresh", "seconds": 1.7,
         "populated_bytes": 8 << 30},
        {"time": 4, "event": "start", "result": "failed_open", "domain": 'we"ird\\name'},
        {"time": 5, "event": "stop", "result": "ok"},
        {"time": 6, "event": "scrub", "result": "ok", "bytes": 8 << 30, "seconds": 0.6},
        {"time": 7, "event": "fill", "result": "ok", "bytes": 2 << 30},
    ]
    found = samples(render(recs, []))
    assert found[("kvmaccel_starts_total", (("result", "ok"), ("source", "pool")))] == 2
    assert found[("kvmaccel_starts_total", (("result", "ok"), ("source", "fresh")))] == 1
    assert found[("kvmaccel_starts_total", (("result", "failed_open"), ("source", "none")))] == 1
    pool = (("le", "0.05"), ("source", "pool"))
    assert found[("kvmaccel_start_seconds_bucket", pool)] == 1
    assert found[("kvmaccel_start_seconds_bucket", (("le", "+Inf"), ("source", "pool")))] == 2
    assert found[("kvmaccel_start_seconds_count", (("source", "fresh"),))] == 1
    assert abs(found[("kvmaccel_start_seconds_sum", (("source", "pool"),))] - 0.34) < 1e-9
    assert abs(found[("kvmaccel_start_pool_ratio", ())] - 2 / 3) < 1e-5
    assert found[("kvmaccel_events_total", (("event", "scrub"), ("result", "ok")))] == 1
    assert found[("kvmaccel_populated_bytes_total", (("event", "start"),))] == 8 << 30
    assert found[("kvmaccel_populated_bytes_total", (("event", "fill"),))] == 2 << 30
    assert found[("kvmaccel_last_event_timestamp_seconds", (("event", "fill"),))] == 7


def test_old_lines_count_as_new_ones() -> None:
    """Lines written before records had ``v`` (``page_size_kib`` an int in fill and scrub
    lines) count as lines of format 1 do."""
    old: list[dict[str, Any]] = [
        {"time": 1, "event": "scrub", "result": "ok", "bytes": 2 << 20, "page_size_kib": 2048},
        {"time": 2, "event": "fill", "result": "ok", "bytes": 2 << 20, "page_size_kib": 2048},
        {"time": 3, "event": "start", "result": "ok", "source": "pool", "seconds": 0.01,
         "page_size_kib": [2048]}]
    new = [{**r, "v": 1, "page_size_kib": [2048]} for r in old]
    assert render(old, []) == render(new, []) == render([*old[:1], *new[1:]], [])
    assert samples(render(old, []))[("kvmaccel_populated_bytes_total",
                                     (("event", "scrub"),))] == 2 << 20


def test_fill_scrub_records_and_pool_gauges(shm_dir: str, run_dir: str, record_file: str,
                                            tmp_path: Any) -> None:
    """A real pool on a private tmpfs: fill two files, lose one's state (dirty), read the
    backlog, scrub, and read the records both left."""
    assert kvmaccel("pool", "fill", "--size", "16M", "--count", "2", "--dir",
                    shm_dir).returncode == 0
    states = sorted(glob.glob(os.path.join(run_dir, "pool", "*", "*")))
    assert len(states) == 2
    os.unlink(states[0])  # a file whose state is missing counts as dirty
    proc = kvmaccel("metrics", "--pool-dir", shm_dir)
    assert proc.returncode == 0, proc.stderr
    found = samples(proc.stdout)
    clean = (("node", "any"), ("page_size", "4K"), ("state", "clean"))
    dirty = (("node", "any"), ("page_size", "4K"), ("state", "dirty"))
    assert found[("kvmaccel_pool_bytes", clean)] == 16 * MIB
    assert found[("kvmaccel_pool_files", dirty)] == 1
    assert found[("kvmaccel_scrub_backlog_bytes", ())] == 16 * MIB
    assert found[("kvmaccel_events_total", (("event", "fill"), ("result", "ok")))] == 2
    assert kvmaccel("pool", "scrub", "--dir", shm_dir).returncode == 0
    # --textfile: written atomically, readable by node_exporter's user, parses the same.
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    proc = kvmaccel("metrics", "--pool-dir", shm_dir, "--textfile", str(textfile_dir))
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(textfile_dir) == ["kvmaccel.prom"]
    prom = textfile_dir / "kvmaccel.prom"
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    found = samples(prom.read_text())
    assert found[("kvmaccel_scrub_backlog_bytes", ())] == 0
    assert found[("kvmaccel_pool_files", clean)] == 2
    assert found[("kvmaccel_events_total", (("event", "scrub"), ("result", "ok")))] == 1
    lines = list(records.read(record_file))
    assert [x["event"] for x in lines] == ["fill", "fill", "scrub"]
    assert lines[0]["memory"] == "tmpfs 4K" and lines[0]["bytes"] == 16 * MIB
    assert lines[2]["bytes"] == 16 * MIB and lines[2]["seconds"] > 0
    assert kvmaccel("pool", "drain", "--dir", shm_dir).returncode == 0
    assert list(records.read(record_file))[-1]["event"] == "scrub"  # drain is no event


def test_textfile_into_a_missing_directory_is_one_line(tmp_path: Any) -> None:
    proc = kvmaccel("metrics", "--records", str(tmp_path / "none"), "--textfile",
                    str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvmaccel: error: cannot write metrics into ")


def test_textfile_never_replaces_a_file_of_another_user(tmp_path: Any) -> None:
    need(os.geteuid() == 0, "needs root (a file of nobody's)")
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    prom = textfile_dir / "kvmaccel.prom"
    prom.write_text("theirs\n")
    os.chown(prom, 65534, 65534)
    proc = kvmaccel("metrics", "--records", str(tmp_path / "none"), "--textfile",
                    str(textfile_dir))
    assert proc.returncode == 1 and "not a file kvmaccel wrote" in proc.stderr, proc.stderr
    assert prom.read_text() == "theirs\n" and os.listdir(textfile_dir) == ["kvmaccel.prom"]
