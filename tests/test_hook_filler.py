"""The filler (``kvmaccel.serve.overlap``) stops for good, and works in its cgroup only.

Without libvirt: the hook runs here, in this process, as libvirt would run it for a guest
whose files are on a private tmpfs with ``<allocation mode='immediate'/>`` (so QEMU would
preallocate them and the hook leaves a filler beside it), and this test plays QEMU: it
preallocates a file itself, and punches a hole in it afterwards as QEMU's discard does
(``fallocate(PUNCH_HOLE|KEEP_SIZE)``, what a balloon, free page reporting or postcopy's
discard at listen do to fd-backed RAM).  The filler crawls in a cpu cgroup with 1 ms of CPU
per 100 ms (cgroup v1 ``cpu.cfs_quota_us``), so that what it does and when can be watched.
``tests/test_hook_overlap.py`` does the same on the real libvirtd and QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from kvmaccel.host import sysmem
from kvmaccel.libvirt import entry
from kvmaccel.serve.state import FillerRef, GuestState
from kvmaccel.setup import install as hook_install
from tests.conftest import need
from tests.test_hook import HEAVY, run_hook_without_site

CPU_V1 = "/sys/fs/cgroup/cpu"
CGROUP = "kvmaccel-test-filler"
NAME = "kvtest-filler"
UUID = "5b0c9f3e-2d41-4c7a-9a55-0f2f5f1e8a11"
MIB = 1 << 20
STEP = 64 * MIB  # the filler's piece, and the engine's largest step
PATTERN = b"the-guest-wrote-this"

pytestmark = [pytest.mark.root]


def guest_xml(cells_mib: tuple[int, ...], domain_id: int | None = 9) -> bytes:
    id_attr = f" id='{domain_id}'" if domain_id is not None else ""
    cells = "".join(f"<cell id='{i}' cpus='{i}' memory='{m}' unit='MiB'/>"
                    for i, m in enumerate(cells_mib))
    return f"""<domain type='kvm'{id_attr}>
  <name>{NAME}</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>{sum(cells_mib)}</memory>
  <memoryBacking><source type='file'/><access mode='shared'/>
    <allocation mode='immediate'/></memoryBacking>
  <vcpu>{len(cells_mib)}</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu><numa>{cells}</numa></cpu>
</domain>""".encode()


class Hook:
    """kvmaccel's hook for one guest on a private tmpfs, run as libvirt runs it."""

    def __init__(self, workdir: str, shm: str, cells_mib: tuple[int, ...]) -> None:
        self.config_path = f"{workdir}/kvmaccel.toml"
        self.log_file = f"{workdir}/hook.log"
        self.cells_mib = cells_mib
        self.domain_dir = f"{shm}/libvirt/qemu/9-{NAME}"
        with open(f"{workdir}/qemu.conf", "w") as f:
            f.write(f'memory_backing_dir = "{shm}"\n')
        with open(self.config_path, "w") as f:
            f.write(f'syslog = false\nlog_file = "{self.log_file}"\nlog_level = "debug"\n'
                    f'run_dir = "{os.environ["KVMACCEL_RUN_DIR"]}"\n'
                    f'qemu_conf = "{workdir}/qemu.conf"\ncgroup = "{CGROUP}"\n'
                    'energy = "performance"\n[limits]\nthreads = 2\n[pool]\nenabled = false\n')

    def run(self, op: str, subop: str, domain_id: int | None = 9) -> int:
        return entry.main([NAME, op, subop, "-"],
                          io.BytesIO(guest_xml(self.cells_mib, domain_id)),
                          config_path=self.config_path)

    def start(self) -> int:
        """``prepare`` and ``start begin``; the filler's pid."""
        assert self.run("prepare", "begin") == 0
        os.makedirs(self.domain_dir)  # libvirt makes it just before `start begin`
        assert self.run("start", "begin") == 0
        with open(f"{os.environ['KVMACCEL_RUN_DIR']}/domains/{UUID}.json") as f:
            filler = json.load(f)["filler"]
        assert isinstance(filler["pid"], int), self.log()
        return int(filler["pid"])

    def file(self, cell: int) -> str:
        return f"{self.domain_dir}/ram-node{cell}"

    def stop(self) -> None:
        assert self.run("stopped", "end", domain_id=None) == 0

    def log(self) -> str:
        with open(self.log_file) as f:
            return f.read()


