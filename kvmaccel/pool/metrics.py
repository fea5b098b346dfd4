"""``kvmaccel metrics``: the records and the warm pool in Prometheus's text format (0.0.4).

Two sources, read at every scrape:

* the record file (:mod:`kvmaccel.engine.records`): starts by outcome and source, the start
  time histogram, stops, scrubs and fills, bytes populated, and the share of starts the pool
  served.  These are counters over the records kept, so they drop when the file is rotated
  away; Prometheus treats a drop as a counter reset, which ``rate()`` and ``increase()``
  handle.  Lines of every format count alike, older ones without ``v`` too: no field read
  here changed its type (``page_size_kib``, an int in old fill and scrub lines, is not read).
* the pools on this host's hugetlbfs and tmpfs mounts: bytes and files by state, page size
  and node, and the scrub backlog (dirty and scrubbing files).

The text is written by hand rather than with ``prometheus_client``: a collector over these
two sources would be as long as the rendering here, and the hook's environment (Debian's
python3 with python3-libvirt, -click and -psutil) would gain a dependency for it.  The tests
check the output with ``prometheus_client``'s own parser.

``--textfile DIR`` writes ``DIR/kvmaccel.prom`` for node_exporter's textfile collector:
created beside it under a temporary name (:func:`kvmaccel.safefs.write_atomic_at`, in the
opened directory), mode 0644 so node_exporter's user can read it, then renamed over the old
one (only one kvmaccel wrote), so a scrape never sees half a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from .. import safefs
from ..model.units import format_size
from .files import PoolEntry

START_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TEXTFILE_NAME = "kvmaccel.prom"
BACKLOG_STATES = ("dirty", "scrubbing")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(round(value, 6))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")


def _str(record: dict[str, Any], key: str, default: str) -> str:
    value = record.get(key)
    return value if isinstance(value, str) and value else default


def _num(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def render(records: Iterable[dict[str, Any]], entries: Sequence[PoolEntry]) -> str:
    """The metrics text for ``records`` (oldest first) and the pool ``entries``."""
    starts: dict[tuple[str, str], int] = {}
    events: dict[tuple[str, str], int] = {}
    bytes_by_event: dict[str, float] = {}
    seconds_by_source: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    for r in records:
        event = _str(r, "event", "unknown")
        result = _str(r, "result", "ok")
        when = _num(r, "time")
        if when is not None:
            last[event] = max(last.get(event, 0.0), when)
        if event == "start":
            source = _str(r, "source", "none")
            starts[(result, source)] = starts.get((result, source), 0) + 1
            seconds = _num(r, "seconds")
            if result == "ok" and seconds is not None:
                seconds_by_source.setdefault(source, []).append(seconds)
        else:
            events[(event, result)] = events.get((event, result), 0) + 1
        size = _num(r, "populated_bytes") if event == "start" else _num(r, "bytes")
        if size is not None and result == "ok" and event in ("start", "scrub", "fill"):
            bytes_by_event[event] = bytes_by_event.get(event, 0.0) + size
    out = _Text()
    out.family("kvmaccel_starts_total", "counter",
               "Guest starts the hook handled, by result (ok, failed_open, refused, timeout) "
               "and source (pool, fresh, overlap, mixed).",
               [("", {"result": res, "source": src}, n)
                for (res, src), n in sorted(starts.items())])
    hist: list[tuple[str, dict[str, str], float]] = []
    for source, values in sorted(seconds_by_source.items()):
        for bound in START_BUCKETS_S:
            hist.append(("_bucket", {"source": source, "le": _number(bound)},
                         sum(v <= bound for v in values)))
        hist.append(("_bucket", {"source": source, "le": "+Inf"}, len(values)))
        hist.append(("_sum", {"source": source}, sum(values)))
        hist.append(("_count", {"source": source}, len(values)))
    out.family("kvmaccel_start_seconds", "histogram",
               "Time the hook took at 'start begin' for a successful start, by source.", hist)
    ok = {src: n for (res, src), n in starts.items() if res == "ok"}
    total_ok = sum(ok.values())
    out.family("kvmaccel_start_pool_ratio", "gauge",
               "Share of successful starts served wholly from the warm pool (0 when none).",
               [("", {}, ok.get("pool", 0) / total_ok if total_ok else 0.0)])
    out.family("kvmaccel_events_total", "counter",
               "Stops, scrubs and fills recorded, by event and result.",
               [("", {"event": ev, "result": res}, n) for (ev, res), n in sorted(events.items())])
    out.family("kvmaccel_populated_bytes_total", "counter",
               "Bytes populated or zeroed, by event (start: fresh files; scrub; fill).",
               [("", {"event": ev}, n) for ev, n in sorted(bytes_by_event.items())])
    out.family("kvmaccel_last_event_timestamp_seconds", "gauge",
               "Time of the newest record of each event.",
               [("", {"event": ev}, t) for ev, t in sorted(last.items())])
    _pool_families(out, entries)
    return "\n".join(out.lines) + "\n"


def _pool_families(out: _Text, entries: Sequence[PoolEntry]) -> None:
    by_key: dict[tuple[str, str, str], list[int]] = {}
    for e in entries:
        labels = (e.state, format_size(e.key.page_size_kib * 1024),
                  ",".join(map(str, e.key.host_nodes)) or "any")
        acc = by_key.setdefault(labels, [0, 0])
        acc[0] += e.key.size_bytes
        acc[1] += 1

    def label(k: tuple[str, str, str]) -> dict[str, str]:
        return {"state": k[0], "page_size": k[1], "node": k[2]}

    out.family("kvmaccel_pool_bytes", "gauge",
               "Bytes in warm pool files, by state, page size and host node(s).",
               [("", label(k), v[0]) for k, v in sorted(by_key.items())])
    out.family("kvmaccel_pool_files", "gauge",
               "Warm pool files, by state, page size and host node(s).",
               [("", label(k), v[1]) for k, v in sorted(by_key.items())])
    backlog = [e for e in entries if e.state in BACKLOG_STATES]
    out.family("kvmaccel_scrub_backlog_bytes", "gauge",
               "Bytes of pool files waiting to be scrubbed (dirty or scrubbing).",
               [("", {}, sum(e.key.size_bytes for e in backlog))])
    out.family("kvmaccel_scrub_backlog_files", "gauge",
               "Pool files waiting to be scrubbed (dirty or scrubbing).",
               [("", {}, len(backlog))])


def write_textfile(directory: str, text: str, name: str = TEXTFILE_NAME) -> str:
    """Write ``text`` to ``directory/name`` atomically (0644, fsynced); return the path.
    Raises :class:`OSError`, :class:`~kvmaccel.errors.UnsafePathError` when ``name`` there is
    not kvmaccel's file."""
    with safefs.opened_dir(directory, follow=True) as dfd:
        safefs.write_atomic_at(dfd, name, text, mode=0o644, durable=True)
    return os.path.join(directory, name)
