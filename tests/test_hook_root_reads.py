"""What root reads, tried as another user would plant it (issue 20, findings 4 and 5).

The hook acts as root on what kvmaccel left in its run dir (the filler's pid, the files to
remove, where to log and record), the keeper logs to a file, the pool lends its priority to
the scrub its state names, and ``cgroup = NAME`` puts root's work where NAME says.  Each test
plants what another user could (``nobody``, or the qemu user) on a host whose directories
let them, runs the real thing as root, and checks root did nothing for them.  The last test
races ``kvmaccel prealloc``'s directory against the qemu user swapping a path component.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator

import pytest

from kvmaccel.errors import HostError
from kvmaccel.host import proc as host_proc
from kvmaccel.host.facts import read_host
from kvmaccel.launch import prealloc
from kvmaccel.pool.manage import POOL_DIRNAME, Pool, key_for
from kvmaccel.setup import install

from .conftest import need
from .test_hook import NAME, UUID, domain_xml
from .test_pool_isolation import ATTACKER_PYTHON, NOBODY, drop_to_nobody, limits

MIB = 1 << 20
CPU_V1 = "/sys/fs/cgroup/cpu"

# Writes argv[2] (JSON) to the file argv[1], as whoever runs it.
PLANT = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"


def plant_as_nobody(path: str, data: object) -> None:
    subprocess.run([ATTACKER_PYTHON, "-c", PLANT, path, json.dumps(data)],
                   preexec_fn=drop_to_nobody, check=True, timeout=30)
    assert os.stat(path).st_uid == NOBODY


def victim_file(directory: str, name: str, text: str = "root's own\n") -> str:
    """A file only root may write (0600), in a directory of root's."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def record_digest(path: str) -> str:
    """The name kvmaccel's creation record of ``path`` has under ``<run dir>/files/``."""
    canonical = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def hook_script(base: str, run_dir: str, extra: str = "") -> str:
    """The installed hook, with a config whose run_dir is ``run_dir``; the log is base/hook.log."""
    with open(os.path.join(base, "qemu.conf"), "w") as f:
        f.write(f'memory_backing_dir = "{base}/mbd"\n')
    config = os.path.join(base, "kvmaccel.toml")
    with open(config, "w") as f:
        f.write(f'syslog = false\nlog_file = "{base}/logs/hook.log"\nlog_level = "debug"\n'
                f'run_dir = "{run_dir}"\nqemu_conf = "{base}/qemu.conf"\n'
                f'record_file = "{base}/logs/records.jsonl"\n{extra}')
    libvirt_dir = os.path.join(base, "libvirt")
    os.makedirs(libvirt_dir, exist_ok=True)
    install.install(libvirt_dir, config_path=config)
    return install.hook_path(libvirt_dir)


def call(script: str, op: str, subop: str, xml: bytes) -> subprocess.CompletedProcess[bytes]:
    """As libvirt calls a hook: a clean environment (no KVMACCEL_* at all), XML on stdin."""
    return subprocess.run([script, NAME, op, subop, "-"], input=xml, capture_output=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=120)


def misconfigured_run_dir(base: str) -> str:
    """A run dir of root's whose subdirectories anyone can write (what a careless
    ``mkdir -m 777`` or a config management run leaves)."""
    run_dir = os.path.join(base, "run")
    os.mkdir(run_dir, 0o755)
    for sub in ("domains", "files", "hook-config"):
        os.mkdir(os.path.join(run_dir, sub))
        os.chmod(os.path.join(run_dir, sub), 0o777)
    return run_dir


@pytest.fixture
def base(shm_dir: str) -> str:
    """A directory nobody can reach (the private tmpfs is 0755), with the victims' own."""
    need(os.geteuid() == 0, "needs root")
    os.mkdir(os.path.join(shm_dir, "victims"), 0o755)
    return shm_dir


def sleeper(as_nobody: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], preexec_fn=drop_to_nobody if as_nobody else None)


