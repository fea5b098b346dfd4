"""``<hugepages/>`` and memfd guests through kvmaccel's front, on the real libvirtd and QEMU.

The module installs the front as ``/usr/bin/qemu-system-x86_64-kvmaccel`` (removed after),
kvmaccel's hook with a config of its own, and a test-only observer hook that records, at
``start begin`` (after kvmaccel's hook, before QEMU), what is in the guests' hugepage
directories.  qemu.conf's ``hugetlbfs_mount`` names two private mounts, 2M and 1G, so that
nothing here touches the host's /dev/hugepages; 1G pages are reserved for the module and the
count put back after.  Guests: 2M pages in one cell and in two, 1G pages, and a memfd with 2M
pages; each with and without the warm pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from kvmaccel.bench import virsh
from kvmaccel.pool.manage import Pool
from kvmaccel.setup import front
from tests.conftest import need, private_mount
from tests.test_hook_integration import wait_for_states

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

QEMU = "/usr/bin/qemu-system-x86_64"
FRONT = front.front_path(QEMU)
OBSERVER = "zz-kvmaccel-test-front-observer"
NR_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
FREE = "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
GIB = 1 << 30

OBSERVER_SCRIPT = '''#!{python}
# Test-only libvirt hook: at start begin, after kvmaccel's hook and before QEMU, record the
# files in the guests' hugepage directories.
import json, os, sys
if sys.argv[2:4] != ["start", "begin"]:
    sys.exit(0)
sys.stdin.read()
files = {{}}
for root in {roots!r}:
    for top, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(top, n))
            files[os.path.join(top, n)] = [st.st_size, st.st_blocks * 512, st.st_ino]
with open({out!r}, "a") as f:
    f.write(json.dumps({{"name": sys.argv[1], "files": files}}) + "\\n")
'''


@dataclass(frozen=True)
class Guest:
    """One test guest: huge page size, guest NUMA cells, memfd or a hugepage directory."""

    key: str
    page_kib: int
    cells: int
    memfd: bool
    size_bytes: int = GIB

    @property
    def name(self) -> str:
        return f"kvmaccel-front-{self.key}"

    def xml(self, emulator: str = FRONT) -> str:
        cell_mib = self.size_bytes // self.cells >> 20
        cells = "".join(f"<cell id='{i}' cpus='{i}' memory='{cell_mib}' unit='MiB'/>"
                        for i in range(self.cells))
        source = "<source type='memfd'/><access mode='shared'/>" if self.memfd else ""
        uid = uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.name)
        return f"""<domain type='kvm'>
  <name>{self.name}</name>
  <uuid>{uid}</uuid>
  <memory unit='MiB'>{self.size_bytes >> 20}</memory>
  <memoryBacking>
    <hugepages><page size='{self.page_kib}' unit='KiB'/></hugepages>
    {source}
  </memoryBacking>
  <vcpu placement='static'>{self.cells}</vcpu>
  <numatune><memory mode='strict' nodeset='0'/></numatune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu><numa>{cells}</numa></cpu>
  <devices>
    <emulator>{emulator}</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def backend_ids(self) -> list[str]:
        return [f"ram-node{i}" for i in range(self.cells)]


GUESTS = [Guest("2m-1cell", 2048, 1, False), Guest("2m-2cells", 2048, 2, False),
          Guest("1g", 1048576, 1, False), Guest("memfd-2m", 2048, 1, True)]


@dataclass
class Env:
    workdir: str
    mounts: dict[int, str]  # page KiB -> private hugetlbfs mount
    config_path: str
    log_file: str
    run_dir: str
    observer_log: str
    enable_hook: object

    def write_config(self, pool: bool = False, raw: str | None = None, extra: str = "") -> None:
        """``extra``: top-level lines (before ``[pool]``)."""
        with open(self.config_path, "w") as f:
            f.write(raw if raw is not None else
                    f'syslog = false\nlog_file = "{self.log_file}"\nlog_level = "debug"\n'
                    f'run_dir = "{self.run_dir}"\n{extra}[pool]\nenabled = '
                    f'{"true" if pool else "false"}\n')

    def pool(self, page_kib: int) -> Pool:
        return Pool(os.path.join(self.mounts[page_kib], ".kvmaccel-pool"),
                    state_root=os.path.join(self.run_dir, "pool"))

    def observed(self, name: str) -> list[dict[str, object]]:
        lines = virsh.read_text(self.observer_log).splitlines()
        return [r for r in map(json.loads, lines) if r["name"] == name]

    def log(self) -> str:
        return virsh.read_text(self.log_file)


def free_pages(kib: int) -> int:
    with open(FREE.format(kib=kib)) as f:
        return int(f.read())


