"""The hook end to end on the real libvirtd and QEMU that ``scripts/test.sh`` starts.

Every test here is marked ``libvirt`` (``pytest -m libvirt`` runs only these; ``-m 'not
libvirt'`` skips them by hand).  They need root, a running libvirtd, KVM and free 2M huge
pages; under the test command a missing piece fails them instead of skipping.

For each memory_backing_dir (a private 2M hugetlbfs mount, a private tmpfs like /dev/shm, so
that nothing here touches the host's own mounts or any pool on them) the module writes
qemu.conf and
restarts libvirtd, installs kvmaccel's hook in /etc/libvirt/hooks/qemu.d/ with a config file
of its own, plus a test-only observer hook (``zz-...``, run after kvmaccel's, libvirt runs
qemu.d/ in name order) that records at ``start begin`` what is on disk and how many huge
pages are free before QEMU is started.  qemu.conf, the hooks and the daemon are put back
afterwards.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from kvmaccel.bench import virsh
from kvmaccel.engine.backing import BackingSpec, populate_backings, release
from kvmaccel.errors import VirshError
from kvmaccel.host.facts import read_host
from kvmaccel.plan.limits import Limits
from kvmaccel.pool.manage import Pool, key_for
from kvmaccel.setup import install as hook_install
from tests.conftest import need, private_mount

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(TOP, "vm-fixtures")
GUEST_BYTES = 1 << 30
OBSERVER = "zz-kvmaccel-test-observer"
MOUNTS = {"hugetlbfs": ("hugetlbfs", "pagesize=2M,mode=0755"), "shm": ("tmpfs", "mode=0755")}
GUESTS = {"hugetlbfs": "small-hugetlbfs-node0.xml", "shm": "small-shm.xml"}
ALIASES = {"hugetlbfs": "ram-node0", "shm": "pc.ram"}  # one guest NUMA cell, or none

OBSERVER_SCRIPT = '''#!{python}
# Test-only libvirt hook: at start begin (after kvmaccel's hook, before QEMU) and started
# begin, record the guest memory files and the free 2M huge pages.
import json, os, sys
if sys.argv[2:4] not in (["start", "begin"], ["started", "begin"]):
    sys.exit(0)
sys.stdin.read()
files = {{}}
for top, _, names in os.walk({root!r}):
    for n in names:
        st = os.stat(os.path.join(top, n))
        files[os.path.join(top, n)] = [st.st_size, st.st_blocks * 512, st.st_ino]
meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
with open({out!r}, "a") as f:
    f.write(json.dumps({{"op": sys.argv[2], "files": files,
                        "free_2m": int(meminfo["HugePages_Free"])}}) + "\\n")
'''


@dataclass
class Libvirt:
    kind: str  # "hugetlbfs" or "shm"
    mount: str  # memory_backing_dir: a private hugetlbfs or tmpfs
    backing_root: str  # memory_backing_dir + /libvirt/qemu
    workdir: str
    config_path: str
    log_file: str
    run_dir: str
    observer_log: str

    def write_config(self, extra: str = "", raw: str | None = None, pool: bool = False,
                     pool_extra: str = "") -> None:
        """The hook's config; the warm pool is off unless ``pool`` (its own tests)."""
        with open(self.config_path, "w") as f:
            f.write(raw if raw is not None else
                    f'syslog = false\nlog_file = "{self.log_file}"\nlog_level = "debug"\n'
                    f'run_dir = "{self.run_dir}"\n{extra}\n'
                    f'[pool]\nenabled = {"true" if pool else "false"}\n{pool_extra}')

    def pool(self) -> Pool:
        return Pool(os.path.join(self.mount, ".kvmaccel-pool"),
                    state_root=os.path.join(self.run_dir, "pool"))

    def log(self) -> str:
        return virsh.read_text(self.log_file)

    def observed(self, op: str) -> list[dict[str, object]]:
        lines = virsh.read_text(self.observer_log).splitlines()
        return [rec for rec in map(json.loads, lines) if rec["op"] == op]