@pytest.mark.parametrize("victim_owner", ["root", "nobody"])
def test_a_stop_never_acts_on_a_state_another_user_planted(base: str, victim_owner: str
                                                           ) -> None:
    """A per-domain state planted by nobody named a process to stop as the guest's filler
    (with its real start time, read from /proc), a root-only file as the guest's file (with
    a planted creation record of its inode) and another as a pool link: the stop hook, as
    root, killed the process and deleted both files.  Now it reads only kvmaccel's own state
    in kvmaccel's own directories, and says what is wrong."""
    run_dir = misconfigured_run_dir(base)
    script = hook_script(base, run_dir)
    victims = os.path.join(base, "victims")
    doomed, linked = victim_file(victims, "doomed"), victim_file(victims, "linked")
    proc = sleeper(victim_owner == "nobody")
    try:
        ticks = host_proc.start_ticks(proc.pid)
        assert ticks is not None
        st = os.stat(doomed)
        plant_as_nobody(os.path.join(run_dir, "files", f"{record_digest(doomed)}.json"),
                        {"path": doomed, "dev": st.st_dev, "ino": st.st_ino})
        plant_as_nobody(os.path.join(run_dir, "domains", f"{UUID}.json"), {
            "name": NAME, "uuid": UUID, "filler": {"pid": proc.pid, "start_ticks": ticks},
            "files": [doomed], "made_dirs": [victims],
            "pool_links": [{"link_path": linked, "pool_path": linked,
                            "pool_dir": os.path.join(base, "no-pool")}]})
        done = call(script, "stopped", "end", domain_xml(domain_id=None))
        assert done.returncode == 0, done.stderr
        killed = proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()
    deleted = [p for p in (doomed, linked) if not os.path.exists(p)]
    assert (killed, deleted) == (False, []), f"root acted on the planted state: {killed} {deleted}"
    for path in (doomed, linked):
        with open(path) as f:
            assert f.read() == "root's own\n", path
    with open(os.path.join(base, "logs", "hook.log")) as f:
        log = f.read()
    assert f"{run_dir}/domains is owned by uid 0 with mode 0777" in log, log


def test_a_planted_config_snapshot_never_says_where_root_appends(base: str) -> None:
    """The warm path took the config from its snapshot in the run dir: one planted by nobody
    named a root-only file as the record file, and the start appended a record to it."""
    run_dir = misconfigured_run_dir(base)
    script = hook_script(base, run_dir)
    config = os.path.join(base, "kvmaccel.toml")
    victim = victim_file(os.path.join(base, "victims"), "appended")
    with open(config) as f:
        text = f.read()
    name = config.strip("/").replace("/", "%")
    values = {"enabled": True, "strict": False, "pool_enabled": True, "run_dir": run_dir,
              "record_file": victim, "qemu_conf": os.path.join(base, "qemu.conf"),
              "syslog": False, "log_file": victim, "log_file_set": True,
              "log_level": "debug"}
    plant_as_nobody(os.path.join(run_dir, "hook-config", f"{name}.json"),
                    {"path": config, "text": text, "values": values})
    done = call(script, "start", "begin", domain_xml())  # no mbd directory: it fails open
    assert done.returncode == 0, done.stderr
    with open(victim) as f:
        assert f.read() == "root's own\n"
    with open(os.path.join(base, "logs", "hook.log")) as f:
        log = f.read()
    assert "cannot save the config for the warm start path" in log, log
    with open(os.path.join(base, "logs", "records.jsonl")) as f:  # the config's own
        assert json.loads(f.readlines()[-1])["result"] == "failed_open"


def test_a_symlinked_hook_log_is_never_followed(base: str) -> None:
    """The hook opened its log file by path, following a symlink another user (or a stale
    link) put at its name: it appended to the file the link named, any root file."""
    script = hook_script(base, os.path.join(base, "run"))
    victim = victim_file(os.path.join(base, "victims"), "shadow")
    os.mkdir(os.path.join(base, "logs"), 0o755)
    os.symlink(victim, os.path.join(base, "logs", "hook.log"))
    done = call(script, "stopped", "end", domain_xml(domain_id=None))  # logs "no state"
    assert done.returncode == 0, done.stderr
    with open(victim) as f:
        assert f.read() == "root's own\n"


