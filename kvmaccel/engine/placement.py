"""Where a populated file's pages are: checked before a file is handed to a guest.

QEMU binds a backend's range with ``mbind`` when it maps it, but a policy does not move pages
that are already in the file (``mbind`` without ``MPOL_MF_MOVE``): a pre-populated file's pages
stay where they were made.  So a file whose pages are not on its backend's host nodes must
never reach the guest; kvmaccel looks before it hands one over.

How: map the file read-only with ``MAP_POPULATE`` (which maps the pages the file holds and
allocates nothing in a complete file), ask ``move_pages(2)`` with no target nodes for the node
of each page, unmap.  Every huge page is looked at; base pages one per 2 MiB.  Measured here:
1 GiB of 2M pages in about a millisecond.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import BackingError
from ..host import sysmem

SAMPLE_STRIDE_BYTES = 2 << 20
BATCH = 4096


@dataclass(frozen=True)
class Placement:
    """Pages looked at per node (-1: not present), and how many of them are on a node the
    backend is not bound to."""

    pages_per_node: dict[int, int]
    misplaced: int

    def describe(self) -> str:
        return ", ".join(f"{'missing' if n < 0 else f'node {n}'}: {c}"
                         for n, c in sorted(self.pages_per_node.items()))


def placement(fd: int, size_bytes: int, page_size_bytes: int,
              nodes: Collection[int]) -> Placement:
    """Where the pages of the file open as ``fd`` are, against ``nodes`` (empty: any node
    will do; only missing pages count as misplaced).  Raises :class:`BackingError` for a file
    that does not hold every page (mapping it would fill the holes)."""
    st = os.fstat(fd)
    if st.st_blocks * 512 < size_bytes:
        raise BackingError(f"the file holds {st.st_blocks * 512} of {size_bytes} bytes; not "
                           "complete, so not handed over")
    stride = max(page_size_bytes, SAMPLE_STRIDE_BYTES)
    addr = sysmem.mmap_read_populated(fd, size_bytes)
    counts: Counter[int] = Counter()
    try:
        offsets = range(0, size_bytes, stride)
        for start in range(0, len(offsets), BATCH):
            batch = [addr + o for o in offsets[start:start + BATCH]]
            for node in sysmem.page_nodes(batch):
                counts[node if node >= 0 else -1] += 1
    finally:
        sysmem.munmap(addr, size_bytes)
    wanted = set(nodes)
    misplaced = sum(c for n, c in counts.items() if n < 0 or (wanted and n not in wanted))
    return Placement(dict(counts), misplaced)


def check_placement(fd: int, size_bytes: int, page_size_bytes: int, nodes: Collection[int],
                    what: str) -> None:
    """Raise :class:`BackingError` unless every page of the file is on ``nodes``."""
    found = placement(fd, size_bytes, page_size_bytes, nodes)
    if found.misplaced:
        raise BackingError(
            f"{what}: {found.misplaced} page(s) are not on node(s) "
            f"{','.join(map(str, sorted(nodes)))} ({found.describe()}); QEMU would not move "
            "them, so the file is not handed to the guest")
