"""`kvmaccel pool keep`: targets from the config, scrub, give back, fill within the floor,
once and as a daemon, on real files in a private tmpfs (the libvirt domains' targets are
tested end to end in tests/test_hook_integration.py)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kvmaccel.host import sysmem
from kvmaccel.pool.manage import POOL_DIRNAME, Pool

from .test_pool_squat import isolated

MIB = 1 << 20


def config(tmp_path: str, shm_dir: str, run_dir: str, count: int = 2,
           keep_free: str = "0") -> str:
    path = os.path.join(tmp_path, "kvmaccel.toml")
    with open(path, "w") as f:
        f.write(f'run_dir = "{run_dir}"\nlog_file = "{tmp_path}/log/hook.log"\n'
                f"[pool]\nkeep_domains = false\nkeep_free_mib = {keep_free}\n"
                f'[[pool.keep]]\nsize = "8M"\ndir = "{shm_dir}"\ncount = {count}\n')
    return path


def keep(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pool keep`` in a mount namespace that sees only the config's pool filesystems: a
    pass scrubs every pool it finds, and the other tests' pools (and theirs, ours) are none
    of its business (another test's dirty file scrubbed here was one action too many)."""
    with open(path) as f:
        mounts = re.findall(r'^dir = "(.*)"$', f.read(), re.MULTILINE)
    return isolated([sys.executable, "-m", "kvmaccel", "pool", "keep", "--config", path,
                     *args], mounts)


def test_once_fills_to_the_target_then_holds_still_then_gives_back(
        tmp_path: str, shm_dir: str, run_dir: str) -> None:
    cfg = config(str(tmp_path), shm_dir, run_dir)
    proc = keep(cfg, "--once")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("filled 8M of 4K pages (any node) in ")
                                   and "for [[pool.keep]] 1" in line for line in lines)
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME), state_root=os.path.join(run_dir, "pool"))
    assert [e.state for e in pool.entries()] == ["clean", "clean"]
    assert keep(cfg, "--once").stdout.startswith("nothing to do")
    cfg = config(str(tmp_path), shm_dir, run_dir, count=1)
    proc = keep(cfg, "--once")
    assert proc.stdout.startswith("gave back ") and "no target needs it" in proc.stdout
    assert [e.state for e in pool.entries()] == ["clean"]


def test_after_a_reboot_nothing_is_served_before_a_scrub(tmp_path: str, shm_dir: str,
                                                         run_dir: str) -> None:
    """Every state under /run gone (a simulated reboot): the files count as dirty, and the
    keeper scrubs them before anything can take them."""
    cfg = config(str(tmp_path), shm_dir, run_dir, count=1)
    assert keep(cfg, "--once").returncode == 0
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME), state_root=os.path.join(run_dir, "pool"))
    (entry,) = pool.entries()
    fd = os.open(entry.path, os.O_RDWR)
    addr = sysmem.mmap_shared(fd, 8 * MIB)
    ctypes.memmove(addr, b"before-the-reboot", 17)
    sysmem.munmap(addr, 8 * MIB)
    os.close(fd)
    shutil.rmtree(os.path.join(run_dir, "pool"))
    assert [e.state for e in pool.entries()] == ["dirty"]
    target = os.path.join(shm_dir, "guest")
    os.mkdir(target)
    assert pool.take(entry.key, os.path.join(target, "ram"), domain_uuid="u",
                     backend_id="pc.ram") is None
    proc = keep(cfg, "--once")
    assert proc.stdout.startswith(f"scrubbed {entry.path}"), proc.stdout
    assert [e.state for e in pool.entries()] == ["clean"]
    with open(entry.path, "rb") as f:
        assert f.read(17) == bytes(17)