@contextlib.contextmanager
def reserved_1g(pages: int) -> Iterator[None]:
    with open(NR_1G) as f:
        before = int(f.read())
    with open(NR_1G, "w") as f:
        f.write(str(before + pages))
    try:
        need(free_pages(1048576) >= pages, f"could not reserve {pages} 1G huge pages")
        yield
    finally:
        with open(NR_1G, "w") as f:
            f.write(str(before))


@contextlib.contextmanager
def installed_front() -> Iterator[None]:
    need(not os.path.lexists(FRONT) or front.is_front(FRONT),
         f"{FRONT} exists and is not kvmaccel's")
    had = os.path.lexists(FRONT)
    front.install(QEMU)
    try:
        yield
    finally:
        if not had:
            front.uninstall(FRONT)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    need(os.geteuid() == 0, "needs root")
    need(shutil.which("virsh") is not None and os.path.exists(QEMU), "needs libvirt and QEMU")
    need(virsh.virsh("version", check=False).returncode == 0, "libvirtd is not running")
    need(free_pages(2048) >= 1024, "needs 1024 free 2M huge pages")
    workdir = tempfile.mkdtemp(prefix="kvmaccel-ftest.", dir="/run")
    config = os.path.join(workdir, "kvmaccel.toml")
    observer = os.path.join(virsh.LIBVIRT_DIR, "hooks", "qemu.d", OBSERVER)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(virsh.exclusive_libvirt())
            stack.enter_context(reserved_1g(2))
            m2 = stack.enter_context(private_mount("hugetlbfs", "pagesize=2M,mode=0755",
                                                   "kvtest-f2m-"))
            m1g = stack.enter_context(private_mount("hugetlbfs", "pagesize=1G,mode=0755",
                                                    "kvtest-f1g-"))
            stack.enter_context(installed_front())
            stack.enter_context(virsh.saved_file(virsh.QEMU_CONF))
            enable_hook = stack.enter_context(virsh.temporary_hook(config, workdir))
            e = Env(workdir, {2048: m2, 1048576: m1g}, config, f"{workdir}/hook.log",
                    f"{workdir}/run", f"{workdir}/observer.jsonl", enable_hook)
            e.write_config()
            with open(observer, "w") as f:
                f.write(OBSERVER_SCRIPT.format(python=sys.executable, roots=[m2, m1g],
                                               out=e.observer_log))
            os.chmod(observer, 0o755)
            stack.callback(os.unlink, observer)
            original = virsh.read_text(virsh.QEMU_CONF)
            text = virsh.render_qemu_conf(original, {"hugetlbfs_mount": "x"}).rstrip("\n")
            text = text.rsplit("\n", 1)[0] + f'\nhugetlbfs_mount = ["{m2}", "{m1g}"]\n'
            with open(virsh.QEMU_CONF, "w") as f:
                f.write(text)
            stack.callback(virsh.restart_libvirtd)  # runs after qemu.conf is put back
            virsh.restart_libvirtd()
            try:
                yield e
            finally:
                for g in GUESTS:
                    virsh.remove_domain(g.name)
                for kib in e.mounts:
                    e.pool(kib).drain()
                with open(virsh.QEMU_CONF, "w") as f:
                    f.write(original)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def defined(env: Env, guest: Guest, emulator: str = FRONT) -> Iterator[str]:
    virsh.remove_domain(guest.name)
    for p in (env.log_file, env.observer_log):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    path = os.path.join(env.workdir, f"{guest.name}.xml")
    with open(path, "w") as f:
        f.write(guest.xml(emulator))
    virsh.virsh("define", path)
    try:
        yield guest.name
    finally:
        virsh.remove_domain(guest.name)
        env.write_config()


def shared_maps(pid: int) -> dict[str, str]:
    """Path -> permissions of every file mapping of ``pid``."""
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out[parts[5].strip()] = parts[1]
    return out


