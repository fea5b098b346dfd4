"""Bad input and hostile conditions at the command line: each gets one clear line, the exit
code README.md gives, and nothing left behind (issue: the review's smaller findings)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import populating_bytes
from .test_cli_main import kvmaccel
from .test_pool_isolation import ATTACKER_PYTHON

MIB = 1 << 20
NOBODY = 65534


def run(*args: str, env: dict[str, str] | None = None, umask: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120, env=env,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmaccel: error: "), proc.stderr[:2000]
    assert len(lines[0]) < 400, lines[0][:400]
    return lines[0]


def test_a_symlink_then_dotdot_does_not_pass_the_filesystem_check(shm_dir: str,
                                                                   tmp_path: str) -> None:
    """``tmpfs/link/../name``: read lexically it is on tmpfs; the kernel puts it beside the
    link's target, on ext4.  The check is made on the directory the file is created in."""
    os.mkdir(os.path.join(str(tmp_path), "sub"))
    os.symlink(os.path.join(str(tmp_path), "sub"), os.path.join(shm_dir, "link"))
    proc = kvmaccel("populate", os.path.join(shm_dir, "link", "..", "guest"), "--size", "4M")
    assert proc.returncode == 2
    assert "is not on hugetlbfs or tmpfs" in one_line(proc)
    assert not os.path.exists(os.path.join(str(tmp_path), "guest"))
    assert sorted(os.listdir(shm_dir)) == ["link"]


