"""Processes as ``/proc/<pid>`` shows them: the only module that reads a process's entry.

A process is named by its pid and its start time (:func:`start_ticks`, in clock ticks since
boot): a pid alone names whatever process gets it next once this one is gone.  Every reader
takes ``proc`` (default ``/proc``) so tests can point it at a copied tree, and a pid (or
``"self"``).

Errors: :class:`~kvmaccel.errors.ProcessGoneError` when the process no longer exists (its
entry is gone, or the kernel says ``ESRCH`` as it exits); a zombie still exists: its
:func:`stat` reads, in state ``Z``, and :func:`running` says it is not.  Any other failure to
read (``EACCES`` on another user's ``smaps``) comes back as the :class:`OSError` itself, for
the caller to translate.  Nothing here decides anything.

Light: loaded on the hook's warm path (:mod:`kvmaccel.serve.filler`), so it imports only what
``json`` loads anyway.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from ..errors import HostError, ProcessGoneError

PROC = "/proc"
SELF = "self"
EXITED = ("Z", "X")
"""States of a process that has exited: a zombie (not reaped yet) and a dead one.  Either
has released its memory and its mappings already."""


class Stat(NamedTuple):
    """``/proc/<pid>/stat``, the fields kvmaccel uses (``start_ticks``: field 22)."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    nice: int
    threads: int
    start_ticks: int

    @property
    def exited(self) -> bool:
        """A zombie or a dead process: it holds no memory and no mapping any more."""
        return self.state in EXITED


class MapArea(NamedTuple):
    """One line of ``/proc/<pid>/maps`` (or a header line of ``smaps``)."""

    start: int
    end: int
    perms: str  # "rw-s": the last letter is "s" for a shared mapping, "p" for a private one
    offset: int
    dev: int  # os.makedev(major, minor), as st_dev
    inode: int
    path: str  # "" for anonymous memory; "... (deleted)" for an unlinked file

    @property
    def shared(self) -> bool:
        return self.perms.endswith("s")

    @property
    def size_bytes(self) -> int:
        return self.end - self.start


class SmapsArea(NamedTuple):
    """One mapping of ``/proc/<pid>/smaps``: the mapping and its ``<Name>: <n> kB`` lines."""

    area: MapArea
    kib: dict[str, int]


class NumaMap(NamedTuple):
    """One line of ``/proc/<pid>/numa_maps``: the policy (``bind:0``) and the pages mapped
    on each node (``N<node>=<pages>``)."""

    policy: str
    pages_per_node: dict[int, int]


class Holder(NamedTuple):
    """A process that has a file open or mapped (:func:`holders`)."""

    pid: int
    comm: str

    def __str__(self) -> str:
        return f"{self.pid} ({self.comm})"


def _entry(pid: int | str, proc: str) -> str:
    return os.path.join(proc, str(pid))


def _translate(e: OSError, pid: int | str, proc: str) -> Exception:
    """``e`` as :class:`ProcessGoneError` when it says the process no longer exists."""
    base = _entry(pid, proc)
    if e.errno == errno.ESRCH or (e.errno == errno.ENOENT and not os.path.isdir(base)):
        return ProcessGoneError(f"process {pid} no longer exists (no {base})", pid=pid)
    return e


def read_bytes(pid: int | str, name: str, proc: str = PROC) -> bytes:
    """The bytes of ``/proc/<pid>/<name>``."""
    try:
        with open(os.path.join(_entry(pid, proc), name), "rb") as f:
            return f.read()
    except OSError as e:
        raise _translate(e, pid, proc) from None


def read_text(pid: int | str, name: str, proc: str = PROC) -> str:
    """``/proc/<pid>/<name>`` as text (UTF-8; what is not shows as U+FFFD)."""
    return read_bytes(pid, name, proc).decode("utf-8", errors="replace")


