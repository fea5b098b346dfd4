"""The pool's isolation, tried as an attacker would: the qemu user (here ``nobody``, the owner
of a guest's directory and of the file linked into it) or any local user.

Each test reproduces one way the pool used to hand a guest's memory to another guest, or make
root act on a file it should not touch, and checks it no longer does.  Real files on private
tmpfs and hugetlbfs mounts, real processes that drop to another user.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmaccel.errors import BackingError
from kvmaccel.host import sysmem
from kvmaccel.host.facts import read_host
from kvmaccel.plan.limits import Limits
from kvmaccel.pool.manage import POOL_DIRNAME, Pool, PoolKey, key_for

MIB = 1 << 20
NOBODY = 65534
SECRET = b"guest-a-secret-"
LEFTOVER = b"leftover-wrote-"


def drop_to_nobody() -> None:
    """preexec_fn: the child runs as nobody/nogroup, as an unprivileged attacker."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def limits() -> Limits:
    return Limits(threads=2, max_helpers_host=1, min_chunk_bytes=4 * MIB, idle_cpus_only=False)


ATTACKER_PYTHON = "/usr/bin/python3"
"""Debian's Python, which nobody can run (the tests' own may live under /root); the attackers
need only its standard library."""


def as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child running ``code`` as nobody, talking over stdin/stdout lines."""
    return subprocess.Popen([ATTACKER_PYTHON, "-c", code, *args], preexec_fn=drop_to_nobody,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def guest_dir(base: str, name: str) -> str:
    """A per-domain directory as libvirt makes it: owned by the qemu user (nobody here)."""
    path = os.path.join(base, name)
    os.mkdir(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    return path


def count(path: str, size: int, needle: bytes) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            return m[:].count(needle)
    finally:
        os.close(fd)


def write_all_over(path: str, size: int, data: bytes, every: int) -> None:
    fd = os.open(path, os.O_RDWR)
    addr = sysmem.mmap_shared(fd, size)
    try:
        for offset in range(0, size, every):
            ctypes.memmove(addr + offset, data, len(data))
    finally:
        sysmem.munmap(addr, size)
        os.close(fd)


@pytest.fixture(params=["hugetlbfs", "tmpfs"])
def area(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(a private mount, its page size in KiB); the pool lives in its .kvmaccel-pool."""
    mount = request.getfixturevalue("hugetlbfs" if request.param == "hugetlbfs" else "shm_dir")
    yield mount, 2048 if request.param == "hugetlbfs" else 4


# A process left over from guest A: it maps A's file shared, closes the descriptor, keeps the
# mapping, and on request writes into it or looks for what the next guest wrote.
KEEPER = r"""
import mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
os.close(fd)
print("mapped", flush=True)
for line in sys.stdin:
    if line.strip() == "write":
        for off in range(0, size, 1 << 20):
            m[off:off + 15] = b"leftover-wrote-"
        print("written", flush=True)
    elif line.strip() == "read":
        print("saw" if m[:].find(b"guest-b-") >= 0 else "nothing", flush=True)
"""