def test_a_symlinked_keeper_log_is_never_followed(base: str, tmp_path: str) -> None:
    """``pool keep --daemon`` opened pool-keep.log by path: through a symlink at its name,
    root created (and appended to) whatever file the link named."""
    logs = os.path.join(base, "logs")
    os.mkdir(logs, 0o755)
    target = os.path.join(base, "victims", "created-through-the-link")
    os.symlink(target, os.path.join(logs, "pool-keep.log"))
    config = os.path.join(str(tmp_path), "kvmaccel.toml")
    with open(config, "w") as f:
        f.write(f'syslog = false\nlog_file = "{logs}/hook.log"\n'
                f'run_dir = "{base}/run"\n')
    pidfile = os.path.join(str(tmp_path), "keep.pid")
    started = subprocess.run([sys.executable, "-m", "kvmaccel", "pool", "keep", "--daemon",
                              "--config", config, "--pidfile", pidfile, "--interval", "60"],
                             capture_output=True, text=True, timeout=60)
    # The daemon opens its log before it reports ready (pool/daemon.py), so the refusal is
    # the start's own error: one line, exit 1, and the link's target never made.
    assert started.returncode == 1, started.stderr
    assert "pool-keep.log is a symlink" in started.stderr
    assert len(started.stderr.strip().splitlines()) == 1
    assert not os.path.lexists(target)
    assert not os.path.lexists(pidfile)


def _state(pid: int) -> str:
    """The process's state letter (R, S, D, Z...); X when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@pytest.fixture
def nobodys_cgroup() -> Iterator[str]:
    """A v1 cpu cgroup delegated to nobody (its directory and files chowned to it)."""
    need(os.geteuid() == 0, "needs root")
    need(os.path.isfile(os.path.join(CPU_V1, "cpu.shares")), "no v1 cpu controller")
    name = f"kvtest-nobody-{os.getpid()}"
    path = os.path.join(CPU_V1, name)
    os.mkdir(path)
    try:
        for entry in [path, *(os.path.join(path, n) for n in os.listdir(path))]:
            os.chown(entry, NOBODY, NOBODY)
        yield name
    finally:
        os.rmdir(path)


def test_a_cgroup_another_user_controls_is_refused(nobodys_cgroup: str, tmp_path: str
                                                   ) -> None:
    """``cgroup = NAME`` put root's work in a cgroup nobody controls: nobody could throttle
    (cpu.cfs_quota_us), starve (cpu.shares) or move it at will.  Now it is refused."""
    config = os.path.join(str(tmp_path), "kvmaccel.toml")
    with open(config, "w") as f:
        f.write(f'cgroup = "{nobodys_cgroup}"\n')
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr);"
            "from kvmaccel.engine.cgroup import enter;"
            f"print(enter({nobodys_cgroup!r})); print(open('/proc/self/cgroup').read())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KVMACCEL_CONFIG": config})
    assert proc.returncode == 0, proc.stderr
    assert f"cpu:/{nobodys_cgroup}" not in proc.stdout, proc.stdout
    assert proc.stdout.startswith("None")
    assert "refusing cgroup" in proc.stderr and "owned by uid 65534" in proc.stderr
    with open(os.path.join(CPU_V1, nobodys_cgroup, "cgroup.procs")) as f:
        assert f.read() == ""


def test_priority_is_never_lent_to_a_process_that_reused_a_scrubs_pid(shm_dir: str) -> None:
    """A scrub that died left its pid in the pool file's state (``scrubbing``); a start of
    the same guest lent its priority to whatever process had that pid now.  The state now
    holds the scrub's start time too, and a process that started at another time is left
    at its own priority."""
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME))
    key = key_for(4 * MIB, 4)
    pool.fill(key, 1, read_host(), limits())
    (entry,) = pool.entries()
    name = os.path.basename(entry.path)
    other = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: os.nice(19))
    try:
        ticks = host_proc.start_ticks(other.pid)
        assert ticks is not None and os.getpriority(os.PRIO_PROCESS, other.pid) == 19
        pool._write_state(name, "scrubbing", domain_uuid="u", pid=other.pid,
                          start_ticks=ticks - 1)  # the dead scrub's: the pid was reused
        with pool._file_lock(entry.path):  # held, as a live scrub holds it
            assert [e.state for e in pool.entries()] == ["scrubbing"]
            lent = pool.hurry_scrub_of("u")
            assert os.getpriority(os.PRIO_PROCESS, other.pid) == 19
            assert not lent
            # The scrub's own record (its real start time) is lent to, as before.
            pool._write_state(name, "scrubbing", domain_uuid="u", pid=other.pid,
                              start_ticks=ticks)
            assert pool.hurry_scrub_of("u")
            assert os.getpriority(os.PRIO_PROCESS, other.pid) == os.getpriority(
                os.PRIO_PROCESS, 0)
    finally:
        other.kill()
        other.wait()


# As the qemu user, who owns <memory_backing_dir>/libvirt: swap its "qemu" for a symlink to
# the victims' directory and back, atomically (renameat2 RENAME_EXCHANGE), until told to stop;
# then print how many swaps it made.
SWAP_PARENT = r"""
import ctypes, os, sys, threading
libvirt, victims = sys.argv[1:3]
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(libvirt)
os.symlink(victims, "qemu.link")
swaps = 0
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
print("swapping", flush=True)
while not stop.is_set():
    if libc.renameat2(-100, b"qemu", -100, b"qemu.link", 2) == 0:
        swaps += 1