def qemu_argv(pid: int) -> list[str]:
    """What QEMU was exec'd with (for messages: what the front made of libvirt's argv)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a for a in f.read().decode(errors="replace").split("\0") if "memory-backend" in a]


def domain_dir(env: Env, guest: Guest) -> str:
    domid = virsh.virsh("domid", guest.name).stdout.strip()
    return f"{env.mounts[guest.page_kib]}/libvirt/qemu/{domid}-{guest.name[:20]}"


def state_of(env: Env, guest: Guest) -> dict[str, object]:
    uid = virsh.virsh("domuuid", guest.name).stdout.strip()
    with open(f"{env.run_dir}/domains/{uid}.json") as f:
        data: dict[str, object] = json.load(f)
    return data


def check_served(env: Env, guest: Guest, complete_at_start: bool = True) -> None:
    """QEMU maps every kvmaccel-<id> shared, each was there before QEMU started (and complete,
    unless a filler populates it alongside QEMU) and is complete now, the guest runs."""
    pid = virsh.qemu_pid(guest.name)
    directory = domain_dir(env, guest)
    maps = shared_maps(pid)
    per_backend = guest.size_bytes // guest.cells
    [at_start] = env.observed(guest.name)
    for backend in guest.backend_ids():
        path = f"{directory}/.kvmaccel/kvmaccel-{backend}"  # this start's proof directory
        assert maps.get(path, "").endswith("s"), (path, qemu_argv(pid), env.log()[-4000:])
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o600
        assert (st.st_uid, st.st_gid) == (os.stat(directory).st_uid, os.stat(directory).st_gid)
        size, allocated, ino = at_start["files"][path]  # type: ignore[index]
        assert (size, ino) == (per_backend, st.st_ino)
        assert allocated == per_backend if complete_at_start else allocated <= per_backend
        assert st.st_blocks * 512 == per_backend  # QEMU preallocated whatever was missing
    assert not any("qemu_back_mem" in p for p in maps)  # QEMU made no file of its own
    assert virsh.virsh("domstate", guest.name).stdout.strip() == "running"
    cpu0 = sum(psutil.Process(pid).cpu_times()[:2])
    time.sleep(0.5)
    assert sum(psutil.Process(pid).cpu_times()[:2]) > cpu0


@pytest.mark.parametrize("guest", GUESTS, ids=lambda g: g.key)
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "before"])
def test_front_serves_the_hooks_files_without_the_pool(env: Env, guest: Guest,
                                                       overlap: bool) -> None:
    env.write_config(pool=False, extra="" if overlap else "overlap = false\n")
    free_before = free_pages(guest.page_kib)
    with defined(env, guest):
        virsh.virsh("start", guest.name)
        check_served(env, guest, complete_at_start=not overlap)
        if overlap:
            assert "left the filler" in env.log() and "INFO: populated" not in env.log()
            assert isinstance(state_of(env, guest)["filler"], dict)
        else:
            assert "INFO: populated" in env.log() and "filler" not in env.log()
        directory = domain_dir(env, guest)
        virsh.virsh("destroy", guest.name)
        for _ in range(50):
            if free_pages(guest.page_kib) == free_before:
                break
            time.sleep(0.1)
        assert free_pages(guest.page_kib) == free_before
        assert not os.path.exists(directory)  # libvirt removed the directory at stop


@pytest.mark.parametrize("guest", GUESTS, ids=lambda g: g.key)
def test_second_start_through_the_front_comes_from_the_pool(env: Env, guest: Guest) -> None:
    env.write_config(pool=True)
    pool = env.pool(guest.page_kib)
    free_before = free_pages(guest.page_kib)
    with defined(env, guest):
        virsh.virsh("start", guest.name)
        check_served(env, guest, complete_at_start=False)
        assert len(state_of(env, guest)["pool_links"]) == guest.cells  # type: ignore[arg-type]
        virsh.virsh("destroy", guest.name)
        wait_for_states(pool, ["clean"] * guest.cells)

        os.unlink(env.observer_log)
        virsh.virsh("start", guest.name)
        state = state_of(env, guest)
        assert state["files"] == [] and "result" not in state
        assert len(state["pool_links"]) == guest.cells  # type: ignore[arg-type]
        assert "started from the pool" in env.log()
        check_served(env, guest)
        virsh.virsh("destroy", guest.name)
        wait_for_states(pool, ["clean"] * guest.cells)
        assert pool.drain() == guest.size_bytes
    assert free_pages(guest.page_kib) == free_before


PLANTER = "00-kvmaccel-test-planter"  # runs before kvmaccel's hook (qemu.d is in name order)
PLANTER_SCRIPT = '''#!{python}
# Test-only libvirt hook: at start begin of {name}, before kvmaccel's hook and QEMU, a process
# of the qemu user plants files in the guest's fresh hugepage directory and keeps them mapped.
import glob, mmap, os, sys
if sys.argv[1:4] != [{name!r}, "start", "begin"]:
    sys.exit(0)
sys.stdin.read()
[d] = glob.glob({mount!r} + "/libvirt/qemu/*-" + {name!r}[:20])
r, w = os.pipe()
pid = os.fork()
if pid:
    os.close(w)
    with os.fdopen(r) as got, open({out!r}, "a") as f:
        for line in got:  # until the child closes its end: planted
            f.write(f"{{pid}} {{line}}")
    sys.exit(0)
os.close(r)
os.setsid()
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
held = []
os.mkdir(d + "/.kvmaccel")
for path in (d + "/kvmaccel-ram-node0", d + "/.kvmaccel/kvmaccel-ram-node0"):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, {size})
    m = mmap.mmap(fd, 2 << 20)
    m[:7] = b"planted"
    held.append(m)
    st = os.fstat(fd)
    os.write(w, f"{{st.st_dev}} {{st.st_ino}}\\n".encode())
os.close(w)
for fd in (0, 1, 2):
    os.close(fd)
import time
while True:  # holds the mappings until the test kills it
    time.sleep(3600)
'''


def mapped_inodes(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file mapping of ``pid``."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) >= 5 and parts[4] != "0":
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                found.add((os.makedev(major, minor), int(parts[4])))
    return found


def test_a_guest_whose_directory_got_planted_files_runs_on_qemus_own_memory(env: Env) -> None:
    """Issue 20, finding 1, on the real libvirtd: the qemu user plants ``kvmaccel-<id>`` (and
    a ``.kvmaccel`` of its own with one inside) in the guest's hugepage directory after
    libvirt made it and before kvmaccel's hook runs, and keeps them mapped.  kvmaccel's hook
    refuses the directory it did not make and fails open; the front hands QEMU neither file:
    QEMU runs on memory of its own."""
    import pwd

    guest = GUESTS[0]
    pw = pwd.getpwnam("libvirt-qemu")
    out = os.path.join(env.workdir, "planted")
    planter = os.path.join(virsh.LIBVIRT_DIR, "hooks", "qemu.d", PLANTER)
    with open(planter, "w") as f:
        f.write(PLANTER_SCRIPT.format(python=sys.executable, name=guest.name,
                                      mount=env.mounts[guest.page_kib], uid=pw.pw_uid,
                                      gid=pw.pw_gid, size=guest.size_bytes, out=out))
    os.chmod(planter, 0o755)
    env.write_config(pool=False)
    holders: list[int] = []
    try:
        with defined(env, guest):
            virsh.virsh("start", guest.name)
            with open(out) as f:
                planted = [line.split() for line in f.read().splitlines()]
            holders = sorted({int(p) for p, _, _ in planted})
            inodes = {(int(dev), int(ino)) for _, dev, ino in planted}
            assert len(inodes) == 2
            pid = virsh.qemu_pid(guest.name)
            assert not inodes & mapped_inodes(pid), env.log()[-3000:]
            assert any("qemu_back_mem" in p for p in shared_maps(pid))  # QEMU's own file
            assert "kvmaccel did not make it" in env.log()  # the hook refused, failed open
            assert virsh.virsh("domstate", guest.name).stdout.strip() == "running"
    finally:
        os.unlink(planter)
        for holder in holders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, 9)


@pytest.mark.parametrize("broken", ["hook missing", "hook failing"])
def test_without_a_working_hook_the_front_starts_qemu_as_libvirt_asked(
        env: Env, broken: str) -> None:
    guest = GUESTS[0]
    enable_hook = env.enable_hook
    assert callable(enable_hook)
    if broken == "hook missing":
        enable_hook(False)
    else:
        env.write_config(raw='strict = false\nlog_file = "/nowhere\n')
    try:
        with defined(env, guest):
            virsh.virsh("start", guest.name)
            pid = virsh.qemu_pid(guest.name)
            maps = shared_maps(pid)
            assert not any(os.path.basename(p).startswith("kvmaccel-") for p in maps)
            assert any("qemu_back_mem" in p for p in maps)  # QEMU's own file, as always
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            assert argv[0] == QEMU.encode()  # the front exec'd the real QEMU
            assert not any(b"/kvmaccel-ram-node" in a for a in argv)
            assert any(b'"mem-path":"' in a and b"qemu/" in a for a in argv)  # the directory
            assert virsh.virsh("domstate", guest.name).stdout.strip() == "running"
    finally:
        enable_hook(True)


def test_capability_probing_through_the_front_equals_the_real_qemus(env: Env) -> None:
    def caps(binary: str) -> str:
        out = virsh.virsh("domcapabilities", "--emulatorbin", binary, "--virttype", "kvm",
                          "--arch", "x86_64").stdout
        return out.replace(binary, "EMULATOR")

    assert caps(FRONT) == caps(QEMU)


def test_enable_and_disable_round_trip_a_defined_domain_exactly(env: Env) -> None:
    from click.testing import CliRunner

    from kvmaccel.cli.main import main

    guest = GUESTS[0]
    with defined(env, guest, emulator=QEMU):
        before = virsh.virsh("dumpxml", "--inactive", guest.name).stdout
        runner = CliRunner()
        result = runner.invoke(main, ["enable", guest.name])
        assert result.exit_code == 0, result.output
        assert f"{guest.name}: <emulator> {QEMU} -> {FRONT}" in result.output
        enabled = virsh.virsh("dumpxml", "--inactive", guest.name).stdout
        assert f"<emulator>{FRONT}</emulator>" in enabled
        virsh.virsh("start", guest.name)
        check_served(env, guest, complete_at_start=False)
        result = runner.invoke(main, ["disable", guest.name])
        assert result.exit_code == 0, result.output
        assert "takes effect at its next start" in result.output
        assert virsh.virsh("dumpxml", "--inactive", guest.name).stdout == before
