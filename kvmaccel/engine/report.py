"""What a run populated, in words an operator checks: ``hugetlbfs 2M``, ``tmpfs 4K``.

The engine sees descriptors only; :func:`annotate` adds to its result the kind of memory
each backing was (filesystem and page size, with the bytes of each) and a warning for a
target that is most likely not what the user meant.

The trap this catches: a directory named ``hugepages`` with nothing mounted on it.
``/dev/hugepages`` is an empty directory of devtmpfs when no hugetlbfs is mounted there (a
test script that unmounted it leaves exactly that), and devtmpfs answers ``statfs`` with
tmpfs's magic, so a populate "succeeds" on 4K pages at a fraction of the speed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from ..model.units import format_size
from .populate import PopulateResult

log = logging.getLogger(__name__)

HUGE_NAMES = ("hugepages", "hugetlbfs", "hugetlb", "huge")


def hugepage_name_warning(path: str, fs_kind: str, page_size_bytes: int) -> str | None:
    """A warning when ``path`` sits under a directory named like a huge page mount but is
    not on hugetlbfs; None otherwise."""
    if fs_kind == "hugetlbfs":
        return None
    parts = [p.lower() for p in os.path.dirname(os.path.abspath(path)).split("/") if p]
    named = next((p for p in parts if p in HUGE_NAMES or p.startswith("hugepages")), None)
    if named is None:
        return None
    return (f"{path} is on {fs_kind} with {format_size(page_size_bytes)} pages, not hugetlbfs, "
            f"although it is under a directory named {named!r}: is hugetlbfs mounted there? "
            "(mount -t hugetlbfs -o pagesize=2M none DIR; `kvmaccel doctor` checks the mounts)")


class _Spec(Protocol):
    @property
    def path(self) -> str | None: ...
    @property
    def tmpfile_dir(self) -> str | None: ...
    @property
    def size_bytes(self) -> int: ...


class _Backing(Protocol):  # kvmaccel.engine.backing.Backing, which imports this module
    @property
    def spec(self) -> _Spec: ...
    @property
    def fs_kind(self) -> str: ...
    @property
    def page_size_bytes(self) -> int: ...


def annotate(result: PopulateResult, backings: Sequence[_Backing]) -> PopulateResult:
    """``result`` with the memory kinds of ``backings`` and the warnings about them.  Each
    warning is also logged (the CLI shows warnings on stderr)."""
    kinds: dict[tuple[str, int], int] = {}
    warnings: list[str] = []
    for b in backings:
        key = (b.fs_kind, b.page_size_bytes // 1024)
        kinds[key] = kinds.get(key, 0) + b.spec.size_bytes
        path = b.spec.path or b.spec.tmpfile_dir
        warning = hugepage_name_warning(path, b.fs_kind, b.page_size_bytes) if path else None
        if warning and warning not in warnings:
            log.warning("%s", warning)
            warnings.append(warning)
    memory = tuple((fs, kib, n) for (fs, kib), n in kinds.items())
    return dataclasses.replace(result, memory=memory, warnings=tuple(warnings))
