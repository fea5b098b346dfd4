"""``safefs.write_atomic``, the one way kvmaccel writes a file, tried as an attacker would.

A symlink at the target or at the temporary name, another user's file at the target, a
failure at any point of the write, writers racing each other: the target holds the old
content or the new, never anything else, nothing is written through a link, no file of
another user is replaced, and no temporary file is left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmaccel import safefs
from kvmaccel.errors import UnsafePathError

from .conftest import need, private_mount
from .test_pool_isolation import NOBODY, drop_to_nobody

MIB = 1 << 20


def private(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o700)
    return path


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_writes_the_whole_file_with_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    d = private(tmp_path / "d")
    old = os.umask(0o077)
    try:
        safefs.write_atomic(str(d / "hook"), b"#!/bin/sh\n", mode=0o755)
        assert stat.S_IMODE(os.stat(d / "hook").st_mode) == 0o755
        safefs.write_atomic(str(d / "hook"), "#!/bin/sh\nexit 0\n", mode=0o755)
    finally:
        os.umask(old)
    assert (d / "hook").read_text() == "#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE(os.stat(d / "hook").st_mode) == 0o755
    safefs.write_json_atomic(str(d / "state.json"), {"a": 1})
    assert json.loads((d / "state.json").read_text()) == {"a": 1}
    assert stat.S_IMODE(os.stat(d / "state.json").st_mode) == 0o600
    assert names(d) == ["hook", "state.json"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_what_is_not_a_file_at_the_target_is_refused_and_never_followed(
        tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    d = private(tmp_path / "d")
    target = d / "state.json"
    {"symlink": lambda: os.symlink(victim, target), "fifo": lambda: os.mkfifo(target),
     "directory": lambda: os.mkdir(target)}[kind]()
    with pytest.raises(UnsafePathError, match="not a file kvmaccel wrote"):
        safefs.write_atomic(str(target), b"new\n")
    assert victim.read_text() == "victim\n"
    assert os.path.islink(target) == (kind == "symlink")
    assert names(d) == ["state.json"]  # no temporary file left


def test_a_symlink_at_the_temporary_name_is_never_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever guessed (or raced for) the temporary name gets an error, never a write."""
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    d = private(tmp_path / "d")
    (d / "state.json").write_text("old\n")
    monkeypatch.setattr(safefs, "_temp_name", lambda name: f".{name}.guessed.tmp")
    os.symlink(victim, d / ".state.json.guessed.tmp")
    with pytest.raises(FileExistsError):
        safefs.write_atomic(str(d / "state.json"), b"new\n")
    assert victim.read_text() == "victim\n"
    assert (d / "state.json").read_text() == "old\n"
    assert os.path.islink(d / ".state.json.guessed.tmp")  # not ours: left where it was


