"""One JSON line per start, stop, scrub and fill: the record monitoring reads.

The file is the one this process's entry point chose (:mod:`kvmaccel.paths`:
``$KVMACCEL_RECORD_FILE``, else the config's ``record_file``, else
``/var/log/kvmaccel/records.jsonl``), or the one a caller names.  Each line is an object
with at least ``v`` (the format, :data:`VERSION`), ``time`` (Unix seconds), ``event``
(``start``, ``stop``, ``scrub``, ``fill``) and ``result`` (``ok``, or what went wrong:
``failed_open``, ``refused``, ``timeout``, ``error``); the others as they apply:

* ``domain``, ``uuid``: the guest (start, stop);
* ``bytes``, ``seconds``, ``gib_per_s``: memory handled and the time it took (for a start,
  the hook's own time at ``start begin``; for a start from the pool, linking only);
* ``helpers_per_node``: helper threads per node (``{"0": 1}``; ``"any"``: not bound);
* ``source``: ``pool`` (every backend from the warm pool), ``fresh`` (populated at start),
  ``overlap`` (a filler fills the fresh files beside QEMU; it adds a ``fill`` record with
  this source when done), ``mixed``; ``memory``: ``hugetlbfs 2M``, ``tmpfs 4K``;
  ``reason``: why a result is not ok;
* ``page_size_kib``: the page sizes, in KiB, of the pool files a start took, a file filled
  into a pool or scrubbed: always a list (``[2048]``; a start may take files of two sizes);
* ``pool``: the pool directory (fill, scrub); ``populated_bytes``, ``populate_seconds``: what
  a fresh start populated; ``pool_files``: the pool files a stop gave back; ``threads``: a
  filler's.

Every line has ``v`` (:data:`VERSION`, 1); one without it is older.  Each event has its
writer with its typed fields (:func:`start`, :func:`stop`, :func:`scrub`, :func:`fill`).

Writing is root's business in a directory others cannot write: the directory is made 0700
and the file 0600, opened ``O_APPEND|O_NOFOLLOW`` relative to its checked directory and
checked on its descriptor (:func:`kvmaccel.safefs.open_append`; the hook's and the keeper's
log files are opened the same way), and each line is one ``write``.  When the file passes
:data:`MAX_BYTES` it is renamed to ``<file>.1`` (the previous ``.1`` goes) under an ``flock``
on the file, so two writers rotate once.

A record is a report, never a reason to fail: :func:`append` says so on stderr and returns
on any error.  Kept light (``json``, ``os``, ``fcntl``, no ``logging``): the hook's warm
start writes one, and its import budget is what ``json`` loads.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from .. import paths, safefs

MAX_BYTES = 4 << 20  # then rotated to <file>.1: at most about 8 MiB of records, ~25k lines
EVENTS = ("start", "stop", "scrub", "fill")
VERSION = 1
"""``v`` of every line written; a line without it was written before (the same fields, but
``page_size_kib`` an int in ``fill`` and ``scrub`` records)."""


def record_file() -> str:
    """This process's record file, as its entry point resolved it
    (:attr:`kvmaccel.paths.Places.record_file`)."""
    return paths.places().record_file


def from_result(result: dict[str, Any]) -> dict[str, Any]:
    """The record's fields from a :meth:`PopulateResult.as_dict`."""
    return {k: result[k] for k in ("bytes", "seconds", "gib_per_s", "helpers_per_node",
                                   "memory") if k in result}


# --- one writer per event: its fields and their types (None: left out) -------------------

def start(result: str = "ok", *, domain: str | None, uuid: str | None = None,
          source: str | None = None, bytes: int | None = None, seconds: float | None = None,
          gib_per_s: float | None = None, helpers_per_node: dict[str, int] | None = None,
          memory: str | None = None, populated_bytes: int | None = None,
          populate_seconds: float | None = None, page_size_kib: list[int] | None = None,
          reason: str | None = None, path: str | None = None) -> None:
    """A guest's start: ``bytes`` its memory, ``populated_bytes`` what was populated of it,
    ``page_size_kib`` the page sizes of the pool files it took (a warm start)."""
    append("start", result, path=path, **_given(
        domain=domain, uuid=uuid, source=source, bytes=bytes, seconds=seconds,
        gib_per_s=gib_per_s, helpers_per_node=helpers_per_node, memory=memory,
        populated_bytes=populated_bytes, populate_seconds=populate_seconds,
        page_size_kib=page_size_kib, reason=reason))