def test_a_leftover_mapping_never_reaches_the_next_guest(area: tuple[str, int]) -> None:
    """Item 1: a file still mapped by a process of guest A's (a QEMU child, virtiofsd, a
    forked compromised QEMU) is neither scrubbed nor handed to guest B: the link count does
    not show a mapping, a write lease does."""
    mount, page_kib = area
    size = 8 * MIB
    pool = Pool(os.path.join(mount, POOL_DIRNAME))
    key = key_for(size, page_kib)
    pool.fill(key, 1, read_host(), limits())
    a_dir = guest_dir(mount, "a")
    a_path = os.path.join(a_dir, "ram")
    taken = pool.take(key, a_path, domain_uuid="uuid-a", backend_id="pc.ram", uid=NOBODY,
                      gid=NOBODY)
    assert taken is not None
    keeper = as_nobody(KEEPER, a_path, str(size))
    try:
        assert keeper.stdout is not None and keeper.stdin is not None
        assert keeper.stdout.readline().strip() == "mapped"
        write_all_over(a_path, size, SECRET, MIB)
        os.unlink(a_path)  # guest A stops; libvirt removes its directory
        pool.release_domain("uuid-a")
        pool.scrub(read_host(), limits())
        (entry,) = pool.entries(probe_holders=True)
        assert entry.state == "held", entry

        b_path = os.path.join(guest_dir(mount, "b"), "ram")
        b = pool.take(key, b_path, domain_uuid="uuid-b", backend_id="pc.ram", uid=NOBODY,
                      gid=NOBODY)
        if b is not None:  # whatever B got, the leftover process must not share it
            write_all_over(b_path, size, b"guest-b-", MIB)
            assert count(b_path, size, SECRET) == 0
        keeper.stdin.write("write\n")
        keeper.stdin.flush()
        assert keeper.stdout.readline().strip() == "written"
        keeper.stdin.write("read\n")
        keeper.stdin.flush()
        assert keeper.stdout.readline().strip() == "nothing"  # it never sees B's memory
        if b is not None:
            assert count(b_path, size, LEFTOVER) == 0  # and B never sees its writes
            os.unlink(b_path)
        assert b is None  # the only pool file was held: B is populated fresh instead
    finally:
        keeper.kill()
        keeper.wait()
    # Once the leftover process is gone the file is scrubbed and served again, all zero.
    assert [e.path for e in pool.scrub(read_host(), limits())] == [taken.path]
    c_path = os.path.join(guest_dir(mount, "c"), "ram")
    assert pool.take(key, c_path, domain_uuid="uuid-c", backend_id="pc.ram") is not None
    assert count(c_path, size, SECRET) == 0 and count(c_path, size, LEFTOVER) == 0


# Wins races on a guest's directory as its owner: as soon as NAME appears there (inotify),
# it is replaced with a symlink to VICTIM.  A line "count" on stdin asks how many times it
# did (the tests assert it won at least once: a race that never fired proves nothing).
SWAPPER = r"""
import ctypes, os, select, struct, sys
directory, name, victim = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
IN_CREATE = 0x100  # link() and O_CREAT make one; its own rename() does not
libc.inotify_add_watch(fd, directory.encode(), IN_CREATE)
print("watching", flush=True)
tmp = os.path.join(directory, ".swap")
os.symlink(victim, tmp)  # ready before the event: on it, one rename() is all it takes
swapped = 0
while True:
    ready, _, _ = select.select([fd, sys.stdin], [], [])
    if fd in ready:  # events first: a "count" sent after an event counts its swap
        data = os.read(fd, 65536)
        off = 0
        while off < len(data):
            _, _, _, length = struct.unpack_from("iIII", data, off)
            fname = data[off + 16: off + 16 + length].rstrip(b"\0").decode()
            off += 16 + length
            if fname == name:
                try:
                    os.rename(tmp, os.path.join(directory, name))
                    swapped += 1
                    os.symlink(victim, tmp)
                except OSError:
                    pass
        continue
    line = sys.stdin.readline()
    if not line:
        break
    print(swapped, flush=True)
"""


def swaps(swapper: subprocess.Popen[str]) -> int:
    """How many times the SWAPPER child has replaced the name with its symlink so far."""
    assert swapper.stdin is not None and swapper.stdout is not None
    swapper.stdin.write("count\n")
    swapper.stdin.flush()
    return int(swapper.stdout.readline())