def stat(pid: int | str, proc: str = PROC) -> Stat:
    """``/proc/<pid>/stat``.  Raises :class:`ProcessGoneError`."""
    text = read_text(pid, "stat", proc)
    close = text.rfind(")")  # the name in () may hold spaces and parentheses
    fields = text[close + 2:].split()  # fields[0] is field 3, the state
    try:
        return Stat(int(text[:text.index("(")]), text[text.index("(") + 1:close], fields[0],
                    int(fields[1]), int(fields[2]), int(fields[3]), int(fields[16]),
                    int(fields[17]), int(fields[19]))
    except (IndexError, ValueError):
        raise HostError(f"{_entry(pid, proc)}/stat is not a process's stat: "
                        f"{text[:80]!r}") from None


def start_ticks(pid: int | str, proc: str = PROC) -> int:
    """When process ``pid`` started, in clock ticks since boot (field 22 of its ``stat``): a
    pid and this name one process, whatever reuses the pid later.  Raises
    :class:`ProcessGoneError`."""
    return stat(pid, proc).start_ticks


def same_process(pid: int, ticks: int, proc: str = PROC) -> bool:
    """Whether ``pid`` is still the process that started at ``ticks`` (a zombie too)."""
    try:
        return start_ticks(pid, proc) == ticks
    except ProcessGoneError:
        return False


def running(pid: int, ticks: int, proc: str = PROC) -> bool:
    """Whether the process (``pid``, ``ticks``) still runs: it exists, it is that process,
    and it has not exited (a zombie has released its memory and its mappings already)."""
    try:
        now = stat(pid, proc)
    except ProcessGoneError:
        return False
    return now.start_ticks == ticks and not now.exited


def exists(pid: int, proc: str = PROC) -> bool:
    """Whether ``pid`` has an entry (a zombie too: it goes once reaped)."""
    return os.path.isdir(_entry(pid, proc))


def pids(proc: str = PROC) -> list[int]:
    """Every process's pid, as ``proc`` lists them now."""
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def cmdline(pid: int | str, proc: str = PROC) -> list[str]:
    """The command line of ``pid`` (empty for a kernel thread and a zombie).  Raises
    :class:`ProcessGoneError`."""
    argv = read_text(pid, "cmdline", proc).split("\0")
    if argv and argv[-1] == "":
        argv.pop()
    return argv


def comm(pid: int | str, proc: str = PROC) -> str:
    """The name of ``pid`` (15 bytes at most).  Raises :class:`ProcessGoneError`."""
    return read_text(pid, "comm", proc).rstrip("\n")


def threads(pid: int | str, proc: str = PROC) -> list[int]:
    """The thread ids of ``pid``.  Raises :class:`ProcessGoneError`."""
    try:
        return sorted(int(tid) for tid in os.listdir(os.path.join(_entry(pid, proc), "task")))
    except OSError as e:
        raise _translate(e, pid, proc) from None


def _map_area(line: str) -> MapArea | None:
    fields = line.split(maxsplit=5)
    if len(fields) < 5:
        return None
    try:
        lo, _, hi = fields[0].partition("-")
        major, _, minor = fields[3].partition(":")
        return MapArea(int(lo, 16), int(hi, 16), fields[1], int(fields[2], 16),
                       os.makedev(int(major, 16), int(minor, 16)), int(fields[4]),
                       fields[5] if len(fields) > 5 else "")
    except ValueError:
        return None


def maps(pid: int | str, proc: str = PROC) -> list[MapArea]:
    """Every mapping of ``pid`` (none for a zombie).  Raises :class:`ProcessGoneError`."""
    found = []
    for line in read_text(pid, "maps", proc).splitlines():
        area = _map_area(line)
        if area is not None:
            found.append(area)
    return found


def smaps(pid: int | str, proc: str = PROC) -> list[SmapsArea]:
    """Every mapping of ``pid`` with its sizes in kB (``Rss``, ``Shared_Hugetlb``,
    ``KernelPageSize``...).  Raises :class:`ProcessGoneError`."""
    found: list[SmapsArea] = []
    for line in read_text(pid, "smaps", proc).splitlines():
        first, _, rest = line.partition(" ")
        if first.endswith(":"):  # "Rss:   4 kB"; "VmFlags: rd wr" has no size: skipped
            words = rest.split()
            if found and len(words) == 2 and words[1] == "kB" and words[0].isdigit():
                found[-1].kib[first[:-1]] = int(words[0])
            continue
        area = _map_area(line)
        if area is not None:
            found.append(SmapsArea(area, {}))
    return found