def stop(*, domain: str, uuid: str | None, bytes: int, pool_files: int,
         path: str | None = None) -> None:
    """A guest's stop: ``bytes`` freed, ``pool_files`` given back to the pool."""
    append("stop", path=path, domain=domain, uuid=uuid, bytes=bytes, pool_files=pool_files)


def scrub(*, pool: str, uuid: str | None, bytes: int, seconds: float, page_size_kib: list[int],
          path: str | None = None) -> None:
    """A pool file scrubbed after guest ``uuid`` (``page_size_kib``: its page size, as a
    list like a start's)."""
    append("scrub", path=path, pool=pool, uuid=uuid, bytes=bytes, seconds=seconds,
           page_size_kib=page_size_kib)


def fill(*, bytes: int, seconds: float, pool: str | None = None, domain: str | None = None,
         source: str | None = None, threads: int | None = None,
         gib_per_s: float | None = None, helpers_per_node: dict[str, int] | None = None,
         memory: str | None = None, page_size_kib: list[int] | None = None,
         path: str | None = None) -> None:
    """Memory filled: a pool file (``pool``), or a guest's files by its filler (``domain``,
    ``source`` ``overlap``)."""
    append("fill", path=path, **_given(
        bytes=bytes, seconds=seconds, pool=pool, domain=domain, source=source,
        threads=threads, gib_per_s=gib_per_s, helpers_per_node=helpers_per_node,
        memory=memory, page_size_kib=page_size_kib))


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def append(event: str, result: str = "ok", *, path: str | None = None,
           max_bytes: int = MAX_BYTES, **fields: Any) -> None:
    """Append one record (``v``: :data:`VERSION`).  Never raises: a failure is one line on
    stderr (the hook's stderr goes nowhere when it succeeds)."""
    record = {"v": VERSION, "time": round(time.time(), 3), "event": event, "result": result,
              **fields}
    if "gib_per_s" not in record and record.get("seconds") and record.get("bytes"):
        record["gib_per_s"] = round(record["bytes"] / (1 << 30) / record["seconds"], 3)
    target = path or "the record file"
    try:
        target = path or record_file()
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        fd = safefs.open_append(target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size + len(line) > max_bytes and os.fstat(fd).st_size:
                fd = _rotate(fd, target)
            os.write(fd, line)
        finally:
            os.close(fd)
    except Exception as e:  # noqa: BLE001 -- a record is never a reason to fail (an unsafe
        # directory raises UnsafePathError, a KvmaccelError; a full disk OSError)
        print(f"kvmaccel: warning: cannot write a record to {target}: {e}", file=sys.stderr)


def _rotate(fd: int, target: str) -> int:
    """Rename the full file (still locked through ``fd``) to ``.1``; return a fresh one.  A
    writer that opened the old file before the rename and waited on the lock writes its
    line to ``.1``: nothing is lost."""
    st = os.fstat(fd)
    try:
        now = os.stat(target, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.replace(target, target + ".1")
    except FileNotFoundError:
        pass
    os.close(fd)
    fresh = safefs.open_append(target)
    fcntl.flock(fresh, fcntl.LOCK_EX)
    return fresh


def read(path: str | None = None) -> Iterator[dict[str, Any]]:
    """Every record, oldest first (the rotated file, then the current one); lines that do
    not parse are skipped."""
    target = path or record_file()
    for name in (target + ".1", target):
        try:  # only kvmaccel's own file, as it is written (raises UnsafePathError)
            fd = safefs.open_own_file(name)
        except FileNotFoundError:
            continue
        with open(fd, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
