"""Sizes and CPU/node lists: parse and format, as tested pairs.

``parse_size`` reads what operators type (``8G``, ``512M``, ``2MiB``, ``4096``): binary
multiples, bytes when no suffix.  ``parse_cpu_spec`` reads the kernel and libvirt list form
(``0-3,8,^2``).
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import UsageError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Return the number of bytes in ``text`` (``8G``, ``8GiB``, ``512m``, ``4096``).

    Suffixes are binary (K = 1024).  Raises :class:`UsageError` for anything else.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r}; use a number with K, M, G or T (e.g. 8G)")
    number, unit, _ = m.groups()
    value = Fraction(number) * (1 << _SHIFT[unit.lower()])  # exact, unlike a float
    if value.denominator != 1:
        raise UsageError(f"invalid size {text!r}; it is not a whole number of bytes")
    if value <= 0:
        raise UsageError(f"invalid size {text!r}; it must be greater than zero")
    if value > MAX_SIZE_BYTES:
        raise UsageError(f"invalid size {_excerpt(text)!r}; it is above 8 EiB, more than any "
                         "file or memory can hold")
    return int(value)


MAX_SIZE_BYTES = (1 << 63) - 1
"""The largest size (``off_t`` and libvirt's sizes are signed 64-bit)."""


def format_size(size_bytes: int) -> str:
    """Return ``size_bytes`` in the largest binary unit that keeps it readable (``8.0G``)."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size_bytes >= 1 << shift:
            value = size_bytes / (1 << shift)
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
    return f"{size_bytes}B"


MAX_CPU_ID = 8191
"""The largest CPU number Linux can have on x86_64 (``NR_CPUS`` is at most 8192)."""
MAX_NODE_ID = 1023
"""The largest NUMA node number Linux can have (``MAX_NUMNODES`` = 1 << ``NODES_SHIFT``, at
most 10 on x86_64)."""


def parse_cpu_spec(text: str, max_id: int = MAX_CPU_ID) -> frozenset[int]:
    """Parse a CPU or node list such as ``0-3,8,^2`` into a set of integers.

    ``^N`` excludes N (libvirt's form).  Empty text is the empty set.  Raises
    :class:`UsageError` for malformed text and for ids above ``max_id`` (checked before any
    range is expanded, so ``0-3000000`` costs nothing).
    """
    include: set[int] = set()
    exclude: set[int] = set()
    parts = text.split(",")
    for i, raw in enumerate(parts):
        part = raw.strip()
        if not part:
            # libvirt 9.0 (virBitmapParse) takes "0," but refuses "0,,1" and ",0".
            if len(parts) == 1 or i == len(parts) - 1:
                continue
            raise UsageError(f"invalid CPU or node list {_excerpt(text)!r}: an empty item "
                             "between commas; use a form like 0-3,8,^2")
        target = include
        if part.startswith("^"):
            target = exclude
            part = part[1:]
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo < 0 or hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
                if lo < 0:
                    raise ValueError
        except ValueError:
            raise UsageError(
                f"invalid CPU or node list {_excerpt(text)!r} at {_excerpt(raw.strip())!r}; "
                "use a form like 0-3,8,^2") from None
        if hi > max_id:
            raise UsageError(
                f"CPU or node list {_excerpt(text)!r} names {_excerpt(str(hi))}, above the "
                f"kernel's limit of {max_id}; give ids of this host (see lscpu or numactl -H)")
        target.update(range(lo, hi + 1))
    return frozenset(include - exclude)


def parse_node_spec(text: str) -> frozenset[int]:
    """:func:`parse_cpu_spec` for NUMA node lists (ids up to :data:`MAX_NODE_ID`)."""
    return parse_cpu_spec(text, MAX_NODE_ID)


def parse_node_list(text: str, what: str = "--nodes") -> tuple[int, ...]:
    """A node list the user gave (``what`` names where), sorted; one that names no node
    (``""``, ``","``, ``"^0"``) is refused rather than read as "no binding"."""
    nodes = parse_node_spec(text)
    if not nodes:
        raise UsageError(f"{what} {_excerpt(text)!r} names no NUMA node; give nodes such as 0 "
                         f"or 0,1, or leave {what} out")
    return tuple(sorted(nodes))


MIN_PAGE_BYTES = 4096


def parse_page_size(text: str) -> int:
    """A page size the user gave (``4K``, ``2M``, ``1G``) in KiB: a power of two of at least
    4 KiB (``3M`` or ``1K`` is no page size of any host).  Raises :class:`UsageError`."""
    size = parse_size(text)
    if size < MIN_PAGE_BYTES or size & (size - 1):
        raise UsageError(f"invalid page size {_excerpt(text)!r}; a page size is a power of two "
                         "of at least 4K, such as 4K, 2M or 1G")
    return size // KIB


def _excerpt(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, so that an error stays one short line."""
    return text if len(text) <= limit else text[:limit] + "..."


def format_cpu_spec(ids: frozenset[int] | set[int] | list[int]) -> str:
    """Format integers as the compact list form (``{0,1,2,5}`` -> ``0-2,5``)."""
    ordered = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    """Round ``value`` down to a multiple of ``alignment``."""
    return value // alignment * alignment
