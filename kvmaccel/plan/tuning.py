"""Measured thread counts: the curve ``kvmaccel tune`` records, its knee, and the state file.

This module holds the data and the pure decisions, and reads and writes the state file
(:func:`load_tuning`, :func:`save_tuning`: kvmaccel's own file, through
:mod:`kvmaccel.safefs`); :mod:`kvmaccel.bench.tune` measures.

*The knee* of a curve (throughput by thread count on one node and one page size) is the
smallest thread count whose throughput is within :data:`KNEE_TOLERANCE` (5%) of the best
count's: more threads than that buy less than 5% and cost CPUs.  A node's tuned count is the
largest knee over the page sizes measured there, so that no page size is left short; its
*helpers* are that count less one, since the calling thread always works (a knee at 1 thread
means helpers do not pay on that node).

*The fingerprint* names what the measurement depends on: the CPU model, the kernel release,
the NUMA nodes with their CPUs, and the page sizes the host can back guests with (the base
page and every hugetlbfs mount's).  A stored result is used only while the fingerprint is
the same; otherwise the planner ignores it and says why (re-run ``kvmaccel tune``).

State file (default ``/var/lib/kvmaccel/tuning.json``; ``KVMACCEL_STATE_DIR`` overrides the
directory), schema ``kvmaccel.tuning/1``, seconds and bytes, page sizes in KiB::

    {
      "schema": "kvmaccel.tuning/1",
      "measured_unix": float, "measured": "YYYY-MM-DDTHH:MM:SSZ",
      "rounds": int, "knee_tolerance": 0.05, "seconds_total": float,
      "fingerprint": {"cpu_model": str, "kernel_release": str,
                      "nodes": [{"node": int, "cpus": "0-15,32-47"}],
                      "page_sizes_kib": [int]},
      "nodes": [{"node": int, "knee_threads": int, "helpers": int}],      # derived
      "curves": [{"node": int, "page_size_kib": int, "backing": str, "size_bytes": int,
                  "knee_threads": int,                                     # derived
                  "points": [{"threads": int, "seconds": [float], "median_s": float,
                              "gib_per_s": float}]}],
      "notes": [str]
    }

Errors: :class:`~kvmaccel.errors.HostError` for a state file that cannot be read, written or
parsed, or is not kvmaccel's own (the message names the file and what to do);
:class:`~kvmaccel.errors.UnsafePathError` when saving into a directory that is not kvmaccel's.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import paths, safefs
from ..errors import HostError, UnsafePathError
from ..host.facts import HostFacts, read_cpu_model, read_kernel_release
from ..model.units import GIB, format_cpu_spec, format_size

log = logging.getLogger(__name__)

SCHEMA = "kvmaccel.tuning/1"
STATE_FILE_NAME = "tuning.json"
KNEE_TOLERANCE = 0.05


def state_path() -> str:
    """``tuning.json`` in this process's state dir (:attr:`kvmaccel.paths.Places.state_dir`:
    ``$KVMACCEL_STATE_DIR``, else ``/var/lib/kvmaccel``)."""
    return os.path.join(paths.places().state_dir, STATE_FILE_NAME)


@dataclass(frozen=True)
class Fingerprint:
    """What a measurement depends on (see the module docstring)."""

    cpu_model: str
    kernel_release: str
    nodes: tuple[tuple[int, str], ...]  # (node_id, cpulist as the kernel prints it)
    page_sizes_kib: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"cpu_model": self.cpu_model, "kernel_release": self.kernel_release,
                "nodes": [{"node": n, "cpus": c} for n, c in self.nodes],
                "page_sizes_kib": list(self.page_sizes_kib)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        """Raises KeyError, TypeError or ValueError on a malformed mapping."""
        return cls(str(data["cpu_model"]), str(data["kernel_release"]),
                   tuple((int(n["node"]), str(n["cpus"])) for n in data["nodes"]),
                   tuple(int(p) for p in data["page_sizes_kib"]))

    def differences(self, other: Fingerprint) -> tuple[str, ...]:
        """What changed from ``self`` (stored) to ``other`` (this host), one phrase each."""
        out = []
        if self.cpu_model != other.cpu_model:
            out.append(f"CPU {self.cpu_model!r} -> {other.cpu_model!r}")
        if self.kernel_release != other.kernel_release:
            out.append(f"kernel {self.kernel_release} -> {other.kernel_release}")
        if self.nodes != other.nodes:
            def show(nodes: tuple[tuple[int, str], ...]) -> str:
                return "; ".join(f"node {n}: CPUs {c}" for n, c in nodes) or "none"
            out.append(f"nodes [{show(self.nodes)}] -> [{show(other.nodes)}]")
        if self.page_sizes_kib != other.page_sizes_kib:
            out.append(f"page sizes {list(self.page_sizes_kib)} KiB -> "
                       f"{list(other.page_sizes_kib)} KiB")
        return tuple(out)


def host_fingerprint(host: HostFacts, root: str = "/") -> Fingerprint:
    """This host's fingerprint.  Raises :class:`HostError` when the kernel release cannot be
    read."""
    pages = {host.base_page_size_kib} | {m.page_size_kib for m in host.hugetlbfs_mounts
                                         if m.page_size_kib}
    return Fingerprint(
        cpu_model=read_cpu_model(root), kernel_release=read_kernel_release(root),
        nodes=tuple((n, format_cpu_spec(set(node.cpus))) for n, node in sorted(host.nodes.items())
                    if node.cpus),
        page_sizes_kib=tuple(sorted(pages)))


def find_knee(gib_per_s: Mapping[int, float], tolerance: float = KNEE_TOLERANCE) -> int:
    """The smallest thread count whose throughput is at least ``(1 - tolerance)`` times the
    best one's.  Raises ValueError for an empty mapping."""
    if not gib_per_s:
        raise ValueError("no measurements")
    best = max(gib_per_s.values())
    return min(t for t, rate in gib_per_s.items() if rate >= best * (1 - tolerance))