@contextlib.contextmanager
def crawling_cgroup(name: str) -> Iterator[str]:
    """kvmaccel's cgroup ``name``, made here first with 1 ms of CPU per 100 ms."""
    need(os.path.isdir(CPU_V1), "needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    directory = os.path.join(CPU_V1, name)
    os.makedirs(directory, exist_ok=True)
    quota(directory, 1000)
    try:
        yield directory
    finally:
        quota(directory, -1)
        for _ in range(100):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
                break
            time.sleep(0.1)


def quota(directory: str, us: int) -> None:
    with open(os.path.join(directory, "cpu.cfs_quota_us"), "w") as f:
        f.write(str(us))


@pytest.fixture
def crawl() -> Iterator[str]:
    """kvmaccel's cgroup, made here first with 1 ms of CPU per 100 ms; yields its directory."""
    need(os.geteuid() == 0, "needs root")
    with crawling_cgroup(CGROUP) as directory:
        yield directory


@contextlib.contextmanager
def started(hook: Hook) -> Iterator[int]:
    """The guest started up to QEMU; yields the filler's pid.  Afterwards the guest stops
    (the filler is stopped, the files go) and the filler, this process's child, is reaped."""
    pid = hook.start()
    try:
        yield pid
    finally:
        hook.stop()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def gone(pid: int) -> bool:
    """The filler has exited (it is this process's child: reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    return not os.path.exists(f"/proc/{pid}")


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def qemu_preallocates(path: str) -> None:
    """What QEMU's preallocation does to the file: every page faulted in."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        addr = sysmem.mmap_shared(fd, size)
        try:
            sysmem.madvise(addr, size, sysmem.MADV_POPULATE_WRITE)
        finally:
            sysmem.munmap(addr, size)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def qemu_discards(path: str, offset: int, length: int) -> None:
    """What QEMU does to fd-backed RAM it discards (``ram_block_discard_range``)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def cpu_cgroup(pid: int) -> str:
    """The cpu controller's cgroup of ``pid`` (cgroup v1), e.g. ``/kvmaccel-test-filler``."""
    with open(f"/proc/{pid}/cgroup") as f:
        return cpu_cgroup_of(f.read())


def cpu_cgroup_of(text: str) -> str:
    """The cpu controller's cgroup in ``text``, a /proc/<pid>/cgroup."""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return ""


def test_a_file_once_whole_is_left_alone_for_good(tmp_path: object, shm_dir: str,
                                                   crawl: str) -> None:
    """Two files: the filler walks ram-node0 first (1 GiB, empty: real work at 1% of a CPU),
    then ram-node1 (256 MiB).  QEMU preallocates ram-node1 while the filler is busy with
    ram-node0, and then discards a range of it; the filler, when it gets there, must leave
    that range a hole: it saw the file whole before."""
    hook = Hook(str(tmp_path), shm_dir, (1024, 256))
    with started(hook) as pid:
        busy, done = hook.file(0), hook.file(1)
        qemu_preallocates(done)
        assert allocated(done) == 256 * MIB
        # Two of the filler's steps of ram-node0 more than it had when ram-node1 became
        # whole: the second began after that, and looked at every file before it did.
        mark = allocated(busy)
        wait_for("two more steps of ram-node0", lambda: allocated(busy) >= mark + 2 * STEP)
        assert not gone(pid)
        assert allocated(busy) < 1024 * MIB  # still at work there, ram-node1 ahead of it
        qemu_discards(done, 64 * MIB, 64 * MIB)
        assert allocated(done) == 192 * MIB
        quota(crawl, -1)  # full speed: it walks all of both files now, or skips them
        wait_for("the filler to finish", lambda: gone(pid))
        assert allocated(busy) == 1024 * MIB, hook.log()[-2000:]  # it did its work
        assert allocated(done) == 192 * MIB, "the filler faulted the discarded range in again"
        assert f"{done} is allocated whole" in hook.log()


def test_the_filler_is_in_its_cgroup_before_the_hook_returns(tmp_path: object, shm_dir: str,
                                                             crawl: str) -> None:
    """Right when ``start begin`` returns (libvirt then runs the next hook and QEMU), the
    filler is in the config's cgroup, and it sizes its helpers by that cgroup's CPU quota
    (1% of a CPU: no helper beside the calling thread), not by the hook's."""
    hook = Hook(str(tmp_path), shm_dir, (256,))
    with started(hook) as pid:
        assert cpu_cgroup(pid) == f"/{CGROUP}"
        # Once it has begun to populate, it has counted its helpers: full speed from then.
        wait_for("the filler to begin", lambda: allocated(hook.file(0)) > 0)
        quota(crawl, -1)
        wait_for("the filler to finish", lambda: gone(pid))
        assert "filler populated 256M alongside QEMU" in hook.log(), hook.log()[-2000:]
        assert ", 1 thread(s)" in hook.log(), hook.log()[-2000:]


def test_the_filler_never_changes_what_was_written(tmp_path: object, shm_dir: str,
                                                   crawl: str) -> None:
    """Pages written while the filler crawls (every other 2 MiB, both ends) are unchanged
    after it has walked the whole file at full speed, and every page is there."""
    hook = Hook(str(tmp_path), shm_dir, (256,))
    with started(hook) as pid:
        path = hook.file(0)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 256 * MIB) as m:
            written = range(0, 256 * MIB, 4 * MIB)
            for offset in written:
                m[offset:offset + len(PATTERN)] = PATTERN
                m[offset + 2 * MIB - len(PATTERN):offset + 2 * MIB] = PATTERN
            assert allocated(path) < 256 * MIB  # not whole: the filler has work left
            quota(crawl, -1)
            wait_for("the filler to finish", lambda: gone(pid))
            assert allocated(path) == 256 * MIB
            changed = [o for o in written if m[o:o + len(PATTERN)] != PATTERN
                       or m[o + 2 * MIB - len(PATTERN):o + 2 * MIB] != PATTERN]
        assert changed == []