def free_2m() -> int:
    pool = read_host().hugepages.get(2048)
    return pool.free_pages if pool else 0


def _environment() -> None:
    need(os.geteuid() == 0, "needs root")
    need(shutil.which("virsh") is not None and os.path.exists("/usr/bin/qemu-system-x86_64"),
         "needs libvirt and qemu-system-x86 (Debian: libvirt-daemon-system qemu-system-x86)")
    need(os.access("/dev/kvm", os.R_OK | os.W_OK), "needs /dev/kvm")
    need(virsh.virsh("version", check=False).returncode == 0, "libvirtd is not running")
    need(free_2m() >= 1024, f"needs 1024 free 2M huge pages, {free_2m()} are free")


@pytest.fixture(scope="module")
def hooks_installed() -> Iterator[tuple[str, str]]:
    """kvmaccel's hook and the observer in /etc/libvirt/hooks/qemu.d; qemu.conf saved."""
    _environment()
    workdir = tempfile.mkdtemp(prefix="kvmaccel-itest.", dir="/run")
    config = os.path.join(workdir, "kvmaccel.toml")
    observer = os.path.join(virsh.LIBVIRT_DIR, "hooks", "qemu.d", OBSERVER)
    try:
        with virsh.exclusive_libvirt(), virsh.saved_file(virsh.QEMU_CONF), \
                virsh.temporary_hook(config, workdir):
            try:
                yield workdir, observer
            finally:
                if os.path.exists(observer):
                    os.unlink(observer)
        virsh.restart_libvirtd()  # back to the original qemu.conf
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module", params=sorted(MOUNTS))
def libvirt(request: pytest.FixtureRequest, hooks_installed: tuple[str, str]
            ) -> Iterator[Libvirt]:
    """libvirtd restarted with memory_backing_dir on a private hugetlbfs, or tmpfs."""
    workdir, observer = hooks_installed
    kind: str = request.param
    with private_mount(*MOUNTS[kind], prefix=f"kvtest-{kind}-") as mount:
        yield from _libvirt(kind, mount, workdir, observer)


def _libvirt(kind: str, mount: str, workdir: str, observer: str) -> Iterator[Libvirt]:
    sub = os.path.join(workdir, kind)
    os.makedirs(sub, exist_ok=True)
    env = Libvirt(kind, mount, f"{mount}/libvirt/qemu", sub,
                  os.path.join(workdir, "kvmaccel.toml"), f"{sub}/hook.log", f"{sub}/run",
                  f"{sub}/observer.jsonl")
    env.write_config()
    # Installed again now that the config names this backing's run_dir: the script exports
    # it, and the warm path looks for the full hook's config snapshot there (installed with
    # another run_dir, every warm prepare and start fell through to the full hook unseen).
    hook_install.install(virsh.LIBVIRT_DIR, config_path=env.config_path)
    with open(observer, "w") as f:
        f.write(OBSERVER_SCRIPT.format(python=sys.executable, root=env.backing_root,
                                       out=env.observer_log))
    os.chmod(observer, 0o755)
    original = virsh.read_text(virsh.QEMU_CONF)
    virsh.write_qemu_conf({"memory_backing_dir": mount}, original)
    virsh.restart_libvirtd()
    try:
        yield env
    finally:  # nothing of libvirt's may stay in the mount before it goes
        virsh.write_qemu_conf({}, original)
        virsh.restart_libvirtd()


@pytest.fixture
def guest(libvirt: Libvirt) -> Iterator[str]:
    """The 1 GiB fixture guest for this backing, defined; destroyed and undefined after."""
    path = os.path.join(FIXTURES, GUESTS[libvirt.kind])
    with open(path) as f:
        name = f.read().split("<name>", 1)[1].split("</name>", 1)[0]
    virsh.remove_domain(name)
    libvirt.write_config()
    for p in (libvirt.log_file, libvirt.observer_log):
        if os.path.exists(p):
            os.unlink(p)
    virsh.virsh("define", path)
    try:
        yield name
    finally:
        virsh.remove_domain(name)
        libvirt.write_config()