def test_take_never_changes_a_file_swapped_in_for_the_link(shm_dir: str, tmp_path: str
                                                            ) -> None:
    """Item 2: root used to link a pool file into the guest's directory and then chown and
    chmod the *path*, which its owner swaps for a symlink to a root-only file elsewhere."""
    victim = os.path.join(str(tmp_path), "root-only")  # on another filesystem (ext4)
    with open(victim, "w") as f:
        f.write("root's")
    os.chmod(victim, 0o600)
    directory = guest_dir(shm_dir, "g")
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME))
    key = key_for(2 * MIB, 4)
    pool.fill(key, 1, read_host(), limits())
    swapper = as_nobody(SWAPPER, directory, "ram", victim)
    target = os.path.join(directory, "ram")
    caught = 0  # rounds take saw its link swapped away before it returned (and gave nothing)
    try:
        assert swapper.stdout is not None and swapper.stdout.readline().strip() == "watching"
        for _ in range(2000):
            if os.path.lexists(target):
                os.unlink(target)  # the test's own reset between rounds
            try:
                entry = pool.take(key, target, domain_uuid="u", backend_id="pc.ram",
                                  uid=NOBODY, gid=NOBODY, mode=0o640)
            except BackingError:  # the swapper's symlink took the name first: nothing linked
                continue
            if entry is not None:
                pool.give_back(entry, target)
            else:
                caught += 1
                pool.scrub(read_host(), limits())  # swapped away: dirty, back after a scrub
            st = os.stat(victim)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o600)
        swapped = swaps(swapper)
    finally:
        swapper.kill()
        swapper.wait()
    # The attacker really put its symlink at the name root had just linked, round after round
    # (the old code then chowned and chmodded the victim through it).
    assert swapped > 0, "the swapper never won: this run tried nothing"
    # How many swaps landed inside take (between its link and its return) is the scheduler's:
    # on a quiet machine none in 20000 rounds, on a busy one about 100 in 2000.  So it is
    # counted, not required; a pause injected in take's window would make it certain.
    print(f"{swapped} swaps, {caught} inside take")
    with open(victim) as f:
        assert f.read() == "root's"


