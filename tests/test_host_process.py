"""``kvmaccel.host.process``: a detached child really is detached (its own session, stdio on
/dev/null, the nice asked for, its autogroup's too), and priority is lent only to the process
recorded."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from kvmaccel.host import proc, process

from .conftest import need

MINE = os.getpriority(os.PRIO_PROCESS, 0)


def autogroup_nice(pid: int) -> int:
    with open(f"/proc/{pid}/autogroup") as f:  # "/autogroup-123 nice 7"
        return int(f.read().split()[-1])


def assert_detached(pid: int, nice: int) -> None:
    st = proc.stat(pid)
    assert st.session == pid and st.pgrp == pid  # a session of its own, out of ours
    assert os.getsid(pid) != os.getsid(0)
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == [os.devnull] * 3
    assert st.nice == nice == os.getpriority(os.PRIO_PROCESS, pid)
    if os.path.exists(process.AUTOGROUP):
        assert autogroup_nice(pid) == nice


@pytest.fixture
def forked_detached() -> Iterator[tuple[int, int]]:
    """A child forked and detached (nice 7, name ``kvtest-detach``) that waits for SIGTERM,
    then exits 3 if it came as KeyboardInterrupt; (pid, read end of its ready pipe)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            process.detach(7, "kvtest-detach")
            try:
                os.write(ready_w, b"x")
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                code = 3
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield pid, ready_r
    finally:
        os.close(ready_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_a_forked_child_detaches(forked_detached: tuple[int, int]) -> None:
    """The filler's, the scrub's fork and the keeper's daemon: detached, niced, named, and
    SIGTERM stops it as KeyboardInterrupt."""
    pid, _ = forked_detached
    assert_detached(pid, 7)
    assert proc.comm(pid) == "kvtest-detach"
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def test_a_spawned_program_is_detached_and_niced() -> None:
    """The scrub's program: its own session, stdio on /dev/null, no inherited descriptor,
    nice 11 for it and its autogroup, and every thread it starts after."""
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    try:
        pid = process.spawn_detached(
            [sys.executable, "-c", "import threading, time\n"
             "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
             "time.sleep(600)"], 11)
    finally:
        os.close(inherited)
    try:
        assert_detached(pid, 11)
        deadline = time.monotonic() + 30
        while len(proc.threads(pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in proc.threads(pid)] == [11, 11]
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_priority_is_lent_only_to_the_process_recorded() -> None:
    need(MINE < 19, "a test process below nice 19, to lend it")
    pid = process.spawn_detached(
        [sys.executable, "-c", "import threading, time\n"
         "for _ in range(3):\n"
         "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
         "time.sleep(600)"], 19)
    try:
        deadline = time.monotonic() + 30
        while len(proc.threads(pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        ticks = proc.start_ticks(pid)
        assert not process.lend_priority(pid, ticks + 1)  # another process had this pid
        assert not process.lend_priority(pid, None) and not process.lend_priority(None, ticks)
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in proc.threads(pid)} == {19}
        assert process.lend_priority(pid, ticks)
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in proc.threads(pid)} == {MINE}
        if os.path.exists(process.AUTOGROUP):
            assert autogroup_nice(pid) == MINE
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not process.lend_priority(pid, ticks)  # gone


def test_own_start_ticks() -> None:
    assert process.own_start_ticks() == proc.stat(os.getpid()).start_ticks