def used_bytes(mount: str) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def uuid_of(name: str) -> str:
    return virsh.virsh("domuuid", name).stdout.strip()


@pytest.mark.parametrize("overlap", [False, True], ids=["before", "overlap"])
def test_hook_populates_the_file_qemu_maps(libvirt: Libvirt, guest: str, overlap: bool
                                           ) -> None:
    """The shm guest has <allocation mode='immediate'/>: QEMU preallocates it, so with
    ``overlap`` the filler fills it alongside QEMU; the hugetlbfs guest has no prealloc, so it
    is populated before QEMU either way."""
    libvirt.write_config("" if overlap else "overlap = false")
    filled_alongside = overlap and libvirt.kind == "shm"
    free_before, used_before = free_2m(), used_bytes(libvirt.mount)
    virsh.virsh("start", guest)
    with open(f"{libvirt.run_dir}/domains/{uuid_of(guest)}.json") as f:
        state = json.load(f)
    [path] = state["files"]
    assert path == f"{libvirt.backing_root}/{state['shortname']}/{ALIASES[libvirt.kind]}"
    assert ("filler" in state) == filled_alongside
    if not filled_alongside:
        assert state["result"]["bytes"] == GUEST_BYTES
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (os.stat(os.path.dirname(path)).st_uid,
                                      os.stat(os.path.dirname(path)).st_gid)

    # QEMU mapped exactly that file (same inode), shared.
    pid = virsh.qemu_pid(guest)
    assert virsh.mapped_files(pid).get(path) == st.st_ino

    # Before QEMU was started (at `start begin`, after kvmaccel's hook) the file already
    # held every page; on hugetlbfs those pages left the free pool then.
    [at_start] = libvirt.observed("start")
    size, allocated, ino = at_start["files"][path]  # type: ignore[index]
    assert (size, ino) == (GUEST_BYTES, st.st_ino)
    if filled_alongside:
        # The filler runs beside QEMU (how far it had got at `start begin` is the
        # scheduler's) until the file is whole, QEMU's preallocation doing the rest; it must
        # say so ("filler populated 640M alongside QEMU ...; left 384M to QEMU").
        deadline = time.monotonic() + 120  # a hang guard
        while not re.search(r"filler populated \S+ alongside QEMU", libvirt.log()):
            assert time.monotonic() < deadline, libvirt.log()
            time.sleep(0.05)
    else:  # populated, every page, before QEMU was started
        assert allocated == GUEST_BYTES
    assert st.st_blocks * 512 == GUEST_BYTES
    if libvirt.kind == "hugetlbfs":
        assert at_start["free_2m"] <= free_before - GUEST_BYTES // (2 << 20)  # type: ignore[operator]
    lines = libvirt.log().splitlines()
    summary = [line for line in lines if "populated 1G of" in line]
    assert len(summary) == (0 if filled_alongside else 1)
    assert all(f"{guest} start: INFO" in line for line in summary)
    assert any("left the filler" in line for line in lines) == filled_alongside

    # The guest runs: libvirt says so and its vCPU thread uses CPU time.
    assert virsh.virsh("domstate", guest).stdout.strip() == "running"
    cpu0 = sum(psutil.Process(pid).cpu_times()[:2])
    time.sleep(1.0)
    assert sum(psutil.Process(pid).cpu_times()[:2]) > cpu0

    # Destroying it returns every page and leaves nothing of kvmaccel's behind.
    virsh.virsh("destroy", guest)
    for _ in range(50):
        if free_2m() == free_before and not os.path.exists(path):
            break
        time.sleep(0.1)
    assert not os.path.exists(path)
    assert free_2m() == free_before
    if libvirt.kind == "shm":
        assert abs(used_bytes(libvirt.mount) - used_before) < 16 << 20
    # Only the cached plan stays, for the next start of the same XML.
    assert os.listdir(f"{libvirt.run_dir}/domains") == [f"{uuid_of(guest)}.plan-cache.json"]
    assert os.listdir(f"{libvirt.run_dir}/files") == []


