"""The emulator front against the qemu user and other local users (issue 20, finding 1).

The front hands QEMU only a file the hook prepared for this start: one in the proof directory
``D/.kvmaccel`` that root made in libvirt's directory ``D`` for this guest, held on a
descriptor (:mod:`kvmaccel.setup.front`).  Each test plays an attacker for real: a process of
the qemu user (``libvirt-qemu``) or of ``nobody`` plants files, directories and symlinks, or
swaps them in a loop, and the real front script runs as the qemu user (or as root, as under
``--divert``) with a stand-in QEMU.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from kvmaccel.setup import front
from tests.conftest import private_mount
from tests.test_hook_front import (
    as_nobody,
    as_qemu_user,
    drop_to,
    home_of,
    hook_files,
    libvirt_dir,
    qemu_ids,
    reachable_dir,
    run,
    write_fake_qemu,
)


@pytest.fixture
def bin_dir() -> Iterator[str]:
    with reachable_dir() as path:
        yield path


@pytest.fixture
def front_script(bin_dir: str) -> str:
    return front.install(write_fake_qemu(bin_dir)).path


ATTACKER = """
import os, sys
def plant(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    os.ftruncate(fd, 2 << 20)  # hugetlbfs has no write(2)
    os.close(fd)
d, other = sys.argv[1], sys.argv[2]
plant(f'{d}/kvmaccel-ram-node0')
exec(sys.argv[3])
"""
"""Run as the attacker: plant ``D/kvmaccel-ram-node0`` (where the front used to look), then
run ``argv[3]`` with ``d`` (the victim's directory), ``other`` and ``plant`` at hand."""

ATTACKS = {
    # a file of its own where the front looked for the hook's
    "planted": "",
    # a proof directory of its own
    "own proof dir": "os.mkdir(f'{d}/.kvmaccel'); plant(f'{d}/.kvmaccel/kvmaccel-ram-node0')",
    # the hook's proof directory renamed away (the qemu user owns D), one of its own in its place
    "proof dir renamed": "os.rename(f'{d}/.kvmaccel', f'{d}/.old'); os.mkdir(f'{d}/.kvmaccel'); "
                         "plant(f'{d}/.kvmaccel/kvmaccel-ram-node0')",
    # a symlink to another guest's proof directory (root's, with its prepared file)
    "symlink": "os.symlink(f'{other}/.kvmaccel', f'{d}/.kvmaccel')",
}


def file_backend(mem_path: str, backend_id: str = "ram-node0") -> list[str]:
    return ["-object", json.dumps({"qom-type": "memory-backend-file", "id": backend_id,
                                   "mem-path": mem_path, "share": True, "prealloc": True,
                                   "size": 2097152}, separators=(",", ":"))]


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_front_hands_qemu_no_file_the_qemu_user_planted(front_script: str,
                                                           attack: str) -> None:
    """The qemu user owns the guest's directory: whatever it plants there (a file, a proof
    directory of its own, the hook's renamed away, a symlink to another guest's) is not
    handed to QEMU; the backend passes through as libvirt wrote it.  (On tmpfs: hugetlbfs
    has no symlinks, and the front does not look at the filesystem.)"""
    with private_mount("tmpfs", "mode=0755") as mount:
        d, other = libvirt_dir(mount, "5-victim"), libvirt_dir(mount, "6-other")
        hook_files(other, ["ram-node0"])  # another guest's file, really prepared
        if attack == "proof dir renamed":
            hook_files(d, ["ram-node0"])
        as_qemu_user(ATTACKER, d, other, ATTACKS[attack])
        argv = file_backend(d)
        assert run(front_script, argv, home_of("5-victim"), as_qemu=True) == argv


@pytest.mark.parametrize("builder", ["nobody", "qemu user"])
def test_a_memfd_is_never_served_from_a_mount_libvirt_does_not_use(front_script: str,
                                                                  builder: str) -> None:
    """A hugetlbfs mount anyone can write (mode 1777, the guest's page size) with a whole
    ``libvirt/qemu/<shortname>`` tree on it, made by nobody or by the qemu user itself: its
    files are not the hook's, and the memfd stays a memfd."""
    short = "5-victim"
    argv = ["-object", '{"qom-type":"memory-backend-memfd","id":"ram-node0","hugetlb":true,'
            '"hugetlbsize":2097152,"share":true,"prealloc":true,"size":2097152}']
    with private_mount("hugetlbfs", "pagesize=2M,mode=1777") as mount:
        d = f"{mount}/libvirt/qemu/{short}"
        (as_nobody if builder == "nobody" else as_qemu_user)(
            ATTACKER, d, d, "os.makedirs(f'{d}/.kvmaccel', 0o755); "
            "plant(f'{d}/.kvmaccel/kvmaccel-ram-node0')")
        assert os.path.isfile(f"{d}/.kvmaccel/kvmaccel-ram-node0")
        assert run(front_script, argv, home_of(short), as_qemu=True) == argv


def test_a_root_qemu_with_a_shared_mem_path_gets_no_planted_file(front_script: str) -> None:
    """``--divert``: the front is every QEMU on the host, root's too.  A root QEMU whose
    mem-path is a directory anyone can write (``/dev/shm``; here a private tmpfs, mode 1777)
    in which nobody planted ``kvmaccel-<id>``, a proof directory, even a whole
    ``libvirt/qemu/<shortname>`` tree, gets its argv untouched."""
    with private_mount("tmpfs", "mode=1777") as shm:
        tree = f"{shm}/libvirt/qemu/5-g"
        as_nobody(ATTACKER, shm, shm,
                  "os.mkdir(f'{d}/.kvmaccel'); plant(f'{d}/.kvmaccel/kvmaccel-ram-node0'); "
                  f"plant('{tree}/kvmaccel-ram-node0'); "
                  f"plant('{tree}/.kvmaccel/kvmaccel-ram-node0')")
        for mem_path, home in [(shm, "/root"), (shm, home_of("5-g")), (tree, home_of("5-g"))]:
            argv = file_backend(mem_path)
            assert run(front_script, argv, home) == argv, (mem_path, home)


SWAPPER = """
import os, sys
d, other, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(f'{d}/.mine')
fd = os.open(f'{d}/.mine/kvmaccel-ram-node0', os.O_CREAT | os.O_WRONLY, 0o666)
os.close(fd)
fd = os.open(f'{d}/kvmaccel-ram-node0', os.O_CREAT | os.O_WRONLY, 0o666)
os.close(fd)
swaps = 0
while not os.path.exists(out + '.stop'):
    os.rename(f'{d}/.kvmaccel', f'{d}/.real')
    os.symlink(f'{other}/.kvmaccel', f'{d}/.kvmaccel')      # another guest's, root's
    os.unlink(f'{d}/.kvmaccel')
    os.rename(f'{d}/.mine', f'{d}/.kvmaccel')               # one of its own
    os.rename(f'{d}/.kvmaccel', f'{d}/.mine')
    os.rename(f'{d}/.real', f'{d}/.kvmaccel')
    swaps += 1
    with open(out, 'w') as f:
        f.write(str(swaps))
"""
"""The qemu user swaps, in a loop, the hook's proof directory for a symlink to another
guest's and for a directory of its own, and puts it back; it writes how often to ``out``."""

OPENER = """#!/usr/bin/python3
import json, os, sys
# A stand-in QEMU that opens every memory-backend-file's mem-path as QEMU does (open(),
# read-write) and prints the inode it got, or "passed" for the directory libvirt gave.
for a in sys.argv[1:]:
    if a.startswith('{"qom-type":"memory-backend-file"'):
        path = json.loads(a)["mem-path"]
        if os.path.isdir(path):
            print("passed")
            continue
        fd = os.open(path, os.O_RDWR)
        print(os.fstat(fd).st_ino)
"""


def test_a_proof_dir_swapped_in_a_loop_never_gives_qemu_another_file(bin_dir: str) -> None:
    """The race: the front checks, then QEMU opens.  While the qemu user swaps the proof
    directory for a symlink to another guest's or a directory of its own (and back), QEMU
    through the front opens the hook's very file or passes the directory through, never
    anything else."""
    opener = os.path.join(bin_dir, "qemu-system-x86_64")
    with open(opener, "w", encoding="utf-8") as f:
        f.write(OPENER)
    os.chmod(opener, 0o755)
    script = front.install(opener).path
    uid, gid = qemu_ids()
    with private_mount("tmpfs", "mode=0755") as mount:  # hugetlbfs has no symlinks
        d, other = libvirt_dir(mount, "5-victim"), libvirt_dir(mount, "6-other")
        mine = hook_files(d, ["ram-node0"])
        hook_files(other, ["ram-node0"])
        real = os.stat(f"{mine.path}/kvmaccel-ram-node0").st_ino
        out = os.path.join(bin_dir, "swaps")
        open(out, "w").close()
        os.chown(out, uid, gid)
        attacker = subprocess.Popen(["/usr/bin/python3", "-c", SWAPPER, d, other, out],
                                    preexec_fn=lambda: drop_to(uid, gid))
        got: dict[str, int] = {}
        try:
            for _ in range(150):
                result = subprocess.run(
                    [script, *file_backend(d)], capture_output=True, text=True,
                    preexec_fn=lambda: drop_to(uid, gid),
                    env={"PATH": "/usr/bin:/bin", "HOME": home_of("5-victim")})
                assert result.returncode == 0, result.stderr
                word = result.stdout.strip()
                key = "passed" if word == "passed" else "the hook's" if word == str(real) \
                    else f"another file: {word}"
                got[key] = got.get(key, 0) + 1
        finally:
            open(out + ".stop", "w").close()
            attacker.wait(timeout=30)
        with open(out) as f:
            swaps = int(f.read() or 0)
    print(f"{swaps} swaps; QEMU got {got}")
    assert swaps > 0  # the race ran
    assert set(got) <= {"passed", "the hook's"}, got
    assert got.get("the hook's", 0) > 0  # and the front still serves when it is left alone
