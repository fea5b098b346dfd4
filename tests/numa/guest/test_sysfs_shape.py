"""The fake two-node tree (tests/data/sysfs/two-node) has the shape of a real kernel's.

The unit tests read that tree for what the guest cannot give (32 CPUs per node, cpufreq,
pools of thousands of pages).  Here every file of it is compared with the same file of the
running two-node kernel: it must exist, and read the same way, line by line, with numbers,
CPU lists and masks standing for any value.  The directories of huge page pools must list the
same files.  What a QEMU guest lacks (cpufreq) is named below, with the reason.
"""

from __future__ import annotations

import functools
import os
import re

import pytest

from .conftest import record

FAKE = os.path.join(os.path.dirname(__file__), "..", "..", "data", "sysfs", "two-node")

# Present in the fake, absent under QEMU without a cpufreq driver (TCG and KVM alike).
ABSENT_IN_A_VM = re.compile(r"^sys/devices/system/cpu/cpu\d+/cpufreq/")

_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")  # 7, 0-15,32-47
_MASK = re.compile(r"^[0-9a-f]+(,[0-9a-f]+)*$")


def token_shape(token: str, name: str) -> str:
    if name == "cpumap" and _MASK.match(token):
        return "<mask>"
    if _LIST.match(token):
        return "<n>"
    return re.sub(r"\d+", "<n>", token)


def shape(text: str, name: str) -> list[str]:
    return [" ".join(token_shape(t, name) for t in line.split()) for line in text.splitlines()]


# Keys only some CPU vendors show (x86 show_cpuinfo: "TLB size" only where the CPU reports one,
# AMD's; QEMU's TCG CPU is an AMD one).
VENDOR_KEYS = {"TLB size"}


def cpuinfo_keys(text: str) -> list[str]:
    """The keys of the first processor's block (values differ from CPU to CPU)."""
    block = text.split("\n\n")[0]
    keys = [line.split(":")[0].strip() for line in block.splitlines()]
    return [k for k in keys if k not in VENDOR_KEYS]


def read_real(path: str) -> str | None:
    """The file's text, or None when the kernel refuses reads (a write-only attribute)."""
    try:
        with open(path) as f:
            return f.read()
    except PermissionError:
        return None
    except OSError as e:
        pytest.fail(f"{path}: {e}")


def compare(rel: str) -> str | None:
    """What differs between the fake and the real file ``rel``, or None."""
    real_path = "/" + rel
    if not os.path.exists(real_path):
        return None if ABSENT_IN_A_VM.match(rel) else f"{real_path} does not exist"
    with open(os.path.join(FAKE, rel)) as f:
        fake = f.read()
    real = read_real(real_path)
    name = os.path.basename(rel)
    if real is None:
        return None if fake == "" else f"{real_path} cannot be read, the fake has text"
    if rel == "proc/cpuinfo":
        same = cpuinfo_keys(fake) == cpuinfo_keys(real)
        return None if same else f"cpuinfo keys {cpuinfo_keys(fake)} != {cpuinfo_keys(real)}"
    if rel == "proc/mounts":
        bad = [line for line in fake.splitlines() if len(line.split()) != 6]
        huge = [line.split()[3] for line in real.splitlines() if " hugetlbfs " in line]
        if bad or not all(re.search(r"(^|,)pagesize=\d+[MG](,|$)", o) for o in huge):
            return f"mount lines {bad}, real hugetlbfs options {huge}"
        return None
    if shape(fake, name) != shape(real, name):
        return f"{rel}: fake {shape(fake, name)} != real {shape(real, name)}"
    return None


@functools.cache
def fake_files() -> list[str]:
    """Every file of the fake tree, relative to it; the cpufreq directories of its 64 CPUs
    only when this kernel has cpufreq (walking them over 9p under TCG takes seconds)."""
    found = []
    for directory, subdirs, files in os.walk(FAKE):
        rel = os.path.relpath(directory, FAKE)
        if rel == "sys/devices/system/cpu" and not os.path.exists(f"/{rel}/cpu0/cpufreq"):
            subdirs[:] = []
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), FAKE))
    return sorted(found)


def test_every_file_of_the_fake_tree_reads_like_the_real_one(
        mounts: dict[str, str], request: pytest.FixtureRequest) -> None:
    """(``mounts``: a hugetlbfs is mounted, so /proc/mounts has hugetlbfs lines to compare.)"""
    files = fake_files()
    problems = [p for p in map(compare, files) if p]
    compared = [f for f in files if os.path.exists("/" + f)]
    record(request, "files", {"walked": len(files), "compared": len(compared)})
    assert len(compared) > 40, compared
    assert not problems, "\n".join(problems)


def test_huge_page_pool_directories_list_the_same_files() -> None:
    pools = sorted({os.path.dirname(f) for f in fake_files() if "/hugepages-" in f})
    assert pools
    for rel in pools:
        fake = sorted(os.listdir(os.path.join(FAKE, rel)))
        real = sorted(os.listdir("/" + rel))
        assert fake == real, f"{rel}: fake {fake}, real {real}"
