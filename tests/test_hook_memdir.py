"""kvmaccel.serve.memdir: the proof directory and the memfd guest's hugepage directory the
hook makes, played against by a local user who can write the parent, or the qemu user (here
nobody, or libvirt-qemu) who owns the guest's directory and put something in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmaccel.errors import BackingError
from kvmaccel.serve import memdir

NOBODY = (65534, 65534)


def as_nobody(code: str, *args: str) -> None:
    """Run ``code`` (Python) as nobody: the qemu user here."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY[1])
        os.setuid(NOBODY[0])

    subprocess.run(["/usr/bin/python3", "-c", code, *args], check=True, cwd="/",
                   preexec_fn=drop)


@pytest.fixture
def parent() -> Iterator[Path]:
    """``<mount>/libvirt/qemu`` as libvirt makes it (root's, 0755), where every user can
    reach it (pytest's tmp_path is root's, mode 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (owners)")
    top = tempfile.mkdtemp(prefix="kvtest-memdir-", dir="/run")
    os.chmod(top, 0o755)
    p = Path(top) / "mnt" / "libvirt" / "qemu"
    p.mkdir(parents=True)
    for level in (p, p.parent, p.parent.parent):
        level.chmod(0o755)
    try:
        yield p
    finally:
        shutil.rmtree(top)


def test_makes_it_owned_by_the_qemu_user_and_removes_it_whole(parent: Path) -> None:
    d = parent / "5-g"
    assert memdir.is_guest_dir(str(d), "5-g") and not memdir.is_guest_dir(str(d), "6-g")
    assert memdir.make_guest_dir(str(d), NOBODY)
    st = d.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (*NOBODY, 0o700)
    assert not memdir.make_guest_dir(str(d), NOBODY)  # empty, libvirt's or ours: used
    memdir.make_proof_dir(str(d))
    as_nobody("import os, sys; d = sys.argv[1]; open(f'{d}/kvmaccel-ram-node0', 'w').close(); "
              "os.makedirs(f'{d}/a/b/c'); open(f'{d}/a/b/c/x', 'w').close(); "
              "os.symlink('/etc', f'{d}/a/etc')", str(d))
    assert memdir.remove_guest_dir(str(d)) and not d.exists()  # whole, whatever is in it
    assert os.path.exists("/etc/passwd")  # a symlink is a name to remove, never followed


def test_a_directory_with_anything_in_it_is_never_reused(parent: Path) -> None:
    """What a previous QEMU left in a memfd guest's directory is not handed to the next
    guest of that shortname: such a directory is refused (the hook fails open); a proof
    directory kvmaccel left in it alone is removed, and the directory then used."""
    d = parent / "5-g"
    assert memdir.make_guest_dir(str(d), NOBODY)
    memdir.make_proof_dir(str(d))
    (d / ".kvmaccel" / "kvmaccel-ram-node0").touch()  # an earlier start's, root's
    assert not memdir.make_guest_dir(str(d), NOBODY)
    assert list(d.iterdir()) == []  # kvmaccel's leftover removed, the directory used
    as_nobody("import sys; open(sys.argv[1] + '/kvmaccel-ram-node0', 'w').close()", str(d))
    with pytest.raises(BackingError, match="not empty.*kvmaccel-ram-node0.*remove it"):
        memdir.make_guest_dir(str(d), NOBODY)
    assert (d / "kvmaccel-ram-node0").exists()  # refused, and left as it was


def test_each_start_gets_a_proof_dir_of_its_own(parent: Path) -> None:
    """``D/.kvmaccel`` is root's, mode 0755, made afresh: one an earlier start left (with a
    file in it) is removed whole first, so no file of an earlier start is ever in it."""
    d = parent / "5-g"
    memdir.make_guest_dir(str(d), NOBODY)
    first = memdir.make_proof_dir(str(d))
    st = os.stat(first.path)
    assert (st.st_uid, st.st_mode & 0o7777, first.uid, first.gid) == (0, 0o755, *NOBODY)
    (Path(first.path) / "kvmaccel-ram-node0").touch()
    second = memdir.make_proof_dir(str(d))
    assert second.path == first.path and os.listdir(second.path) == []
    fd = os.open(second.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert second.holds(fd)
    finally:
        os.close(fd)
    assert memdir.remove_proof_dir(second.path, second.dev, second.ino)
    assert not os.path.lexists(second.path) and d.exists()


@pytest.mark.parametrize("what", ["directory", "symlink", "file"])
def test_a_proof_dir_the_qemu_user_made_is_refused_and_left(parent: Path, what: str) -> None:
    d = parent / "5-g"
    memdir.make_guest_dir(str(d), NOBODY)
    target = parent / "elsewhere"
    target.mkdir()
    make = {"directory": "os.mkdir(p)", "symlink": f"os.symlink({str(target)!r}, p)",
            "file": "open(p, 'w').close()"}[what]
    as_nobody(f"import os, sys; p = sys.argv[1] + '/.kvmaccel'; {make}", str(d))
    with pytest.raises(BackingError, match="kvmaccel did not make it"):
        memdir.make_proof_dir(str(d))
    assert os.lstat(d / ".kvmaccel").st_uid == NOBODY[0]  # left as it was
    assert list(target.iterdir()) == []  # nothing made through the symlink


def test_a_guest_dir_others_can_write_gets_no_proof_dir(parent: Path) -> None:
    d = parent / "5-g"
    memdir.make_guest_dir(str(d), NOBODY)
    d.chmod(0o777)
    with pytest.raises(BackingError, match="writable by others"):
        memdir.make_proof_dir(str(d))
    assert not (d / ".kvmaccel").exists()


def test_stop_leaves_a_proof_dir_that_is_not_the_one_it_made(parent: Path) -> None:
    """At stop the qemu user may have renamed the proof directory away and made one of its
    own in its place: that one is not removed (it is not kvmaccel's)."""
    d = parent / "5-g"
    memdir.make_guest_dir(str(d), NOBODY)
    proof = memdir.make_proof_dir(str(d))
    as_nobody("import os, sys; d = sys.argv[1]; os.rename(d + '/.kvmaccel', d + '/.old'); "
              "os.mkdir(d + '/.kvmaccel'); open(d + '/.kvmaccel/x', 'w').close()", str(d))
    assert not memdir.remove_proof_dir(proof.path, proof.dev, proof.ino)
    assert (d / ".kvmaccel" / "x").exists()


def test_a_parent_others_can_write_is_refused(parent: Path) -> None:
    parent.chmod(0o777)
    with pytest.raises(BackingError, match="others can write"):
        memdir.make_guest_dir(str(parent / "5-g"), NOBODY)
    assert not (parent / "5-g").exists()


def test_a_symlink_at_the_name_is_not_followed(parent: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (parent / "5-g").symlink_to(target)
    with pytest.raises(BackingError, match="not a directory"):
        memdir.make_guest_dir(str(parent / "5-g"), NOBODY)
    assert target.stat().st_uid == 0  # never chowned through the link


def test_a_directory_of_another_user_is_refused(parent: Path) -> None:
    d = parent / "5-g"
    d.mkdir()
    os.chown(d, 12345, 12345)
    with pytest.raises(BackingError, match="not the qemu user"):
        memdir.make_guest_dir(str(d), NOBODY)


# --- issue 20, finding 2: the memfd guest's directory, through the hook and the front -------

QEMU_USER = "libvirt-qemu"
NAME = "kvtest-memfd"
UUID = "5b0f3a2e-8c61-4d7e-9a43-2f1e6d7c8b9a"


def memfd_xml(emulator: str, domain_id: int | None = 7) -> bytes:
    id_attr = f" id='{domain_id}'" if domain_id is not None else ""
    return f"""<domain type='kvm'{id_attr}>
  <name>{NAME}</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory>
  <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages>
    <source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>{emulator}</emulator></devices>
</domain>""".encode()


@pytest.fixture
def memfd_env(hugetlbfs: str) -> Iterator[dict[str, str]]:
    """A private 2M hugetlbfs that qemu.conf names, libvirt's ``libvirt/qemu`` on it, the
    front installed for a stand-in QEMU, and a hook config: what the hook and the front see
    for a memfd guest, without libvirt."""
    import pwd

    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"needs the {QEMU_USER} user")
    from kvmaccel.setup import front

    top = tempfile.mkdtemp(prefix="kvtest-memfd-", dir="/run")
    os.chmod(top, 0o755)
    try:
        qemu = os.path.join(top, "qemu-system-x86_64")
        with open(qemu, "w") as f:
            f.write("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
        os.chmod(qemu, 0o755)
        script = front.install(qemu).path
        os.makedirs(f"{hugetlbfs}/libvirt/qemu", 0o755)
        with open(f"{top}/qemu.conf", "w") as f:
            f.write(f'hugetlbfs_mount = "{hugetlbfs}"\nuser = "{QEMU_USER}"\ngroup = "kvm"\n')
        with open(f"{top}/kvmaccel.toml", "w") as f:
            f.write(f'syslog = false\nlog_file = "{top}/hook.log"\nlog_level = "debug"\n'
                    f'run_dir = "{os.environ["KVMACCEL_RUN_DIR"]}"\n'
                    f'qemu_conf = "{top}/qemu.conf"\noverlap = false\n[pool]\nenabled = false\n')
        yield {"front": script, "config": f"{top}/kvmaccel.toml", "log": f"{top}/hook.log",
               "dir": f"{hugetlbfs}/libvirt/qemu/7-{NAME}"}
    finally:
        shutil.rmtree(top)


def hook(env: dict[str, str], op: str, subop: str, domain_id: int | None = 7) -> int:
    import io

    from kvmaccel.libvirt import entry

    return entry.main([NAME, op, subop, "-"], io.BytesIO(memfd_xml(env["front"], domain_id)),
                      config_path=env["config"])


def front_argv(env: dict[str, str]) -> str:
    """What QEMU gets through the front, run as the qemu user in this guest's HOME."""
    import pwd

    pw = pwd.getpwnam(QEMU_USER)

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    arg = ('{"qom-type":"memory-backend-memfd","id":"pc.ram","hugetlb":true,'
           '"hugetlbsize":2097152,"share":true,"prealloc":true,"size":67108864}')
    return subprocess.run(
        [env["front"], "-object", arg], check=True, capture_output=True, text=True, cwd="/",
        preexec_fn=drop, env={"PATH": "/usr/bin:/bin",
                              "HOME": f"/var/lib/libvirt/qemu/domain-7-{NAME}"}).stdout


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


LEAVE = """
import mmap, os, sys
d = sys.argv[1]
fd = os.open(d + '/kvmaccel-pc.ram', os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 2 << 20)
m = mmap.mmap(fd, 2 << 20)
m[:8] = b'leftover'
os.makedirs(d + '/junk/deeper')
open(d + '/junk/deeper/x', 'w').close()
"""
"""What a QEMU (the qemu user) leaves in its directory: a file it wrote, a tree."""


def as_qemu(code: str, d: str) -> None:
    import pwd

    pw = pwd.getpwnam(QEMU_USER)

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    subprocess.run(["/usr/bin/python3", "-c", code, d], check=True, cwd="/", preexec_fn=drop)


def test_the_memfd_guests_directory_goes_whole_at_stop(memfd_env: dict[str, str]) -> None:
    d = memfd_env["dir"]
    assert hook(memfd_env, "prepare", "begin") == 0
    assert hook(memfd_env, "start", "begin") == 0
    assert "kvmaccel-pc.ram" in front_argv(memfd_env), read(memfd_env["log"])  # served
    as_qemu(LEAVE, d)
    assert hook(memfd_env, "stopped", "end", None) == 0
    assert not os.path.lexists(d), os.listdir(d)  # removed whole, proof directory and all


def test_a_memfd_guests_directory_left_by_a_crash_is_never_reused(
        memfd_env: dict[str, str]) -> None:
    """A stop that never came (a crash): the directory is still there, with what the last
    QEMU left in it.  The next start of that shortname neither reuses it nor hands QEMU
    anything from it."""
    import pwd

    pw = pwd.getpwnam(QEMU_USER)
    d = memfd_env["dir"]
    os.mkdir(d, 0o700)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.mkdir(f"{d}/.kvmaccel", 0o755)  # the crashed start's proof directory, root's ...
    with open(f"{d}/.kvmaccel/kvmaccel-pc.ram", "w"):  # ... with its file
        pass
    as_qemu(LEAVE, d)
    assert hook(memfd_env, "prepare", "begin") == 0
    assert hook(memfd_env, "start", "begin") == 0  # fails open
    out = front_argv(memfd_env)
    assert "kvmaccel-pc.ram" not in out and "memory-backend-memfd" in out  # QEMU's own memory
    assert "is not empty" in read(memfd_env["log"])
    assert os.path.isfile(f"{d}/kvmaccel-pc.ram")  # what kvmaccel did not make: left alone
    assert not os.path.lexists(f"{d}/.kvmaccel")  # what it made: gone
    assert hook(memfd_env, "stopped", "end", None) == 0


def test_the_hook_populates_nothing_in_a_proof_dir_swapped_in(shm_dir: str) -> None:
    """The engine opens a file's directory by path; the qemu user may have put a directory
    of its own at ``D/.kvmaccel`` since the hook made it.  Such a file is refused before it
    is populated or named, and nothing is left."""
    from kvmaccel.engine.backing import BackingSpec, open_backings
    from kvmaccel.host.facts import read_host
    from kvmaccel.serve.start import check_in_proof_dirs

    os.makedirs(f"{shm_dir}/libvirt/qemu", 0o755)
    d = f"{shm_dir}/libvirt/qemu/5-g"
    memdir.make_guest_dir(d, NOBODY)
    proof = memdir.make_proof_dir(d)
    as_nobody("import os, sys; d = sys.argv[1]; os.rename(d + '/.kvmaccel', d + '/.old'); "
              "os.mkdir(d + '/.kvmaccel', 0o777)", d)
    spec = BackingSpec(path=f"{proof.path}/kvmaccel-pc.ram", size_bytes=1 << 20,
                       uid=NOBODY[0], gid=NOBODY[1])
    backings = open_backings([spec], read_host())
    try:
        with pytest.raises(BackingError, match="no longer the directory kvmaccel made"):
            check_in_proof_dirs(backings, [proof])
    finally:
        for backing in backings:
            backing.discard()
    assert os.listdir(f"{d}/.kvmaccel") == []
