"""Shared fixtures.

Tests that need the machine set up by ``scripts/test.sh`` (a hugetlbfs mount with reserved 2M
pages, libvirtd) skip when run by hand without it, and *fail* under the test command
(``KVMACCEL_REQUIRE_ENV=1``), so CI can never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from kvmaccel import paths
from kvmaccel.bench.virsh import private_mount as virsh_private_mount
from kvmaccel.host import facts as host_mod

SKIPPED: list[str] = []  # node ids of every test (or module) skipped in this run


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPPED.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under the test command a skip of any kind (``pytest.skip``, ``importorskip``,
    ``skipif``, not only :func:`need`) fails the run: a green CI run means every test ran."""
    if os.environ.get("KVMACCEL_REQUIRE_ENV") != "1" or not SKIPPED:
        return
    shown = ", ".join(SKIPPED[:5]) + (f" and {len(SKIPPED) - 5} more" if len(SKIPPED) > 5 else "")
    print(f"\nconftest: {len(SKIPPED)} skipped under KVMACCEL_REQUIRE_ENV=1 ({shown}); "
          "the test command must run every test: install what they need")
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture(autouse=True)
def record_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own record file (starts, stops, scrubs, fills): the host's
    /var/log/kvmaccel/records.jsonl is never written by a test run in this process."""
    path = str(tmp_path_factory.mktemp("records") / "records.jsonl")
    monkeypatch.setenv("KVMACCEL_RECORD_FILE", path)
    return path


@pytest.fixture(autouse=True)
def places(state_dir: str, run_dir: str, record_file: str) -> Iterator[paths.Places]:
    """The test process's kvmaccel places, resolved from the variables above as an entry
    point resolves them (:func:`kvmaccel.paths.resolve`); the ones before are put back after
    the test.  A test that changes a variable calls :func:`use_environment`."""
    chosen = paths.resolve(os.environ)
    previous = paths.use(chosen)
    yield chosen
    paths.use(previous)


def use_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> paths.Places:
    """Set ``variables`` (``KVMACCEL_CONFIG="..."``) for the rest of the test and resolve
    the process's places again, as an entry point started with them would."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    chosen = paths.resolve(os.environ)
    paths.use(chosen)
    return chosen


def populating_bytes(pid: int, directory: str) -> int:
    """Bytes process ``pid`` has populated so far in a file it holds open in ``directory``
    (kvmaccel populates new files unnamed, and names them only when they are complete)."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir) if os.path.isdir(fd_dir) else []:
        with contextlib.suppress(OSError):
            if os.readlink(os.path.join(fd_dir, fd)).startswith(directory.rstrip("/") + "/"):
                return os.stat(os.path.join(fd_dir, fd)).st_blocks * 512
    return 0


def free_hugepages_2m() -> int:
    return host_mod.read_host().hugepages.get(2048, host_mod.HugePagePool(2048, 0, 0)).free_pages


@contextlib.contextmanager
def private_mount(fs_type: str, options: str, prefix: str = "kvtest-") -> Iterator[str]:
    """A fresh tmpfs or hugetlbfs of the tests' own (:func:`kvmaccel.bench.virsh.private_mount`):
    whatever a test leaves in it (pool files, a detached scrub's work) goes with it, and the
    host's own /dev/shm and /dev/hugepages, and any pool there, are never touched."""
    need(os.geteuid() == 0, "needs root (mounts a private tmpfs or hugetlbfs)")
    with virsh_private_mount(fs_type, options, prefix) as path:
        yield path


@pytest.fixture
def hugetlbfs() -> Iterator[str]:
    """A private 2M hugetlbfs (the host has at least 256 free 2M pages for it)."""
    need(os.geteuid() == 0, "needs root")
    need(free_hugepages_2m() >= 256, "fewer than 256 free 2M huge pages")
    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as path:
        yield path


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A private tmpfs, as /dev/shm is one."""
    with private_mount("tmpfs", "mode=0755") as path:
        yield path


# --- golden files for vm-fixtures (tests/test_plan.py) -------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="Rewrite vm-fixtures/*.plan.json from the current planner.")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))
