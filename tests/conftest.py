"""Shared fixtures.

Tests that need the machine set up by ``scripts/test.sh`` (a hugetlbfs mount with reserved 2M
pages, libvirtd) skip when run by hand without it, and *fail* under the test command
(``KVMACCEL_REQUIRE_ENV=1``), so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmaccel import host as host_mod

HUGETLBFS_DIR = "/dev/hugepages"


def need(condition: bool, why: str) -> None:
    """Skip by hand, fail under the test command."""
    if condition:
        return
    if os.environ.get("KVMACCEL_REQUIRE_ENV") == "1":
        pytest.fail(f"test environment incomplete: {why} (scripts/test.sh should have set it up)")
    pytest.skip(why)


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own kvmaccel state directory (``kvmaccel tune``'s tuning.json), so
    a tuning stored on this machine never changes a plan under test."""
    path = str(tmp_path_factory.mktemp("state"))
    monkeypatch.setenv("KVMACCEL_STATE_DIR", path)
    return path


@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own kvmaccel run directory (records, slots)."""
    path = str(tmp_path_factory.mktemp("run"))
    monkeypatch.setenv("KVMACCEL_RUN_DIR", path)
    return path


def free_hugepages_2m() -> int:
    return host_mod.read_host().hugepages.get(2048, host_mod.HugePagePool(2048, 0, 0)).free_pages


@pytest.fixture
def hugetlbfs(tmp_path: object) -> Iterator[str]:
    """A directory on a 2M hugetlbfs with at least 256 free pages; leftover files removed."""
    need(os.geteuid() == 0, "needs root")
    mounted = any(m.path == HUGETLBFS_DIR and m.page_size_kib == 2048
                  for m in host_mod.read_host().hugetlbfs_mounts)
    need(mounted, f"no 2M hugetlbfs mounted on {HUGETLBFS_DIR}")
    need(free_hugepages_2m() >= 256, "fewer than 256 free 2M huge pages")
    before = set(os.listdir(HUGETLBFS_DIR))
    yield HUGETLBFS_DIR
    for name in set(os.listdir(HUGETLBFS_DIR)) - before:
        if name.startswith("kvtest-"):
            os.unlink(os.path.join(HUGETLBFS_DIR, name))


@pytest.fixture
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh directory on /dev/shm (tmpfs), removed afterwards."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="kvtest-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- golden files for vm-fixtures (tests/test_plan.py) -------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="Rewrite vm-fixtures/*.plan.json from the current planner.")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))