@pytest.mark.parametrize("libvirt", ["shm"], indirect=True)
def test_broken_config_still_starts_the_guest(libvirt: Libvirt, guest: str) -> None:
    libvirt.write_config(raw='strict = true\nlog_file = "/nowhere\n')
    virsh.virsh("start", guest)  # fails open: libvirt and QEMU start it as usual
    assert virsh.virsh("domstate", guest).stdout.strip() == "running"
    pid = virsh.qemu_pid(guest)
    assert any(p.startswith(libvirt.backing_root) for p in virsh.mapped_files(pid))
    [at_start] = libvirt.observed("start")
    assert at_start["files"] == {}  # kvmaccel created nothing; QEMU made its own file
    assert not os.path.exists(f"{libvirt.run_dir}/domains/{uuid_of(guest)}.json")


@pytest.mark.parametrize("libvirt", ["shm"], indirect=True)
def test_time_budget_cancels_and_the_guest_starts(libvirt: Libvirt, guest: str) -> None:
    libvirt.write_config("strict = true\npopulate_timeout_s = 0.01\noverlap = false\n")
    virsh.virsh("start", guest)
    assert virsh.virsh("domstate", guest).stdout.strip() == "running"
    assert "populate ran past populate_timeout_s" in libvirt.log()
    [at_start] = libvirt.observed("start")
    assert at_start["files"] == {}  # the partial file was removed before QEMU started
    path = next(p for p in virsh.mapped_files(virsh.qemu_pid(guest))
                if p.startswith(libvirt.backing_root))
    assert os.stat(path).st_size == GUEST_BYTES  # QEMU created its own file


@pytest.mark.parametrize("libvirt", ["shm"], indirect=True)
def test_time_budget_stops_the_filler_and_qemu_fills_the_rest(libvirt: Libvirt, guest: str
                                                             ) -> None:
    libvirt.write_config("strict = true\npopulate_timeout_s = 0.01\n")
    virsh.virsh("start", guest)
    assert virsh.virsh("domstate", guest).stdout.strip() == "running"
    with open(f"{libvirt.run_dir}/domains/{uuid_of(guest)}.json") as f:
        [path] = json.load(f)["files"]
    assert virsh.mapped_files(virsh.qemu_pid(guest)).get(path) == os.stat(path).st_ino
    assert os.stat(path).st_blocks * 512 == GUEST_BYTES  # QEMU's preallocation did the rest
    for _ in range(100):
        if "the filler stopped" in libvirt.log():
            break
        time.sleep(0.05)
    assert "populate ran past populate_timeout_s = 0.01 s: the filler stopped" in libvirt.log()


@pytest.mark.parametrize("libvirt", ["hugetlbfs"], indirect=True)
def test_strict_refuses_without_enough_huge_pages(libvirt: Libvirt, guest: str) -> None:
    libvirt.write_config("strict = true\n")
    free = free_2m()
    need(free >= 612, f"needs 612 free 2M huge pages, {free} are free")
    hog = os.path.join(libvirt.mount, f"kvtest-hog-{os.getpid()}")
    keep_free = 100  # fewer than the guest's 512
    populate_backings([BackingSpec(hog, (free - keep_free) * (2 << 20))], read_host())
    try:
        with pytest.raises(VirshError) as e:
            virsh.virsh("start", guest)
    finally:
        release(hog)
    message = " ".join(e.value.stderr.split())
    assert f"kvmaccel: guest {guest} needs 1G of 2M pages on node 0" in message
    assert "reserve more huge pages" in message
    assert virsh.virsh("domstate", guest).stdout.strip() == "shut off"
    assert "strict = true: refusing the start" in libvirt.log()


# --- the warm pool (issue 5) ----------------------------------------------------------------

PATTERN = b"kvmaccel-guest-secret!"


def state_of(libvirt: Libvirt, guest: str) -> dict[str, object]:
    with open(f"{libvirt.run_dir}/domains/{uuid_of(guest)}.json") as f:
        data: dict[str, object] = json.load(f)
    return data