@dataclass(frozen=True)
class Curve:
    """Seconds per run by thread count, for one node and one page size."""

    node_id: int
    page_size_kib: int
    backing: str  # "memfd" (base pages) or "hugetlbfs <mount>"
    size_bytes: int
    seconds: tuple[tuple[int, tuple[float, ...]], ...]  # (threads, seconds of each run)

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.seconds)

    def median_s(self, threads: int) -> float:
        return statistics.median(dict(self.seconds)[threads])

    def gib_per_s(self, threads: int) -> float:
        return self.size_bytes / GIB / max(self.median_s(threads), 1e-9)

    @property
    def knee_threads(self) -> int:
        return find_knee({t: self.gib_per_s(t) for t in self.threads})

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node_id, "page_size_kib": self.page_size_kib,
                "backing": self.backing, "size_bytes": self.size_bytes,
                "knee_threads": self.knee_threads,
                "points": [{"threads": t, "seconds": [round(s, 6) for s in runs],
                            "median_s": round(self.median_s(t), 6),
                            "gib_per_s": round(self.gib_per_s(t), 4)}
                           for t, runs in self.seconds]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curve:
        seconds = tuple((int(p["threads"]), tuple(float(s) for s in p["seconds"]))
                        for p in data["points"])
        if not seconds or any(not runs for _, runs in seconds):
            raise ValueError("a curve without runs")
        return cls(int(data["node"]), int(data["page_size_kib"]), str(data["backing"]),
                   int(data["size_bytes"]), seconds)


@dataclass(frozen=True)
class Tuning:
    """One ``kvmaccel tune`` result."""

    fingerprint: Fingerprint
    measured_unix: float
    rounds: int
    curves: tuple[Curve, ...]
    seconds_total: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def knee_threads_per_node(self) -> dict[int, int]:
        """Per node, the largest knee over its page sizes."""
        knees: dict[int, int] = {}
        for c in self.curves:
            knees[c.node_id] = max(knees.get(c.node_id, 1), c.knee_threads)
        return dict(sorted(knees.items()))

    @property
    def helpers_per_node(self) -> dict[int, int]:
        return {n: k - 1 for n, k in self.knee_threads_per_node.items()}

    @property
    def measured(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_unix))

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "measured_unix": self.measured_unix, "measured": self.measured,
            "rounds": self.rounds, "knee_tolerance": KNEE_TOLERANCE,
            "seconds_total": round(self.seconds_total, 3),
            "fingerprint": self.fingerprint.as_dict(),
            "nodes": [{"node": n, "knee_threads": k, "helpers": k - 1}
                      for n, k in self.knee_threads_per_node.items()],
            "curves": [c.as_dict() for c in self.curves],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tuning:
        """Raises KeyError, TypeError or ValueError on a malformed mapping."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, not {SCHEMA!r}")
        return cls(Fingerprint.from_dict(data["fingerprint"]), float(data["measured_unix"]),
                   int(data["rounds"]), tuple(Curve.from_dict(c) for c in data["curves"]),
                   float(data.get("seconds_total", 0.0)),
                   tuple(str(n) for n in data.get("notes", ())))


def save_tuning(tuning: Tuning, path: str | None = None) -> str:
    """Write ``tuning`` atomically to ``path`` (default :func:`state_path`) as kvmaccel's own
    file (0600, its directory made 0700 when missing: :mod:`kvmaccel.safefs`); return the
    path.  Raises :class:`HostError` when it cannot be written,
    :class:`~kvmaccel.errors.UnsafePathError` for a directory that is not kvmaccel's."""
    path = path or state_path()
    try:
        safefs.private_dirs(os.path.dirname(os.path.abspath(path)))
        safefs.write_atomic(path, json.dumps(tuning.as_dict(), indent=2) + "\n", durable=True)
    except OSError as e:
        raise HostError(f"cannot write {path}: {e.strerror}; run as root or set "
                        "KVMACCEL_STATE_DIR to a writable directory") from e
    return path