# --- started begin: the hook's own stop, and what it costs every guest ----------------------

def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def leave_a_filler(run_dir: str, key: str, pid: int, ticks: int) -> None:
    """What ``start begin`` leaves for a filler: the pid and start time in the guest's state,
    and the filler record the installed script looks for."""
    os.makedirs(f"{run_dir}/domains", exist_ok=True)
    filler = FillerRef(pid, ticks)
    state = GuestState("kvtest-hook", key, 7, "7-kvtest-hook", time.time(), filler=filler)
    with open(f"{run_dir}/domains/{key}.json", "w") as f:
        json.dump(state.to_json(), f)
    os.makedirs(f"{run_dir}/fillers", exist_ok=True)
    with open(f"{run_dir}/fillers/{key}.json", "w") as f:
        json.dump(filler.to_json(), f)


def test_started_kills_the_filler_by_pid_and_start_time_without_heavy_imports(
        tmp_path: object, run_dir: str) -> None:
    """``started begin`` as the installed script runs it (``python -S``): the process
    recorded as the filler is killed and the record goes; a process that only has the
    recorded pid (another start time) is left alone.  Neither logging nor the planner nor
    the engine is imported."""
    from tests.test_hook import UUID as HOOK_UUID
    from tests.test_hook import Env, domain_xml

    env = Env(f"{tmp_path}/kvmaccel.toml", f"{tmp_path}/hook.log", "", "")
    env.write_config()
    with open(f"{tmp_path}/qemu.conf", "w") as f:
        f.write("")
    assert env.run("release", "end", domain_xml(domain_id=None)) == 0  # the config snapshot
    heavy = HEAVY | {"kvmaccel.engine.populate", "kvmaccel.engine.backing",
                     "kvmaccel.serve.overlap", "kvmaccel.libvirt.ops"}
    with contextlib.ExitStack() as stack:
        filler = sleeper()
        stack.callback(filler.kill)
        leave_a_filler(run_dir, HOOK_UUID, filler.pid, start_ticks(filler.pid))
        out = run_hook_without_site(env, "started", run_dir, heavy)
        assert filler.poll() == -9, "the filler still runs after started begin"  # gone, then
        assert f"stopped the filler (pid {filler.pid}) for good" in env.log()
        assert not os.path.exists(f"{run_dir}/fillers/{HOOK_UUID}.json")

        other = sleeper()
        stack.callback(other.kill)
        leave_a_filler(run_dir, HOOK_UUID, other.pid, start_ticks(other.pid) + 1)
        out += run_hook_without_site(env, "started", run_dir, heavy)
        assert other.poll() is None  # not the recorded process: left alone
        assert not os.path.exists(f"{run_dir}/fillers/{HOOK_UUID}.json")
        assert out == "0 []\n0 []\n"

def test_the_script_runs_python_at_started_only_when_a_start_left_a_filler(
        tmp_path: object) -> None:
    """Every guest's start waits for ``started begin``: the installed script exits 0 there
    without starting Python unless a filler record exists."""
    run_dir = f"{tmp_path}/run"
    ran = f"{tmp_path}/ran"
    python = f"{tmp_path}/python"
    with open(python, "w") as f:
        f.write(f'#!/bin/sh\necho "$@" >> {ran}\n')
    os.chmod(python, 0o755)
    script = f"{tmp_path}/kvmaccel-hook"
    with open(script, "w") as f:
        f.write(hook_install.render_script(python, "/etc/k.toml", (), run_dir))

    def run(op: str, subop: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ran)
        subprocess.run(["sh", script, NAME, op, subop, "-"], input=b"<domain/>", check=True,
                       env={"PATH": "/usr/bin:/bin"})
        return os.path.exists(ran)

    os.makedirs(f"{run_dir}/domains")
    assert run("start", "begin")
    assert not run("started", "begin")
    with open(f"{run_dir}/domains/{UUID}.json", "w") as f:
        f.write("{}")
    assert not run("started", "begin")  # a guest's state alone: no filler
    os.makedirs(f"{run_dir}/fillers")
    with open(f"{run_dir}/fillers/{UUID}.json", "w") as f:
        f.write("{}")
    assert run("started", "begin")
    assert not run("migrate", "begin")


def test_doctor_warns_of_a_script_from_before_started(tmp_path: object) -> None:
    """A script installed before kvmaccel acted at ``started begin`` never runs it there:
    ``kvmaccel doctor`` says to install it again."""
    from kvmaccel.setup import doctor

    libvirt_dir = f"{tmp_path}/libvirt"
    os.makedirs(f"{libvirt_dir}/hooks")
    path = hook_install.install(libvirt_dir).path
    inp = doctor.DoctorInput(libvirt_dir=libvirt_dir)
    assert not any("predates" in f.message for f in doctor.check_hook(inp))
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('|"started begin"', ""))
    [warning] = [f for f in doctor.check_hook(inp) if "predates" in f.message]
    assert warning.status == doctor.WARN and "kvmaccel hook install" in warning.message