def wait_for_states(pool: Pool, states: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sorted(e.state for e in pool.entries()) != sorted(states):
        if time.monotonic() > deadline:
            pytest.fail(f"pool states {[e.state for e in pool.entries()]}, not {states}")
        time.sleep(0.1)


def write_pattern(path: str) -> None:
    """What the guest does to its memory: write data everywhere (every 1 MiB here)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), GUEST_BYTES) as m:
        for offset in range(0, GUEST_BYTES, 1 << 20):
            m[offset:offset + len(PATTERN)] = PATTERN


def pattern_count(path: str) -> int:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), GUEST_BYTES, prot=mmap.PROT_READ) as m:
        return sum(m[o:o + (64 << 20)].count(PATTERN) for o in range(0, GUEST_BYTES, 64 << 20))


def test_second_start_comes_from_the_pool_and_holds_none_of_the_last_guests_data(
        libvirt: Libvirt, guest: str) -> None:
    libvirt.write_config(pool=True)
    pool = libvirt.pool()
    free_before, used_before = free_2m(), used_bytes(libvirt.mount)

    # First start: nothing in the pool; the hook populates a fresh file, which joins the
    # pool in use by this guest (link count 2: the guest's path and the pool's link).
    virsh.virsh("start", guest)
    state = state_of(libvirt, guest)
    [path] = state["files"]  # type: ignore[misc]
    [adopted] = state["pool_links"]  # type: ignore[misc]
    assert adopted["link_path"] == path
    assert os.stat(path).st_nlink == 2
    assert [e.state for e in pool.entries()] == ["in_use"]
    write_pattern(path)
    assert pattern_count(path) == GUEST_BYTES >> 20

    # It stops: the file is dirty, a detached scrub at nice 19 zeroes it, it is clean again.
    virsh.virsh("destroy", guest)
    wait_for_states(pool, ["clean"])
    assert "scrubbing in the background" in libvirt.log()

    # Second start: from the pool, no populate, the same pages, none of the old data.
    virsh.virsh("start", guest)
    state = state_of(libvirt, guest)
    assert state["files"] == [] and "result" not in state
    [link] = state["pool_links"]  # type: ignore[misc]
    (entry,) = pool.entries()
    assert entry.state == "in_use" and os.stat(link["link_path"]).st_nlink == 2
    assert os.path.samefile(link["link_path"], entry.path)
    mapped = virsh.mapped_files(virsh.qemu_pid(guest))
    assert mapped.get(link["link_path"]) == os.stat(entry.path).st_ino
    assert virsh.virsh("domstate", guest).stdout.strip() == "running"
    assert "started from the pool" in libvirt.log()
    assert pattern_count(link["link_path"]) == 0

    # Stop, scrub, drain: every page goes back.
    virsh.virsh("destroy", guest)
    wait_for_states(pool, ["clean"])
    assert pool.drain() == GUEST_BYTES
    assert free_2m() == free_before
    assert abs(used_bytes(libvirt.mount) - used_before) < 16 << 20


@pytest.mark.parametrize("libvirt", ["hugetlbfs"], indirect=True)
def test_a_pool_at_its_limit_is_not_refilled(libvirt: Libvirt, guest: str) -> None:
    libvirt.write_config(pool=True, pool_extra="max_mib = 512\n")
    free_before = free_2m()
    virsh.virsh("start", guest)
    state = state_of(libvirt, guest)
    assert state["pool_links"] == [] and len(state["files"]) == 1  # type: ignore[arg-type]
    assert "not adopting" in libvirt.log() and "limit of 512M" in libvirt.log()
    virsh.virsh("destroy", guest)
    assert libvirt.pool().entries() == []
    for _ in range(50):
        if free_2m() == free_before:
            break
        time.sleep(0.1)
    assert free_2m() == free_before


@contextlib.contextmanager
def cpu_hogs(nice: int = 10) -> Iterator[None]:
    """Keep every CPU busy at ``nice`` (in a session and autogroup of their own at that
    nice, see :func:`kvmaccel.pool.manage.spawn_scrub`): a nice-19 process then gets a small
    share."""
    def lower() -> None:
        os.nice(nice)
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))

    # Each hog says so once it spins: a scrub started before the hogs run (their Python
    # start-up takes longer than zeroing 1G of recycled huge pages) would finish unseen.
    procs = [subprocess.Popen([sys.executable, "-c",
                               "import sys; sys.stdout.write('x'); sys.stdout.flush()\n"
                               "while True: pass"],
                              start_new_session=True, preexec_fn=lower, stdout=subprocess.PIPE)
             for _ in range(os.cpu_count() or 1)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.read(1) == b"x"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_scrub_killed_midway_leaves_the_file_dirty_and_it_is_never_linked(
        libvirt: Libvirt, guest: str) -> None:
    """The hook's own detached scrub, SIGKILLed while it zeroes the last guest's memory:
    the file stays dirty and is never linked as it is.  The guest's next start scrubs its own
    file itself, then takes it (never a second, fresh file): none of the old data."""
    libvirt.write_config(pool=True)
    pool = libvirt.pool()
    free_before = free_2m()
    virsh.virsh("start", guest)
    [path] = state_of(libvirt, guest)["files"]  # type: ignore[misc]
    write_pattern(path)
    (entry,) = pool.entries()
    with cpu_hogs():  # a busy host: the nice-19 scrub crawls, and is caught zeroing
        virsh.virsh("destroy", guest)
        pid = int(libvirt.log().rsplit("scrubbing in the background (pid ", 1)[1].split(",")[0])
        deadline = time.monotonic() + 60
        while pool.entries()[0].recorded_state != "scrubbing":
            assert time.monotonic() < deadline and psutil.pid_exists(pid), pool.entries()
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    while pool.entries()[0].state != "dirty":  # its lock goes when its last thread has exited
        assert time.monotonic() < deadline, pool.entries()
        time.sleep(0.01)
    (dirty,) = pool.entries()
    assert (dirty.path, dirty.recorded_state, dirty.state) == (entry.path, "scrubbing", "dirty")
    # Killed between marking the file scrubbing and marking it clean (how much of it was
    # zeroed by then depends on the scheduler): dirty, whatever the pages hold.

    virsh.virsh("start", guest)
    state = state_of(libvirt, guest)
    assert state["files"] == []  # no fresh file
    [link] = state["pool_links"]  # type: ignore[misc]
    assert os.path.samefile(link["link_path"], dirty.path)
    assert pattern_count(link["link_path"]) == 0
    assert [e.state for e in pool.entries()] == ["in_use"]
    virsh.virsh("destroy", guest)
    wait_for_states(pool, ["clean"])
    assert pattern_count(dirty.path) == 0
    assert pool.drain() == GUEST_BYTES
    assert free_2m() == free_before


def test_after_pool_keep_a_defined_guests_first_start_comes_from_the_pool(
        libvirt: Libvirt, guest: str) -> None:
    """`kvmaccel pool keep --once` fills a file for every backend of every persistent guest:
    the first start after it (after a host boot, say) is a pool start, not a populate."""
    libvirt.write_config(pool=True, pool_extra="keep_free_mib = 0\n")
    keep = [sys.executable, "-m", "kvmaccel", "pool", "keep", "--once", "--config",
            libvirt.config_path]
    proc = subprocess.run(keep, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"for domain {guest}" in proc.stdout and proc.stdout.startswith("filled 1G")
    pool = libvirt.pool()
    assert [e.state for e in pool.entries()] == ["clean"]
    virsh.virsh("start", guest)
    assert "started from the pool" in libvirt.log()
    assert state_of(libvirt, guest)["files"] == []
    proc = subprocess.run(keep, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("nothing to do"), proc.stdout  # its file is in use
    virsh.virsh("destroy", guest)
    wait_for_states(pool, ["clean"])
    assert pool.drain() == GUEST_BYTES


def task_nices(pid: int) -> list[int]:
    """The nice of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    nices = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            nices.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return nices


def all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (SIGSTOP reaches each in its own time)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(state in ("T", "t") for state in states)


def test_a_guest_started_again_at_once_waits_for_its_own_scrubbed_file(
        libvirt: Libvirt, guest: str) -> None:
    """Destroyed and started again at once: the guest's own file is still being scrubbed.
    The start lends that scrub its priority and waits for it, instead of populating a second
    file beside it, and gets the file clean: none of its last run's bytes.

    "Still being scrubbed" is made sure of, not hoped for: the detached scrub is stopped
    (SIGSTOP) once its state says scrubbing, and let go only once the start's prepare has
    lent it its priority (the hook's log says so)."""
    libvirt.write_config(pool=True)
    pool = libvirt.pool()
    virsh.virsh("start", guest)
    [path] = state_of(libvirt, guest)["files"]  # type: ignore[misc]
    write_pattern(path)
    deadline = time.monotonic() + 120  # a hang guard for every wait below
    with cpu_hogs():  # a busy host: the nice-19 scrub crawls, and is caught zeroing
        virsh.virsh("destroy", guest)
        pid = int(libvirt.log().rsplit("scrubbing in the background (pid ", 1)[1]
                  .split(",")[0])
        while pool.entries()[0].recorded_state != "scrubbing":
            assert time.monotonic() < deadline and psutil.pid_exists(pid), pool.entries()
            time.sleep(0.002)
        os.kill(pid, signal.SIGSTOP)
    try:
        while not all_stopped(pid):
            assert time.monotonic() < deadline, "the scrub never stopped"
            time.sleep(0.001)
        (entry,) = pool.entries()
        assert entry.state == "scrubbing", entry  # caught before its end: the race is on
        assert max(task_nices(pid)) == 19
        starting = subprocess.Popen(["virsh", "-c", "qemu:///system", "start", guest],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lent = "the scrub of this guest's last file in"
        while lent not in libvirt.log():  # warm prepare's hurry_own_scrub
            assert time.monotonic() < deadline and starting.poll() is None, libvirt.log()
            time.sleep(0.01)
        assert max(task_nices(pid)) < 19  # the stopped scrub runs at the start's priority
    finally:
        os.kill(pid, signal.SIGCONT)
    _, err = starting.communicate(timeout=120)
    assert starting.returncode == 0, err
    # Let go, the scrub may end before `start` looks (it takes the clean file) or after (it
    # waits for it): either way the guest's own file, zeroed, never a second one.
    log = libvirt.log()
    state = state_of(libvirt, guest)
    assert state["files"] == [], "populated a second file instead of waiting for its own"
    [link] = state["pool_links"]  # type: ignore[misc]
    (entry,) = pool.entries()  # still one file
    assert entry.state == "in_use" and os.path.samefile(link["link_path"], entry.path)
    assert pattern_count(link["link_path"]) == 0
    assert "from the pool" in log
    virsh.virsh("destroy", guest)
    wait_for_states(pool, ["clean"])
    assert pool.drain() == GUEST_BYTES


@pytest.mark.parametrize("libvirt", ["hugetlbfs"], indirect=True)
def test_a_pool_holding_nearly_every_huge_page_never_stops_another_guest(
        libvirt: Libvirt) -> None:
    """A plain <hugepages/> guest kvmaccel populates nothing for: at its prepare the hook
    gives back unused pool files until the huge pages QEMU will take are free."""
    libvirt.write_config(pool=True)
    pool = libvirt.pool()
    key = key_for(256 << 20, 2048)
    while free_2m() >= GUEST_BYTES // (2 << 20):  # until the guest cannot fit
        pool.fill(key, 1, read_host(), Limits(threads=1))
    path = os.path.join(FIXTURES, "small-hugepages.xml")
    name = "kvmaccel-small-hugepages"
    virsh.remove_domain(name)
    virsh.virsh("define", path)
    try:
        virsh.virsh("start", name)
        assert virsh.virsh("domstate", name).stdout.strip() == "running"
        assert "so that guest kvmaccel-small-hugepages fits" in libvirt.log()
    finally:
        virsh.remove_domain(name)
        pool.drain()
