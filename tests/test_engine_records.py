"""The record file: one JSON line per event, private, rotated by size, never a failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from kvmaccel.engine import records


def test_append_private_lines(tmp_path: Path) -> None:
    path = tmp_path / "log" / "records.jsonl"
    records.append("start", domain="g", uuid="u", bytes=1 << 30, seconds=0.5, source="fresh",
                   helpers_per_node={"0": 1}, path=str(path))
    records.append("stop", domain="g", path=str(path))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["event"] == "start" and first["result"] == "ok" and first["gib_per_s"] == 2.0
    assert first["helpers_per_node"] == {"0": 1} and first["time"] > 0
    assert second["event"] == "stop" and [r["event"] for r in records.read(str(path))] == [
        "start", "stop"]


def test_rotated_by_size(tmp_path: Path) -> None:
    path = str(tmp_path / "records.jsonl")
    for i in range(30):
        records.append("fill", bytes=i, path=path, max_bytes=600)
    assert os.path.getsize(path) <= 600 and os.path.getsize(path + ".1") <= 600
    kept = [r["bytes"] for r in records.read(path)]
    assert kept == list(range(30 - len(kept), 30))  # the newest, in order, none torn
    assert sorted(os.listdir(tmp_path)) == ["records.jsonl", "records.jsonl.1"]


def test_never_raises_and_refuses_a_symlink(tmp_path: Path, capsys: object) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    link = tmp_path / "records.jsonl"
    link.symlink_to(target)
    records.append("start", path=str(link))
    assert target.read_text() == "keep\n"
    records.append("start", path="/proc/no/such/records.jsonl")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)  # like /tmp: anyone could swap the file; refused, not raised
    records.append("start", path=str(shared / "records.jsonl"))
    assert os.listdir(shared) == []
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.count("kvmaccel: warning: cannot write a record") == 3


def test_each_event_has_its_writer_and_every_line_its_version(tmp_path: Path) -> None:
    """One writer per event; every line says ``v``; ``page_size_kib`` is a list in every
    event that has it."""
    path = str(tmp_path / "records.jsonl")
    records.start(domain="g", uuid="u", source="pool", bytes=2 << 20, seconds=0.01,
                  helpers_per_node={}, page_size_kib=[2048, 1048576], path=path)
    records.start("failed_open", domain="g", reason="why", path=path)
    records.stop(domain="g", uuid="u", bytes=2 << 20, pool_files=1, path=path)
    records.scrub(pool="/p", uuid="u", bytes=2 << 20, seconds=0.1, page_size_kib=[2048],
                  path=path)
    records.fill(pool="/p", bytes=2 << 20, seconds=0.1, page_size_kib=[2048], path=path)
    lines = list(records.read(path))
    assert [r["event"] for r in lines] == ["start", "start", "stop", "scrub", "fill"]
    assert {r["v"] for r in lines} == {records.VERSION} == {1}
    assert lines[1] == {"v": 1, "time": lines[1]["time"], "event": "start",
                        "result": "failed_open", "domain": "g", "reason": "why"}  # no Nones
    assert [r.get("page_size_kib") for r in lines] == [[2048, 1048576], None, None, [2048],
                                                        [2048]]


def test_the_file_is_the_processs(record_file: str) -> None:
    """Without a path, the record file is the one the process's entry point resolved."""
    records.stop(domain="g", uuid=None, bytes=0, pool_files=0)
    assert [r["event"] for r in records.read()] == ["stop"] == [
        json.loads(x)["event"] for x in Path(record_file).read_text().splitlines()]