def load_tuning(path: str | None = None) -> Tuning | None:
    """The stored result at ``path`` (default :func:`state_path`), None when there is none;
    read only as kvmaccel's own file (:func:`kvmaccel.safefs.read_own_json`: one another user
    could write would set how many threads root starts).  Raises :class:`HostError` for a
    file that cannot be read or parsed, or is not kvmaccel's."""
    path = path or state_path()
    try:
        data = safefs.read_own_json(path)
        return None if data is None else Tuning.from_dict(data)
    except UnsafePathError as e:
        raise HostError(str(e)) from e
    except OSError as e:
        raise HostError(f"cannot read {path}: {e.strerror}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # [] has no .get
        raise HostError(f"{path} is not a kvmaccel tuning file ({e}); remove it or run "
                        "kvmaccel tune again") from e


@dataclass(frozen=True)
class TunedDefault:
    """What the planner takes from the state file.  ``status``: ``none`` (no file),
    ``used`` or ``ignored``; ``helpers_per_node`` is empty unless used."""

    status: str
    reason: str | None = None
    helpers_per_node: tuple[tuple[int, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason,
                "helpers_per_node": [{"node": n, "helpers": h}
                                     for n, h in self.helpers_per_node]}


NO_TUNING = TunedDefault("none")


def resolve_tuning(tuning: Tuning | None, fingerprint: Fingerprint) -> TunedDefault:
    """Use ``tuning`` when its fingerprint is this host's, else ignore it with the reason."""
    if tuning is None:
        return NO_TUNING
    diffs = tuning.fingerprint.differences(fingerprint)
    if diffs:
        return TunedDefault("ignored", f"tuning from {tuning.measured} ignored: the host "
                            f"changed ({'; '.join(diffs)}); run kvmaccel tune again")
    helpers = tuple(tuning.helpers_per_node.items())
    knees = tuning.knee_threads_per_node
    per_node = ", ".join(f"node {n} {h} helper(s) (knee at {knees[n]} thread(s))"
                         for n, h in helpers)
    return TunedDefault("used", f"per-node default measured by kvmaccel tune on "
                        f"{tuning.measured}: {per_node}", helpers)


def format_curves(tuning: Tuning) -> str:
    """The table ``kvmaccel tune`` and ``kvmaccel tune --show`` print."""
    fp = tuning.fingerprint
    lines = [f"measured {tuning.measured} in {tuning.seconds_total:.1f} s, {tuning.rounds} "
             f"run(s) per count; {fp.cpu_model or 'unknown CPU'}, kernel {fp.kernel_release}"]
    for c in tuning.curves:
        best = max(c.gib_per_s(t) for t in c.threads)
        lines.append("")
        lines.append(f"node {c.node_id}, {format_size(c.page_size_kib * 1024)} pages "
                     f"({c.backing}, {format_size(c.size_bytes)} per run):")
        rows = [("threads", "median s", "GiB/s", "of best", "")]
        for t in c.threads:
            rate = c.gib_per_s(t)
            rows.append((str(t), f"{c.median_s(t):.3f}", f"{rate:.2f}",
                         f"{rate / best * 100:.0f}%", "<- knee" if t == c.knee_threads else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines.extend("  " + "  ".join(cell.rjust(w) for cell, w in zip(r[:4], widths,
                                                                          strict=True))
                     + (f"  {r[4]}" if r[4] else "") for r in rows)
    lines.append("")
    for n, k in tuning.knee_threads_per_node.items():
        lines.append(f"node {n}: knee at {k} thread(s) -> {k - 1} helper(s) per node by default")
    lines.extend(f"note: {note}" for note in tuning.notes)
    return "\n".join(lines)