def test_root_never_replaces_another_users_file(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root (a file of nobody's)")
    d = private(tmp_path / "d")
    target = d / "state.json"
    target.write_text("theirs\n")
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="uid 65534"):
        safefs.write_atomic(str(target), b"ours\n")
    assert target.read_text() == "theirs\n" and os.stat(target).st_uid == NOBODY
    assert names(d) == ["state.json"]


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory of nobody's that nobody can reach (pytest's own are root's, 0700)."""
    need(os.geteuid() == 0, "needs root (runs as nobody)")
    base = Path(tempfile.mkdtemp(prefix="kvmaccel-atomic-", dir="/tmp"))
    try:
        base.chmod(0o755)
        d = base / "d"
        d.mkdir(0o755)
        os.chown(d, NOBODY, NOBODY)
        yield d
    finally:
        shutil.rmtree(base)


def as_nobody(call: Callable[[], object]) -> str:
    """Run ``call`` in a child as nobody; what it raised (its class name), or "ok"."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        os.close(read_fd)
        outcome = "ok"
        try:
            drop_to_nobody()
            call()
        except BaseException as e:  # noqa: BLE001 -- reported to the parent
            outcome = type(e).__name__
        os.write(write_fd, outcome.encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said


def test_as_another_user_roots_file_is_never_replaced(nobodys_dir: Path) -> None:
    """nobody may rename over any name in a directory of its own; write_atomic refuses to."""
    target = nobodys_dir / "state.json"
    target.write_text("root's\n")
    assert as_nobody(lambda: safefs.write_atomic(str(target), b"nobody's\n")) == \
        "UnsafePathError"
    assert target.read_text() == "root's\n" and os.stat(target).st_uid == 0
    assert names(nobodys_dir) == ["state.json"]
    assert as_nobody(lambda: safefs.write_atomic(str(nobodys_dir / "own"), b"x")) == "ok"
    assert os.stat(nobodys_dir / "own").st_uid == NOBODY


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    for own in (True, False):
        with pytest.raises(UnsafePathError):
            safefs.write_atomic(str(d / "f"), b"x", own=own)
    assert names(d) == []


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_a_failure_at_any_point_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str,
        exc: BaseException) -> None:
    d = private(tmp_path / "d")
    target = d / "hook"
    target.write_bytes(b"old\n")
    modes: list[int] = []
    real = getattr(os, where)

    def failing(*args: object, **kwargs: object) -> object:
        if where == "write":  # half of it goes out, then the disk fails
            fd, data = args
            assert isinstance(fd, int) and isinstance(data, memoryview)
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            real(fd, data[:len(data) // 2])
        raise exc

    monkeypatch.setattr(os, where, failing)
    with pytest.raises(type(exc)):
        safefs.write_atomic(str(target), b"new\n" * MIB, mode=0o755, durable=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"old\n"
    assert names(d) == ["hook"]
    assert modes in ([], [0o600])  # never executable while half written


def test_a_full_filesystem_leaves_the_old_file_and_no_temporary() -> None:
    with private_mount("tmpfs", "size=64k,mode=0700") as mount:
        target = os.path.join(mount, "state.json")
        safefs.write_atomic(target, b"old\n")
        with pytest.raises(OSError) as e:
            safefs.write_atomic(target, b"x" * MIB)
        assert e.value.errno == errno.ENOSPC
        with open(target, "rb") as f:
            assert f.read() == b"old\n"
        assert os.listdir(mount) == ["state.json"]


def test_durable_fsyncs_the_file_then_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = private(tmp_path / "d")
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    safefs.write_atomic(str(d / "f"), b"x", durable=True)
    assert synced == [stat.S_IFREG, stat.S_IFDIR]
    synced.clear()
    safefs.write_atomic(str(d / "f"), b"y")
    assert synced == []


@pytest.mark.parametrize("json_layer", [False, True], ids=["bytes", "json"])
def test_concurrent_writers_never_show_a_torn_file(tmp_path: Path, json_layer: bool) -> None:
    """Threads of one process (one pid) write the same file while another reads it: every
    read is one writer's whole content, and no writer fails."""
    d = private(tmp_path / "d")
    target = str(d / "state.json")
    size = 2 * MIB

    def content(i: int) -> bytes:
        return json.dumps({"writer": i, "pad": chr(97 + i) * size}).encode()

    def write(i: int) -> None:
        if json_layer:
            safefs.write_json_atomic(target, {"writer": i, "pad": chr(97 + i) * size})
        else:
            safefs.write_atomic(target, content(i))

    write(0)
    whole = {content(i) for i in range(8)}
    errors: list[BaseException] = []
    torn: list[int] = []
    done = threading.Event()

    def writer(i: int) -> None:
        try:
            for _ in range(15):
                write(i)
        except BaseException as e:  # noqa: BLE001 -- the test's finding
            errors.append(e)

    def reader() -> None:
        while not done.is_set():
            with open(target, "rb") as f:
                data = f.read()
            if data not in whole:
                torn.append(len(data))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert errors == [] and torn == []
    assert names(d) == ["state.json"]


def test_a_staged_file_is_left_for_the_caller_to_place(tmp_path: Path) -> None:
    """``place=False`` (the diverted front, linked into place later): the file is complete
    under its own name and the target is untouched."""
    d = private(tmp_path / "d")
    (d / "qemu").write_text("real qemu\n")
    with safefs.opened_dir(str(d)) as dfd:
        tmp = safefs.write_atomic_at(dfd, "qemu", "front\n", mode=0o755, durable=True,
                                     place=False)
    assert tmp.startswith(".qemu.") and tmp.endswith(".tmp")
    assert (d / tmp).read_text() == "front\n"
    assert stat.S_IMODE(os.stat(d / tmp).st_mode) == 0o755
    assert (d / "qemu").read_text() == "real qemu\n"