def test_two_runs_for_one_path_cannot_both_win(shm_dir: str, run_dir: str) -> None:
    """Two populates of one path: the second used to reuse the first's file and report it
    done, and the first's cancel then deleted it.  Now each populates a file of its own,
    unnamed, and only a complete one is named."""
    path = os.path.join(shm_dir, "guest")
    args = [sys.executable, "-m", "kvmaccel", "populate", path, "--size", "3G", "--threads", "1"]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(first.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    second = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while populating_bytes(second.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    assert first.poll() is None and second.poll() is None, "too fast to race"
    first.send_signal(signal.SIGTERM)
    _, err1 = first.communicate(timeout=60)
    _, err2 = second.communicate(timeout=120)
    assert first.returncode == 130, err1
    assert second.returncode == 0, err2
    st = os.stat(path)  # what the second reported done is there, whole
    assert st.st_size == 3 << 30 and st.st_blocks * 512 == 3 << 30
    assert kvmaccel("release", path).returncode == 0


def test_a_second_run_that_finds_the_name_taken_keeps_nothing(shm_dir: str) -> None:
    """A name that appears while a populate runs (another run, another user) is never
    replaced: the run fails with one line and its own file goes with it."""
    path = os.path.join(shm_dir, "guest")
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "populate", path, "--size", "2G",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(proc.pid, shm_dir) < 64 * MIB and time.monotonic() < deadline:
        time.sleep(0.005)
    with open(path, "w") as f:
        f.write("someone else's")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "appeared while kvmaccel populated it" in err
    with open(path) as f:
        assert f.read() == "someone else's"
    assert os.listdir(shm_dir) == ["guest"]


def test_node_and_cpu_lists_are_bounded_before_expansion(shm_dir: str, tmp_path: str) -> None:
    t0 = time.monotonic()
    proc = kvmaccel("populate", os.path.join(shm_dir, "g"), "--size", "4M",
                    "--nodes", "0-3000000")
    assert proc.returncode == 2 and "above the kernel's limit of 1023" in one_line(proc)
    assert time.monotonic() - t0 < 10 and os.listdir(shm_dir) == []
    xml = os.path.join(str(tmp_path), "d.xml")
    with open(xml, "w") as f:
        f.write("<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory>"
                "<numatune><memory mode='strict' nodeset='0-3000000'/></numatune>"
                "<os><type arch='x86_64'>hvm</type></os></domain>")
    proc = kvmaccel("plan", xml)
    assert proc.returncode == 2 and "limit of 1023" in one_line(proc)


def test_owner_and_mode_are_range_checked(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "g")
    proc = kvmaccel("populate", path, "--size", "4M", "--owner", "99999999999")
    assert proc.returncode == 2 and "above the largest possible" in one_line(proc)
    proc = kvmaccel("populate", path, "--size", "4M", "--mode", "4755")
    assert proc.returncode == 2 and "setuid" in one_line(proc)
    assert os.listdir(shm_dir) == []


def test_the_filesystem_and_page_size_mistakes_are_usage_errors(hugetlbfs: str,
                                                                 tmp_path: str) -> None:
    """Exit 2, as README.md says for bad input."""
    proc = kvmaccel("populate", os.path.join(hugetlbfs, "g"), "--size", "3M")
    assert proc.returncode == 2 and "not a multiple of its 2048 KiB pages" in one_line(proc)
    proc = kvmaccel("populate", os.path.join(str(tmp_path), "g"), "--size", "4M")
    assert proc.returncode == 2 and "not on hugetlbfs or tmpfs" in one_line(proc)
    assert os.listdir(hugetlbfs) == [] and not os.path.exists(os.path.join(str(tmp_path), "g"))


def modes(top: str) -> dict[str, int]:
    out = {}
    for where, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(where, name)
            out[os.path.relpath(path, top)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_state_is_private_under_umask_000(shm_dir: str, tmp_path: str) -> None:
    """Run and pool state, slot files: directories 0700 and files 0600 whatever the umask
    (any local user could otherwise rewrite a pool state to 'clean', or hold every slot)."""
    run_dir = os.path.join(str(tmp_path), "fresh", "run")
    env = {**os.environ, "KVMACCEL_RUN_DIR": run_dir}
    assert run("populate", os.path.join(shm_dir, "g"), "--size", "1G", "--threads", "2",
               "--ignore-load", env=env, umask=0).returncode == 0
    assert run("pool", "fill", "--dir", shm_dir, "--size", "4M", env=env,
               umask=0).returncode == 0
    found = modes(os.path.join(str(tmp_path), "fresh"))
    assert any(p.startswith("run/slots/slot-") for p in found)
    assert any(p.startswith("run/files/") for p in found)
    assert any(p.startswith("run/pool/") and p.endswith(".json") for p in found)
    for path, mode in found.items():
        is_dir = os.path.isdir(os.path.join(str(tmp_path), "fresh", path))
        assert mode == (0o700 if is_dir else 0o600), (path, oct(mode))
    # So nobody else can open a slot, and holding one needs only an open file.
    slot = next(p for p in found if p.startswith("run/slots/slot-"))
    probe = subprocess.run(
        [ATTACKER_PYTHON, "-c", "import os, sys; os.open(sys.argv[1], os.O_RDONLY)",
         os.path.join(str(tmp_path), "fresh", slot)],
        preexec_fn=lambda: (os.setgroups([]), os.setgid(NOBODY), os.setuid(NOBODY)),
        capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pool_fill_cancels_and_leaves_nothing(shm_dir: str, run_dir: str, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvmaccel", "pool", "fill", "--dir", shm_dir,
                             "--size", "4G"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while populating_bytes(proc.pid, shm_dir) < 256 * MIB:
        assert time.monotonic() < deadline, "the fill never started"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "cancelled" in err, err
    assert os.listdir(os.path.join(shm_dir, ".kvmaccel-pool")) == []
    states = [n for _, _, files in os.walk(os.path.join(run_dir, "pool")) for n in files
              if n.endswith(".json")]
    records = os.path.join(run_dir, "files")
    assert states == [] and (not os.path.isdir(records) or os.listdir(records) == [])


# --- issue 20, finding 9: each bad input is one line, exit 2, and nothing is left ----------

DOMAIN = ("<domain type='kvm'><name>g</name><uuid>11111111-2222-3333-4444-555555555555</uuid>"
          "{memory}<memoryBacking><source type='file'/><access mode='shared'/>{backing}"
          "</memoryBacking>{extra}<os><type arch='x86_64'>hvm</type></os><devices>"
          "<emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices></domain>")


def domain(memory: str = "<memory unit='MiB'>64</memory>", backing: str = "",
           extra: str = "", devices: str = "") -> str:
    return DOMAIN.format(memory=memory, backing=backing, extra=extra, devices=devices)


class Dirs:
    """Where a case makes its inputs: ``tmp`` (ext4) and ``shm`` (a private tmpfs)."""

    def __init__(self, tmp: str, shm: str) -> None:
        self.tmp, self.shm = tmp, shm

    def file(self, name: str, text: str | bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path

    def xml(self, text: str | bytes = "") -> str:
        return self.file("d.xml", text or domain())

    def qemu_conf(self) -> str:  # guest files on the private tmpfs
        return self.file("qemu.conf", f'memory_backing_dir = "{self.shm}"\n')

    def toml(self, text: str) -> str:
        return self.file("k.toml", text)

    def fifo(self) -> str:
        path = os.path.join(self.tmp, "fifo")
        os.mkfifo(path)
        return path


Args = Callable[[Dirs], list[str]]
PLAN = ["plan", "--qemu-conf", "/dev/null"]


def plan_xml(text: str) -> Args:
    return lambda d: [*PLAN, d.xml(text)]


def plan_config(text: str) -> Args:
    return lambda d: [*PLAN, d.xml(), "--config", d.toml(text)]


# (id, arguments, words in the one line; the comment says how today's main failed)
BAD_INPUT: list[tuple[str, Args, str]] = [
    # old: exit 0, the defaults
    ("config-missing", lambda d: [*PLAN, d.xml(), "--config", f"{d.tmp}/kvmacel.toml"],
     "does not exist"),
    ("config-empty-name", lambda d: [*PLAN, d.xml(), "--config", ""], "name is empty"),
    # old: exit 0, hooks/qemu.d/kvmaccel installed naming a file that is not there
    ("hook-install-config-missing", lambda d: ["hook", "install", "--libvirt-dir", d.tmp,
                                               "--config", f"{d.tmp}/none.toml"],
     "does not exist"),
    ("keep-config-missing", lambda d: ["pool", "keep", "--once", "--config",
                                       f"{d.tmp}/none.toml"], "does not exist"),
    # old: exit 0; nan meant no limit, inf killed the hook's timer thread
    ("timeout-nan", plan_config("populate_timeout_s = nan"), "not nan"),
    ("timeout-inf", plan_config("populate_timeout_s = inf"), "not inf"),
    ("timeout-1e300", plan_config("populate_timeout_s = 1e300"), "up to 86400"),
    # old: exit 0, a 3M "page size" taken
    ("keep-page-3M", plan_config('[[pool.keep]]\nsize = "8M"\npage_size = "3M"'),
     "a power of two"),
    ("keep-nodes-empty", plan_config('[[pool.keep]]\nsize = "8M"\nnodes = ""'),
     "names no NUMA node"),
    # old: exit 0, planned as a 0-byte populate (prealloc populated it)
    ("memory-0", plan_xml(domain("<memory>0</memory>")), "the size is 0"),
    ("prealloc-memory-0", lambda d: ["prealloc", d.xml(domain("<memory>0</memory>")),
                                     "--qemu-conf", d.qemu_conf()], "the size is 0"),
    ("dimm-0", plan_xml(domain(
        "<memory unit='MiB'>64</memory><maxMemory slots='2' unit='MiB'>512</maxMemory>",
        extra="<cpu><numa><cell id='0' cpus='0' memory='65536'/></numa></cpu>",
        devices="<memory model='dimm'><target><size>0</size><node>0</node></target>"
                "</memory>")), "the size is 0"),
    ("page-size-0", plan_xml(domain(backing="<hugepages><page size='0'/></hugepages>")),
     "the size is 0"),
    # old: exit 0, a plan of 104856551424T
    ("memory-99999EiB", plan_xml(domain("<memory unit='EiB'>99999</memory>")), "too large"),
    ("cpuset-0,,1", plan_xml(domain(extra="<vcpu cpuset='0,,1'>2</vcpu>")),
     "an empty item between commas"),
    # old: hang (a FIFO blocks the open)
    ("xml-fifo", lambda d: [*PLAN[:1], d.fifo(), *PLAN[1:]], "not a regular file"),
    ("config-fifo", lambda d: [*PLAN, d.xml(), "--config", d.fifo()], "not a regular file"),
    ("qemu-conf-fifo", lambda d: ["plan", d.xml(), "--qemu-conf", d.fifo()],
     "not a regular file"),
    ("pool-for-fifo", lambda d: ["pool", "fill", "--for", d.fifo()], "not a regular file"),
    # old: traceback
    ("prealloc-not-utf8", lambda d: ["prealloc", d.xml(b"<domain>\xff</domain>")],
     "not UTF-8"),
    ("enable-not-utf8", lambda d: ["enable", "--xml", d.xml(b"<domain>\xff</domain>"),
                                   "--dry-run"], "not UTF-8"),
    ("populate-long-name", lambda d: ["populate", f"{d.shm}/{'a' * 300}", "--size", "4M"],
     "is too long"),
    ("release-long-name", lambda d: ["release", f"{d.shm}/{'a' * 300}"], "is too long"),
    ("metrics-records-dir", lambda d: ["metrics", "--records", d.tmp], "is not a regular file"),
    ("bench-seconds-nan", lambda d: ["bench", "--backing", "tmpfs", "--dir", d.shm, "--size",
                                     "4M", "--runs", "1", "--threads", "1", "--competitor",
                                     "--competitor-seconds", "nan"], "not a number of seconds"),
    # old: exit 0, silently taken
    ("keep-interval-nan", lambda d: ["pool", "keep", "--once", "--interval", "nan"],
     "not a number of seconds"),
    ("keep-pidfile-without-daemon", lambda d: ["pool", "keep", "--once", "--pidfile",
                                               f"{d.tmp}/pid"], "--pidfile goes with --daemon"),
    ("populate-nodes-empty", lambda d: ["populate", f"{d.shm}/g", "--size", "4M", "--nodes", ""],
     "names no NUMA node"),
    ("populate-nodes-^0", lambda d: ["populate", f"{d.shm}/g", "--size", "4M", "--nodes", "^0"],
     "names no NUMA node"),
    ("fill-tmpfs-page-2M", lambda d: ["pool", "fill", "--dir", d.shm, "--size", "4M",
                                      "--page-size", "2M"], "a filesystem of 4K pages"),
    ("fill-page-3M", lambda d: ["pool", "fill", "--dir", d.shm, "--size", "6M",
                                "--page-size", "3M"], "a power of two"),
    ("fill-dir-missing", lambda d: ["pool", "fill", "--dir", f"{d.shm}/typo", "--size", "4M"],
     "No such file or directory"),
    ("drain-dir-missing", lambda d: ["pool", "drain", "--dir", f"{d.shm}/typo"],
     "No such file or directory"),
    ("scrub-detach-dir-missing", lambda d: ["pool", "scrub", "--detach", "--dir",
                                            f"{d.shm}/typo"], "No such file or directory"),
    ("metrics-pool-dir-missing", lambda d: ["metrics", "--pool-dir", f"{d.shm}/typo"],
     "No such file or directory"),
    ("doctor-config-missing", lambda d: ["doctor", "--no-guests", "--libvirt-dir", d.tmp,
                                         "--config", f"{d.tmp}/none.toml"],
     "No such file or directory"),
    ("tune-nodes-empty", lambda d: ["tune", "--nodes", "", "--no-save", "--rounds", "1",
                                    "--size", "8M", "--max-threads", "1"], "names no NUMA node"),
    ("bench-threads-empty", lambda d: ["bench", "--backing", "tmpfs", "--dir", d.shm, "--size",
                                       "4M", "--runs", "1", "--threads", ""], "invalid --threads"),
    ("fill-reserve-without-for", lambda d: ["pool", "fill", "--dir", d.shm, "--size", "4M",
                                            "--reserve"], "--reserve reserves"),
    ("fill-max-bytes-empty", lambda d: ["pool", "fill", "--dir", d.shm, "--size", "4M",
                                        "--max-bytes", ""], "invalid size ''"),
    ("bench-tmpfs-page-2M", lambda d: ["bench", "--backing", "tmpfs", "--dir", d.shm,
                                       "--page-size", "2M", "--size", "4M", "--runs", "1",
                                       "--threads", "1"], "tmpfs has only 4 KiB pages"),
    ("plan-id-minus-5", lambda d: [*PLAN, d.xml(), "--id", "-5"], "no libvirt domain id"),
    ("prealloc-id-0", lambda d: ["prealloc", d.xml(), "--qemu-conf", d.qemu_conf(), "--id",
                                 "0"], "no libvirt domain id"),
    # old: click's four lines of usage
    ("threads-not-an-integer", lambda d: ["populate", f"{d.shm}/g", "--size", "4M",
                                          "--threads", "1.5"], "is not a valid integer"),
    # old: a second line, libvirt's own ("libvirt: Test Driver error : Domain not found")
    ("status-no-such-domain", lambda d: ["status", "--domain", "nosuch", "--connect",
                                         "test:///default"], ""),
    # old: one line of some 4000 characters
    ("nodes-0-1023", lambda d: ["populate", f"{d.shm}/g", "--size", "4M", "--nodes", "0-1023"],
     "NUMA node 1-1023 does not exist"),
]


def tree(*tops: str) -> dict[str, tuple[int, int]]:
    found = {}
    for top in tops:
        for where, dirs, files in os.walk(top):
            for name in [*dirs, *files]:
                path = os.path.join(where, name)
                st = os.lstat(path)
                found[path] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args: Args, words: str,
                                                         tmp_path: Any, shm_dir: str) -> None:
    dirs = Dirs(str(tmp_path), shm_dir)
    argv = args(dirs)
    before = tree(str(tmp_path), shm_dir)
    try:
        proc = subprocess.run([sys.executable, "-m", "kvmaccel", *argv], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kvmaccel {' '.join(argv)[:200]} hung")
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = one_line(proc)
    assert proc.returncode == 2, (proc.returncode, line)
    assert words in line, line
    assert tree(str(tmp_path), shm_dir) == before, "a file was made, changed or removed"


def test_a_pool_file_on_hugetlbfs_is_keyed_by_its_pages(hugetlbfs: str) -> None:
    """Without --page-size a fill on a 2M hugetlbfs was keyed 4K pages (main): a pool file no
    guest would ever be served from.  A page size is the filesystem's."""
    proc = run("pool", "fill", "--dir", hugetlbfs, "--size", "4M")
    assert proc.returncode == 0, proc.stderr
    listed = run("pool", "list", "--json", "--dir", hugetlbfs)
    assert [e["page_size_kib"] for e in json.loads(listed.stdout)] == [2048], listed.stdout
    assert run("pool", "drain", "--dir", hugetlbfs).returncode == 0