def test_a_squatted_pool_directory_is_refused(tmp_path: str) -> None:
    """Item 3: on a world-writable tmpfs any user can make .kvmaccel-pool first, with a
    symlink named like a pool file in it; root scrubbed through it and served the user's
    files as clean."""
    from .conftest import private_mount

    victim = os.path.join(str(tmp_path), "root-only")
    with open(victim, "wb") as f:
        f.write(b"v" * (4 * MIB))
    os.chmod(victim, 0o600)
    with private_mount("tmpfs", "mode=1777") as mount:
        name = PoolKey(4 * MIB, 4).filename("0badf00d")
        squat = as_nobody(
            "import os, sys\n"
            "d = os.path.join(sys.argv[1], '.kvmaccel-pool')\n"
            "os.mkdir(d, 0o777); os.chmod(d, 0o777)\n"
            "os.symlink(sys.argv[2], os.path.join(d, sys.argv[3]))\n"
            "fd = os.open(os.path.join(d, sys.argv[4]), os.O_RDWR | os.O_CREAT, 0o666)\n"
            "os.ftruncate(fd, 4 << 20); os.write(fd, b'users-own-data')\n",
            mount, victim, name, PoolKey(4 * MIB, 4).filename("00000001"))
        assert squat.wait() == 0
        run_dir = os.environ["KVMACCEL_RUN_DIR"]
        for args in (["pool", "scrub", "--dir", mount], ["pool", "list", "--dir", mount],
                     ["pool", "fill", "--dir", mount, "--size", "4M"],
                     ["pool", "drain", "--dir", mount]):
            proc = subprocess.run([sys.executable, "-m", "kvmaccel", *args],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "pool directory" in lines[0], lines
            assert "not uid 0 with mode 0700" in lines[0] and "remove it" in lines[0]
        with open(victim, "rb") as f:
            assert f.read() == b"v" * (4 * MIB)
        user_file = os.path.join(mount, POOL_DIRNAME, PoolKey(4 * MIB, 4).filename("00000001"))
        with open(user_file, "rb") as f:
            assert f.read(14) == b"users-own-data"
        assert os.stat(user_file).st_uid == NOBODY
        pools = os.path.join(run_dir, "pool")
        assert not os.path.isdir(pools) or all(not files for _, _, files in os.walk(pools))


def test_a_stale_listing_never_scrubs_a_file_a_guest_took(shm_dir: str) -> None:
    """Item 4: scrub A listed two dirty files and zeroed the first; meanwhile scrub B
    cleaned the second and a guest took it.  A then zeroed the running guest's memory from
    its stale listing.  Every transition is now re-checked under the pool lock."""
    pool_dir = os.path.join(shm_dir, POOL_DIRNAME)
    pool = Pool(pool_dir)
    key = key_for(64 * MIB, 4)
    pool.fill(key, 2, read_host(), limits())
    first, second = pool.entries()
    for entry in (first, second):  # both dirty, the first older
        pool._write_state(entry.path, "dirty")
        time.sleep(0.01)
    script = (
        "import os, sys\n"
        "from kvmaccel import paths\n"
        "paths.use(paths.resolve(os.environ))  # as an entry point does\n"
        "from kvmaccel.pool import manage as p\n"
        "from kvmaccel.host.facts import read_host\n"
        "real, calls = p.zero_file, []\n"
        "def paused(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 1:\n"
        "        print('zeroing', flush=True)\n"
        "        sys.stdin.readline()\n"
        "    return real(*a, **k)\n"
        "p.zero_file = paused\n"
        f"done = p.Pool({pool_dir!r}).scrub(read_host())\n"
        "print('done', len(done), flush=True)\n")
    scrub_a = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert scrub_a.stdout is not None and scrub_a.stdin is not None
        assert scrub_a.stdout.readline().strip() == "zeroing"  # A is on the first file
        assert [e.path for e in pool.scrub(read_host(), limits())] == [second.path]  # B
        target = os.path.join(guest_dir(shm_dir, "g"), "ram")
        taken = pool.take(key, target, domain_uuid="g", backend_id="pc.ram")
        assert taken is not None and taken.path == second.path
        write_all_over(target, 64 * MIB, SECRET, MIB)  # the running guest's memory
        scrub_a.stdin.write("go\n")
        scrub_a.stdin.flush()
        assert scrub_a.stdout.readline().strip() == "done 1"
    finally:
        scrub_a.kill()
        scrub_a.wait()
    assert count(target, 64 * MIB, SECRET) == 64  # untouched
    states = {e.path: e.state for e in pool.entries()}
    assert states == {first.path: "clean", second.path: "in_use"}


RESIZER = r"""
import mmap, os, sys
path, size, new_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
os.ftruncate(fd, new_size)
if new_size > size:
    m = mmap.mmap(fd, new_size, mmap.MAP_SHARED)
    for off in range(size, new_size, 1 << 20):
        m[off:off + 15] = b"guest-a-secret-"
    m.close()
os.close(fd)
"""


def test_a_grown_file_is_never_marked_clean(area: tuple[str, int]) -> None:
    """Item 5: the guest's owner grows its file; the scrub zeroed only the size in the
    name and marked it clean with the guest's data past it."""
    mount, page_kib = area
    size = 8 * MIB
    pool = Pool(os.path.join(mount, POOL_DIRNAME))
    key = key_for(size, page_kib)
    pool.fill(key, 1, read_host(), limits())
    a_path = os.path.join(guest_dir(mount, "a"), "ram")
    assert pool.take(key, a_path, domain_uuid="a", backend_id="pc.ram", uid=NOBODY,
                     gid=NOBODY) is not None
    resizer = as_nobody(RESIZER, a_path, str(size), str(2 * size))
    assert resizer.wait() == 0
    os.unlink(a_path)
    pool.release_domain("a")
    (entry,) = pool.entries()
    assert entry.state == "bad" and "its name says" in (entry.reason or "")
    assert pool.scrub(read_host(), limits()) == []
    assert pool.entries() == []  # removed from the pool, never marked clean
    b_path = os.path.join(guest_dir(mount, "b"), "ram")
    b = pool.take(key, b_path, domain_uuid="b", backend_id="pc.ram")
    assert b is None or count(b_path, os.stat(b_path).st_size, SECRET) == 0


def test_a_shrunk_file_does_not_kill_the_scrub(shm_dir: str) -> None:
    """Item 5: a tmpfs file shrunk under the scrub made it die of SIGBUS with no error, and
    every later scrub died on the same file; now it is removed with one warning and the
    next dirty file is scrubbed."""
    size = 16 * MIB
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME))
    key = key_for(size, 4)
    pool.fill(key, 2, read_host(), limits())
    paths = []
    for name in ("a", "b"):
        path = os.path.join(guest_dir(shm_dir, name), "ram")
        assert pool.take(key, path, domain_uuid=name, backend_id="pc.ram", uid=NOBODY,
                         gid=NOBODY) is not None
        paths.append(path)
        time.sleep(0.01)
    assert as_nobody(RESIZER, paths[0], str(size), str(size // 2)).wait() == 0
    write_all_over(paths[1], size, SECRET, MIB)
    for name, path in zip(("a", "b"), paths, strict=True):
        os.unlink(path)
        pool.release_domain(name)
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", "pool", "scrub", "--dir", shm_dir],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "its name says" in proc.stderr and "removed from the pool" in proc.stderr
    (entry,) = pool.entries()
    assert entry.state == "clean" and count(entry.path, size, SECRET) == 0


def test_pool_list_says_what_is_held_and_what_is_bad(shm_dir: str) -> None:
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME))
    key = key_for(4 * MIB, 4)
    pool.fill(key, 2, read_host(), limits())
    held, bad = pool.entries()
    os.truncate(bad.path, 8 * MIB)
    fd = os.open(held.path, os.O_RDONLY)
    pool._write_state(held.path, "dirty")
    try:
        proc = subprocess.run([sys.executable, "-m", "kvmaccel", "pool", "list", "--dir",
                               shm_dir], capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("\n\n")[0].splitlines()[1:]  # the summary follows a blank line
    rows = {line.split()[0]: line for line in table}
    assert set(rows) == {"held", "bad"}
    assert "open or mapped" in rows["held"] and "its name says 4194304" in rows["bad"]


def race(*actions: Callable[[], None], rounds: int = 20) -> list[BaseException]:
    """Run the actions side by side, ``rounds`` times each; the exceptions they raised."""
    errors: list[BaseException] = []

    def loop(action: Callable[[], None]) -> None:
        for _ in range(rounds):
            try:
                action()
            except BaseException as e:  # noqa: BLE001 -- collected for the assertion
                errors.append(e)

    threads = [threading.Thread(target=loop, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_fill_drain_and_scrub_race_without_errors_or_leftovers(shm_dir: str) -> None:
    """Item 6: racing fill, drain and scrub ended in tracebacks and leftover records."""
    run = tempfile.mkdtemp(dir=os.environ["KVMACCEL_RUN_DIR"])
    env = {**os.environ, "KVMACCEL_RUN_DIR": run}

    def cli(*args: str) -> Callable[[], None]:
        def go() -> None:
            proc = subprocess.run([sys.executable, "-m", "kvmaccel", "pool", *args, "--dir",
                                   shm_dir], capture_output=True, text=True, env=env,
                                  timeout=120)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert proc.returncode == 0, proc.stderr
        return go

    errors = race(cli("fill", "--size", "8M"), cli("drain"), cli("scrub"), rounds=8)
    assert errors == []
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME), state_root=os.path.join(run, "pool"))
    names = {os.path.basename(e.path) for e in pool.entries()}
    assert all(e.state == "clean" for e in pool.entries())
    states = {n[: -len(".json")] for n in os.listdir(pool.state_dir) if n.endswith(".json")}
    assert states == names  # a state for every file and none for a file that is gone
    records = os.path.join(run, "files")
    assert not os.path.isdir(records) or os.listdir(records) == []
    shutil.rmtree(run)
