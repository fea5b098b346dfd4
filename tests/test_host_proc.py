"""``kvmaccel.host.proc``: /proc/<pid> read for real processes (gone, zombie, pid reused) and
for a copied tree."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from kvmaccel.errors import HostError, KvmaccelError, ProcessGoneError
from kvmaccel.host import proc

from .conftest import need

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "600"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_stat_of_this_process() -> None:
    me = proc.stat(os.getpid())
    assert me.pid == os.getpid() and me.ppid == os.getppid()
    assert me.session == os.getsid(0) and me.pgrp == os.getpgrp()
    assert me.nice == os.getpriority(os.PRIO_PROCESS, 0)
    assert me.state == "R" and not me.exited  # it reads its own stat: running
    assert me.threads == threading.active_count()
    assert proc.start_ticks(proc.SELF) == me.start_ticks > 0
    assert proc.same_process(os.getpid(), me.start_ticks)
    assert proc.running(os.getpid(), me.start_ticks)


def test_a_process_that_exited_and_was_reaped_is_gone() -> None:
    child = subprocess.Popen(["sleep", "600"])
    ticks = proc.start_ticks(child.pid)
    assert proc.running(child.pid, ticks) and proc.exists(child.pid)
    child.kill()
    child.wait()
    readers = [proc.stat, proc.start_ticks, proc.cmdline, proc.comm, proc.threads, proc.maps,
               proc.smaps, proc.numa_maps, proc.fd_stats]
    for read in readers:
        with pytest.raises(ProcessGoneError) as e:
            read(child.pid)
        assert e.value.pid == child.pid and f"process {child.pid}" in str(e.value)
    with pytest.raises(ProcessGoneError):
        proc.fd_stat(child.pid, 0)
    with pytest.raises(ProcessGoneError):
        proc.cwd_stat(child.pid, "x")
    assert not proc.exists(child.pid)
    assert not proc.same_process(child.pid, ticks)
    assert not proc.running(child.pid, ticks)
    assert child.pid not in proc.pids()
    assert issubclass(ProcessGoneError, HostError) and issubclass(ProcessGoneError,
                                                                  KvmaccelError)


def test_a_zombie_exists_but_does_not_run() -> None:
    child = subprocess.Popen(["sleep", "600"])
    ticks = proc.start_ticks(child.pid)
    try:
        child.kill()
        deadline = time.monotonic() + 10
        while proc.stat(child.pid).state != "Z" and time.monotonic() < deadline:
            time.sleep(0.005)
        zombie = proc.stat(child.pid)  # not reaped: still there, as a zombie
        assert zombie.state == "Z" and zombie.exited and zombie.start_ticks == ticks
        assert proc.exists(child.pid) and proc.same_process(child.pid, ticks)
        assert not proc.running(child.pid, ticks)
        assert proc.maps(child.pid) == [] and proc.cmdline(child.pid) == []
    finally:
        child.wait()
    assert not proc.exists(child.pid)


def _spawn_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A new process given ``pid`` (root: ``ns_last_pid``), or None if others kept taking it."""
    for _ in range(100):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        child = subprocess.Popen(["sleep", "600"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


def test_a_reused_pid_is_another_process() -> None:
    need(os.geteuid() == 0 and os.access(NS_LAST_PID, os.W_OK), f"root, to write {NS_LAST_PID}")
    first = subprocess.Popen(["sleep", "600"])
    ticks = proc.start_ticks(first.pid)
    time.sleep(0.05)  # start times count clock ticks (10 ms): the next one starts later
    first.kill()
    first.wait()
    second = _spawn_with_pid(first.pid)
    assert second is not None, f"could not get pid {first.pid} again"
    try:
        assert proc.exists(first.pid)  # the pid is there again...
        assert proc.start_ticks(second.pid) > ticks  # ...started later:
        assert not proc.same_process(first.pid, ticks)  # not the process recorded
        assert not proc.running(first.pid, ticks)
        assert proc.running(second.pid, proc.start_ticks(second.pid))
    finally:
        second.kill()
        second.wait()


def test_a_name_with_spaces_and_parentheses(tmp_path: os.PathLike[str]) -> None:
    """The name in ``stat`` is in parentheses and may hold any: the fields after the last
    ``)`` are read, the name between the first ``(`` and it."""
    name = "x) (y 1 2 3"
    link = os.path.join(str(tmp_path), name)
    os.symlink("/bin/sleep", link)
    child = subprocess.Popen([link, "600"])
    try:
        deadline = time.monotonic() + 10
        while proc.comm(child.pid) != name and time.monotonic() < deadline:
            time.sleep(0.005)  # the name is the program's once exec is done
        st = proc.stat(child.pid)
        assert st.comm == name and st.ppid == os.getpid() and st.state in "SR"
        assert st.start_ticks == proc.start_ticks(child.pid)
        assert proc.cmdline(child.pid) == [link, "600"]
    finally:
        child.kill()
        child.wait()


def test_threads_of_this_process() -> None:
    started, stop = threading.Event(), threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        started.wait()
        assert {os.getpid(), *tids} <= set(proc.threads(os.getpid()))
    finally:
        stop.set()
        thread.join()


def test_maps_smaps_numa_maps_fds_and_holders_of_a_mapped_file(
        sleeper: subprocess.Popen[bytes]) -> None:
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(2 * mmap.PAGESIZE)
        st = os.fstat(f.fileno())
        with mmap.mmap(f.fileno(), 2 * mmap.PAGESIZE) as m:
            m[0] = 1  # one page resident
            (area,) = [a for a in proc.maps(os.getpid()) if (a.dev, a.inode) ==
                       (st.st_dev, st.st_ino)]
            assert area.shared and area.size_bytes == 2 * mmap.PAGESIZE and area.offset == 0
            assert area.path.endswith("(deleted)")  # unlinked: as the kernel shows it
            (sm,) = [s for s in proc.smaps(os.getpid()) if s.area == area]
            assert sm.kib["Size"] * 1024 == 2 * mmap.PAGESIZE
            assert sm.kib["Rss"] * 1024 == mmap.PAGESIZE
            assert "VmFlags" not in sm.kib  # not a size
            assert proc.numa_maps(os.getpid())[area.start].policy == "default"
            mapped = proc.map_file_stat(os.getpid(), area.start, area.end)
            assert (mapped.st_dev, mapped.st_ino) == (st.st_dev, st.st_ino)
            opened = proc.fd_stat(os.getpid(), f.fileno())
            assert (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino)
            assert (st.st_dev, st.st_ino) in {(s.st_dev, s.st_ino) for s in
                                              proc.fd_stats(os.getpid())}
            with pytest.raises(FileNotFoundError):  # no such descriptor: not a gone process
                proc.fd_stat(os.getpid(), 999_999)
            held = proc.holders(st)
            assert proc.Holder(os.getpid(), proc.comm(os.getpid())) in held
            assert sleeper.pid not in {h.pid for h in held}
            assert str(held[0]) == f"{held[0].pid} ({held[0].comm})"


def test_holders_finds_a_descriptor_another_process_holds(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "held")
    with open(path, "w"):
        pass
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                              f"f = open({path!r})\nprint(flush=True)\ntime.sleep(600)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        assert [h.pid for h in proc.holders(os.stat(path))] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert proc.holders(os.stat(path)) == []


def test_a_copied_tree(tmp_path: os.PathLike[str]) -> None:
    """The injectable root: a tree shaped like /proc."""
    root = str(tmp_path)
    os.makedirs(f"{root}/42/task/42")
    os.makedirs(f"{root}/42/task/43")
    os.makedirs(f"{root}/self")
    fields = ["S", "1", "42", "42", *["0"] * 12, "5", "2", "0", "123456", *["0"] * 30]
    with open(f"{root}/42/stat", "w") as f:
        f.write(f"42 (a (b) c) {' '.join(fields)}\n")
    with open(f"{root}/42/maps", "w") as f:
        f.write("7f0000000000-7f0000200000 rw-s 00001000 00:27 26939 /dev/hugepages/x (deleted)\n"
                "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
                "garbage\n")
    st = proc.stat(42, root)
    assert st == proc.Stat(42, "a (b) c", "S", 1, 42, 42, 5, 2, 123456)
    assert proc.threads(42, root) == [42, 43] and proc.pids(root) == [42]
    huge, anon = proc.maps(42, root)
    assert huge == proc.MapArea(0x7f0000000000, 0x7f0000200000, "rw-s", 0x1000,
                                os.makedev(0, 0x27), 26939, "/dev/hugepages/x (deleted)")
    assert anon.path == "" and not anon.shared
    with pytest.raises(ProcessGoneError):
        proc.stat(43, root)
    with pytest.raises(FileNotFoundError):  # the process is there, the file is not
        proc.smaps(42, root)
    with open(f"{root}/42/stat", "w") as f:
        f.write("42 (short) S 1\n")
    with pytest.raises(HostError, match="not a process's stat"):
        proc.stat(42, root)