print(swaps, flush=True)
"""


def test_prealloc_never_chowns_through_a_swapped_parent(shm_dir: str) -> None:
    """``kvmaccel prealloc`` made the domain directory with makedirs and chowned it by path;
    the qemu user owns memory_backing_dir (Debian: /var/lib/libvirt/qemu/ram) and swapped a
    component of that path for a symlink in between: root chowned any file to it (won about
    once in 255 tries), or made a qemu-owned directory wherever the link pointed."""
    need(os.geteuid() == 0, "needs root")
    try:
        qemu = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("no libvirt-qemu user")
    owner = (qemu.pw_uid, qemu.pw_gid)
    libvirt = os.path.join(shm_dir, "mbd", "libvirt")
    os.makedirs(os.path.join(libvirt, "qemu"))
    for d in (libvirt, os.path.join(libvirt, "qemu")):
        os.chown(d, *owner)
    victims = os.path.join(shm_dir, "victims")
    os.mkdir(victims, 0o755)
    short = "7-kvtest-race"
    victim = victim_file(victims, short)
    plan = types.SimpleNamespace(memory_backing_domain_dir=os.path.join(libvirt, "qemu", short))
    attacker = subprocess.Popen(
        [ATTACKER_PYTHON, "-c", SWAP_PARENT, libvirt, victims], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: (os.setgroups([]), os.setgid(owner[1]), os.setuid(owner[0])))
    chowned = refused = made = 0
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        assert attacker.stdout.readline().strip() == "swapping"
        for _ in range(3000):
            try:
                prealloc._make_domain_dir(plan, *owner)  # type: ignore[arg-type]
                made += 1
            except HostError:
                refused += 1
            for parent in ("qemu", "qemu.link"):  # wherever the real directory is now
                path = os.path.join(libvirt, parent, short)
                if os.path.isdir(path) and not os.path.islink(os.path.join(libvirt, parent)):
                    with contextlib.suppress(OSError):  # swapped meanwhile: next time
                        os.rmdir(path)
            if os.stat(victim).st_uid != 0:
                chowned += 1
                os.chown(victim, 0, 0)
        attacker.stdin.write("stop\n")
        attacker.stdin.flush()
        swaps = int(attacker.stdout.readline())
    finally:
        attacker.kill()
        attacker.wait()
    assert swaps > 0 and refused > 0, (swaps, refused)  # the race ran, and was seen
    assert chowned == 0, f"root chowned the victim {chowned} time(s) in {made + refused} runs"
    assert sorted(os.listdir(victims)) == [short]  # no directory made through the link
    assert made > 0  # and the directory is still made whenever the path is what it says
    shutil.rmtree(os.path.join(shm_dir, "mbd"))