def numa_maps(pid: int | str, proc: str = PROC) -> dict[int, NumaMap]:
    """Start address -> policy and pages per node, of every mapping of ``pid``.  Raises
    :class:`ProcessGoneError`."""
    found = {}
    for line in read_text(pid, "numa_maps", proc).splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        nodes = {}
        for w in words[2:]:
            node, eq, pages = w.partition("=")
            if eq and node[:1] == "N" and node[1:].isdigit() and pages.isdigit():
                nodes[int(node[1:])] = int(pages)
        try:
            found[int(words[0], 16)] = NumaMap(words[1], nodes)
        except ValueError:
            continue
    return found


def _stat_link(pid: int | str, rel: str, proc: str) -> os.stat_result:
    try:
        return os.stat(os.path.join(_entry(pid, proc), rel))
    except OSError as e:
        raise _translate(e, pid, proc) from None


def fd_stat(pid: int | str, fd: int, proc: str = PROC) -> os.stat_result:
    """``stat`` of what descriptor ``fd`` of ``pid`` is open on.  Raises
    :class:`ProcessGoneError`, :class:`FileNotFoundError` when no such descriptor is open."""
    return _stat_link(pid, f"fd/{fd}", proc)


def fd_stats(pid: int | str, proc: str = PROC) -> list[os.stat_result]:
    """``stat`` of what each open descriptor of ``pid`` is open on (one that closes
    meanwhile is left out).  Raises :class:`ProcessGoneError`."""
    try:
        names = os.listdir(os.path.join(_entry(pid, proc), "fd"))
    except OSError as e:
        raise _translate(e, pid, proc) from None
    found = []
    for name in names:
        try:
            found.append(_stat_link(pid, f"fd/{name}", proc))
        except ProcessGoneError:
            raise
        except OSError:  # closed meanwhile, or a descriptor we may not follow
            continue
    return found


def cwd_stat(pid: int | str, path: str, proc: str = PROC) -> os.stat_result:
    """``stat`` of ``path`` as ``pid`` would find it: a relative path from its working
    directory.  Raises :class:`ProcessGoneError`, :class:`OSError`."""
    if os.path.isabs(path):
        return os.stat(path)
    return _stat_link(pid, os.path.join("cwd", path), proc)


def map_file_stat(pid: int | str, start: int, end: int, proc: str = PROC) -> os.stat_result:
    """``stat`` of the file mapped from ``start`` to ``end`` (``map_files/<start>-<end>``,
    which works for an unlinked file and a memfd).  Raises :class:`ProcessGoneError`,
    :class:`OSError`."""
    return _stat_link(pid, f"map_files/{start:x}-{end:x}", proc)


def holders(st: os.stat_result, proc: str = PROC) -> list[Holder]:
    """Every process that has the inode ``st`` open or mapped (best effort: processes that
    exit or that cannot be read are left out)."""
    found = []
    for pid in pids(proc):
        if _maps_inode(pid, st, proc) or _holds_open(pid, st, proc):
            try:
                name = comm(pid, proc)
            except (ProcessGoneError, OSError):
                name = "?"
            found.append(Holder(pid, name))
    return found


def _maps_inode(pid: int, st: os.stat_result, proc: str) -> bool:
    try:
        return any((a.dev, a.inode) == (st.st_dev, st.st_ino) for a in maps(pid, proc))
    except (ProcessGoneError, OSError):
        return False


def _holds_open(pid: int, st: os.stat_result, proc: str) -> bool:
    try:
        return any((s.st_dev, s.st_ino) == (st.st_dev, st.st_ino) for s in fd_stats(pid, proc))
    except (ProcessGoneError, OSError):
        return False
