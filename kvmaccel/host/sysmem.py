"""Thin ctypes wrappers for the system calls the engine needs and Python's stdlib lacks.

Every call here goes through libc via ctypes, which releases the GIL for the duration of the
call: that is what lets helper threads populate in parallel.  ``mmap.mmap.madvise`` would hold
the GIL (CPython 3.11) and serialise them.

Errors come back as :class:`OSError` with ``errno`` set; callers translate them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_POPULATE = 0x8000
MAP_FAILED = ctypes.c_void_p(-1).value

MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_POPULATE_WRITE = 23  # Linux 5.14, commit 4ca9b3859dac

MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_MF_STRICT = 1 << 0
POLICIES = {"bind": MPOL_BIND, "preferred": MPOL_PREFERRED, "interleave": MPOL_INTERLEAVE,
            "default": MPOL_DEFAULT}

HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994

PR_SET_NAME = 15

_SYSCALLS = {
    "x86_64": {"mbind": 237, "set_mempolicy": 238, "move_pages": 279},
    "aarch64": {"mbind": 235, "set_mempolicy": 237, "move_pages": 239},
}

_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux (glibc): f_type, f_bsize, ... all long-sized.
    _fields_ = [
        ("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong), ("f_bfree", ctypes.c_ulong), ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong), ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2), ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long), ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


_libc.fstatfs.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
_libc.statfs.restype = ctypes.c_int
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def fs_info(fd_or_path: int | str) -> tuple[int, int, int]:
    """Return ``(f_type, f_bsize, bytes_available)`` for a descriptor or a path.

    On hugetlbfs ``f_bsize`` is the huge page size (this is how QEMU detects it too).
    ``bytes_available`` is what the filesystem's ``size=`` limit still allows; hugetlbfs
    without a limit reports 0 blocks, which we return as -1 (no limit).
    """
    buf = _Statfs()
    if isinstance(fd_or_path, int):
        rc = _libc.fstatfs(fd_or_path, ctypes.byref(buf))
    else:
        rc = _libc.statfs(os.fsencode(fd_or_path), ctypes.byref(buf))
    if rc != 0:
        _raise(f"statfs {fd_or_path}")
    f_type = buf.f_type & 0xFFFFFFFF
    if f_type == HUGETLBFS_MAGIC and buf.f_blocks == 0:
        available = -1
    else:
        available = buf.f_bavail * buf.f_bsize
    return f_type, buf.f_bsize, available


def mmap_shared(fd: int, length: int, offset: int = 0) -> int:
    """Map ``length`` bytes of ``fd`` from ``offset``, shared, read-write; return the address."""
    addr = _libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    if addr is None or addr == MAP_FAILED:
        _raise("mmap")
    return int(addr)


def mmap_read_populated(fd: int, length: int) -> int:
    """Map ``length`` bytes of ``fd`` shared, read-only, with every page the file holds
    mapped at once (``MAP_POPULATE``); return the address.  On hugetlbfs a hole would be
    filled by a new page: use it only on a file whose every page exists."""
    addr = _libc.mmap(None, length, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0)
    if addr is None or addr == MAP_FAILED:
        _raise("mmap")
    return int(addr)


def page_nodes(addresses: list[int]) -> list[int]:
    """The NUMA node of the page at each address of this process (``move_pages`` with no
    target nodes only reports); a negative errno for a page that is not mapped."""
    count = len(addresses)
    pages = (ctypes.c_void_p * count)(*addresses)
    status = (ctypes.c_int * count)()
    rc = _libc.syscall(ctypes.c_long(_syscall_number("move_pages")), ctypes.c_int(0),
                       ctypes.c_ulong(count), pages, None, status, ctypes.c_int(0))
    if rc < 0:
        _raise("move_pages")
    return list(status)


def munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        _raise("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    """libc madvise; releases the GIL while the kernel works."""
    if _libc.madvise(addr, length, advice) != 0:
        _raise("madvise")


def touch_pages(addr: int, length: int, page_size: int) -> None:
    """Fault in every page by reading and rewriting one byte (kernels without
    MADV_POPULATE_WRITE).  Holds the GIL between pages: correct but does not scale."""
    for offset in range(0, length, page_size):
        byte = ctypes.c_char.from_address(addr + offset)
        byte.value = byte.value


def zero_range(addr: int, length: int) -> None:
    """memset the range to zero (GIL released)."""
    _libc.memset(addr, 0, length)


def _nodemask(nodes: frozenset[int]) -> tuple[ctypes.Array[ctypes.c_ulong], int]:
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = max(nodes) // bits + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // bits] |= 1 << (node % bits)
    # maxnode is the number of bits the kernel reads; it drops the last one (historic quirk,
    # see numactl's libnuma), so pass one more than we use.
    return mask, words * bits + 1


def _syscall_number(name: str) -> int:
    try:
        return _SYSCALLS[platform.machine()][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name} is not known on {platform.machine()}") from None


def mbind(addr: int, length: int, policy: str, nodes: frozenset[int]) -> None:
    """Set the memory policy of ``[addr, addr+length)`` to ``policy`` over ``nodes``.

    On shmem and hugetlbfs the policy is kept with the file (a shared policy), so pages
    faulted later, by any thread, follow it.  mbind changes VMAs and so takes mmap_lock for
    write: call it before the helpers start, never while they populate.
    """
    mask, maxnode = _nodemask(nodes)
    rc = _libc.syscall(
        ctypes.c_long(_syscall_number("mbind")), ctypes.c_void_p(addr), ctypes.c_ulong(length),
        ctypes.c_int(POLICIES[policy]), mask, ctypes.c_ulong(maxnode), ctypes.c_uint(0),
    )
    if rc != 0:
        _raise("mbind")


def set_thread_mempolicy(policy: str, nodes: frozenset[int]) -> None:
    """Set the calling thread's own memory policy (per thread, no mmap_lock)."""
    mask, maxnode = _nodemask(nodes)
    rc = _libc.syscall(ctypes.c_long(_syscall_number("set_mempolicy")),
                       ctypes.c_int(POLICIES[policy]), mask, ctypes.c_ulong(maxnode))
    if rc != 0:
        _raise("set_mempolicy")


def set_thread_name(name: str) -> None:
    """Name the calling thread (``/proc/self/task/TID/comm``, 15 bytes at most)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def resident_pages(addr: int, length: int, page_size: int) -> int:
    """How many pages of the mapping are resident (mincore)."""
    count = (length + page_size - 1) // page_size
    vec = (ctypes.c_ubyte * count)()
    if _libc.mincore(addr, length, vec) != 0:
        _raise("mincore")
    return sum(1 for b in vec if b & 1)