def test_the_floor_is_never_filled_into(tmp_path: str, shm_dir: str, run_dir: str) -> None:
    cfg = config(str(tmp_path), shm_dir, run_dir, keep_free=str(1 << 30))  # 1 PiB free
    proc = keep(cfg, "--once")
    assert proc.returncode == 0
    assert proc.stdout.startswith("not filling 8M of 4K pages (any node) in ")
    assert "kept free (keep_free_mib)" in proc.stdout
    pool_dir = os.path.join(shm_dir, POOL_DIRNAME)
    assert not os.path.exists(pool_dir) or not os.listdir(pool_dir)


def test_daemon_keeps_going_until_sigterm(tmp_path: str, shm_dir: str, run_dir: str) -> None:
    cfg = config(str(tmp_path), shm_dir, run_dir)
    pidfile = os.path.join(str(tmp_path), "keep.pid")
    proc = keep(cfg, "--daemon", "--interval", "0.2", "--pidfile", pidfile)
    assert proc.returncode == 0 and "keeper started" in proc.stdout, proc.stderr
    pool_dir = os.path.join(shm_dir, POOL_DIRNAME)
    deadline = time.monotonic() + 30
    while not (os.path.exists(pidfile) and os.path.isdir(pool_dir)
               and len(os.listdir(pool_dir)) == 2):
        assert time.monotonic() < deadline, "the daemon never filled the pool"
        time.sleep(0.05)
    with open(pidfile) as f:
        pid = int(f.read())
    assert os.getsid(pid) != os.getsid(0) and os.getpriority(os.PRIO_PROCESS, pid) == 19
    second = keep(cfg, "--daemon", "--pidfile", pidfile)
    assert second.returncode == 2 and f"a keeper already runs (pid {pid}" in second.stderr
    # A start takes a file: the daemon puts one back.
    os.unlink(os.path.join(pool_dir, sorted(os.listdir(pool_dir))[0]))
    while len(os.listdir(pool_dir)) != 2:
        assert time.monotonic() < deadline, "the daemon never refilled the pool"
        time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    while os.path.exists(pidfile):
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)
    with open(os.path.join(str(tmp_path), "log", "pool-keep.log")) as f:
        assert "keep: filled 8M" in f.read()


def test_install_unit_writes_a_unit_for_this_python(tmp_path: str) -> None:
    from kvmaccel.pool.keep import install_unit

    path = install_unit("/etc/k.toml", os.path.join(str(tmp_path), "k.service"))
    with open(path) as f:
        text = f.read()
    assert f"ExecStart={sys.executable} -m kvmaccel pool keep --config /etc/k.toml" in text
    assert "Nice=19" in text and "CPUWeight=idle" in text


def test_install_unit_follows_no_link(tmp_path: str) -> None:
    """The unit went through a fixed temporary name opened by path; a link there, or at the
    unit's own name, now writes nothing through it."""
    from kvmaccel.errors import UnsafePathError
    from kvmaccel.pool.keep import install_unit

    path = os.path.join(str(tmp_path), "k.service")
    victim = os.path.join(str(tmp_path), "victim")
    with open(victim, "w") as f:
        f.write("victim\n")
    os.symlink(victim, f"{path}.kvmaccel-tmp")
    install_unit(None, path)
    assert os.stat(path).st_mode & 0o777 == 0o644
    os.unlink(path)
    os.symlink(victim, path)
    with pytest.raises(UnsafePathError, match="not a file kvmaccel wrote"):
        install_unit(None, path)
    with open(victim) as f:
        assert f.read() == "victim\n"
    assert sorted(os.listdir(str(tmp_path))) == ["k.service", "k.service.kvmaccel-tmp",
                                                 "victim"]


def test_pool_list_says_what_is_held_and_kept_free(tmp_path: str, shm_dir: str,
                                                   run_dir: str) -> None:
    cfg = config(str(tmp_path), shm_dir, run_dir, keep_free="64")
    assert keep(cfg, "--once").returncode == 0
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "pool", "list", "--dir", shm_dir],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KVMACCEL_CONFIG": cfg})
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("4K pages, any node: the pool holds 16M, ")
    assert last.endswith(" free, 64M kept free (keep_free_mib)")
