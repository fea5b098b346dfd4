"""One squatted pool must not break the others, nor a guest's start.

On a world-writable tmpfs (``/dev/shm`` is one) any user can make ``.kvmaccel-pool`` before
kvmaccel does: a directory of their own, a symlink, a file.  kvmaccel refuses to use it
(tests/test_pool_isolation.py), and that refusal used to make ``metrics``, ``pool list``,
``pool scrub`` and ``pool keep`` fail for every pool, and, under ``strict``, refuse every
guest start on that filesystem.  Here ``nobody`` squats a private 1777 tmpfs beside a
working pool on another one, and every command serves the working pool with one warning line
for the squatted one.

The commands run in a mount namespace of their own in which the other helpers' and the
host's tmpfs and hugetlbfs mounts are unmounted, so that a run here never scrubs or gives
back anyone else's pool files (and theirs never see this squat).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmaccel.host.facts import read_host
from kvmaccel.pool.manage import POOL_DIRNAME, Pool, key_for
from kvmaccel.setup import install

from .conftest import private_mount
from .test_hook import NAME, domain_xml
from .test_pool_isolation import NOBODY, as_nobody, limits

MIB = 1 << 20

SQUATS = {
    "dir": "d = os.path.join(sys.argv[1], '.kvmaccel-pool'); os.mkdir(d); os.chmod(d, 0o777)",
    "symlink": "os.mkdir(os.path.join(sys.argv[1], 'mine'))\n"
               "os.symlink('mine', os.path.join(sys.argv[1], '.kvmaccel-pool'))",
    "file": "open(os.path.join(sys.argv[1], '.kvmaccel-pool'), 'w').write('mine')",
}

HIDE_OTHERS = r"""
keep=" $KVTEST_KEEP_MOUNTS "
awk '($3 == "tmpfs" || $3 == "hugetlbfs") { print $2 }' /proc/mounts | sort -u -r |
while read -r m; do
    case $keep in *" $m "*) continue ;; esac
    case $m in  # stacked mounts too
        /dev/shm|/dev/hugepages|/run/*|/tmp/*) while umount -l "$m" 2>/dev/null; do :; done ;;
    esac
done
exec "$@"
"""


def isolated(command: list[str], mounts: list[str], **kwargs: object
             ) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a private mount namespace that sees, of all tmpfs and hugetlbfs
    mounts, only ``mounts``."""
    env = dict(kwargs.pop("env", None) or os.environ)  # type: ignore[call-overload]
    env["KVTEST_KEEP_MOUNTS"] = " ".join(mounts)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           HIDE_OTHERS, "sh", *command], capture_output=True, text=True,
                          timeout=120, env=env, **kwargs)  # type: ignore[call-overload]


def kvmaccel(mounts: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return isolated([sys.executable, "-m", "kvmaccel", *args], mounts)


@pytest.fixture(params=sorted(SQUATS))
def squatted(request: pytest.FixtureRequest) -> Iterator[str]:
    """A 1777 tmpfs whose .kvmaccel-pool ``nobody`` made first (a dir, a symlink, a file)."""
    with private_mount("tmpfs", "mode=1777", prefix="kvtest-squat-") as mount:
        squat = as_nobody("import os, sys\n" + SQUATS[request.param], mount)
        assert squat.wait() == 0
        assert os.lstat(os.path.join(mount, POOL_DIRNAME)).st_uid == NOBODY
        yield mount


def warnings_about(stderr: str, path: str) -> list[str]:
    return [line for line in stderr.splitlines() if path in line]


def one_warning(proc: subprocess.CompletedProcess[str], squat: str) -> None:
    lines = warnings_about(proc.stderr, squat)
    assert len(lines) == 1, proc.stderr
    assert "WARNING" in lines[0] and "this pool is skipped, the others are used" in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_other_pools_keep_working(squatted: str, shm_dir: str, tmp_path: str,
                                      run_dir: str) -> None:
    squat = os.path.join(squatted, POOL_DIRNAME)
    before = os.lstat(squat)
    good = Pool(os.path.join(shm_dir, POOL_DIRNAME))
    key = key_for(4 * MIB, 4)
    good.fill(key, 2, read_host(), limits())
    dirty, other = good.entries()
    good._forget_state(dirty.path)  # no state: dirty (as after a reboot)
    mounts = [squatted, shm_dir]

    proc = kvmaccel(mounts, "pool", "list")
    assert proc.returncode == 0, proc.stderr
    one_warning(proc, squat)
    assert dirty.path in proc.stdout and other.path in proc.stdout

    proc = kvmaccel(mounts, "metrics")
    assert proc.returncode == 0, proc.stderr
    one_warning(proc, squat)
    assert 'kvmaccel_pool_files{node="any",page_size="4K",state="dirty"} 1' in proc.stdout
    assert "kvmaccel_scrub_backlog_files 1" in proc.stdout

    proc = kvmaccel(mounts, "pool", "scrub")
    assert proc.returncode == 0, proc.stderr
    one_warning(proc, squat)
    assert proc.stdout == f"scrubbed {dirty.path} (4M)\n"

    config = os.path.join(str(tmp_path), "kvmaccel.toml")
    with open(config, "w") as f:
        f.write(f'run_dir = "{run_dir}"\nlog_file = "{tmp_path}/log/hook.log"\n'
                "[pool]\nkeep_domains = false\nkeep_free_mib = 0\n"
                f'[[pool.keep]]\nsize = "4M"\ndir = "{shm_dir}"\ncount = 3\n'
                f'[[pool.keep]]\nsize = "4M"\ndir = "{squatted}"\ncount = 1\n')
    proc = kvmaccel(mounts, "pool", "keep", "--once", "--config", config)
    assert proc.returncode == 0, proc.stderr
    one_warning(proc, squat)
    assert proc.stdout.startswith(f"filled 4M of 4K pages (any node) in {good.directory}")
    assert [e.state for e in good.entries()] == ["clean"] * 3

    # Named with --dir, the squatted pool is the command's one-line error; the others
    # named with it are still served.
    proc = kvmaccel(mounts, "pool", "list", "--dir", shm_dir, "--dir", squatted)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and squat in proc.stderr
    after = os.lstat(squat)
    assert (after.st_ino, after.st_uid, after.st_mode) == (before.st_ino, before.st_uid,
                                                           before.st_mode)


def write_config(tmp_path: str, backing_dir: str, run_dir: str) -> str:
    with open(os.path.join(tmp_path, "qemu.conf"), "w") as f:
        f.write(f'memory_backing_dir = "{backing_dir}"\n')
    path = os.path.join(tmp_path, "kvmaccel.toml")
    with open(path, "w") as f:
        f.write(f'strict = true\nsyslog = false\nlog_file = "{tmp_path}/hook.log"\n'
                f'log_level = "debug"\nrun_dir = "{run_dir}"\n'
                f'qemu_conf = "{tmp_path}/qemu.conf"\n')
    return path


def test_a_strict_start_is_not_refused_for_a_squatted_pool(squatted: str, tmp_path: str,
                                                           run_dir: str) -> None:
    """``strict`` refuses a start kvmaccel cannot give room to, not one whose filesystem has
    a pool directory another user made: the guest is populated fresh, and its file is not
    put in that pool."""
    config = write_config(str(tmp_path), squatted, run_dir)
    libvirt_dir = os.path.join(str(tmp_path), "libvirt")
    os.mkdir(libvirt_dir)
    install.install(libvirt_dir, config_path=config)
    script = install.hook_path(libvirt_dir)
    domain_dir = os.path.join(squatted, "libvirt", "qemu", f"7-{NAME}")
    os.makedirs(domain_dir)
    os.chown(domain_dir, NOBODY, NOBODY)  # libvirt makes it, owned by the qemu user
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "KVMACCEL_RECORD_FILE": os.environ["KVMACCEL_RECORD_FILE"]}
    for op in ("prepare", "start"):
        proc = isolated([script, NAME, op, "begin", "-"], [squatted], input=domain_xml().decode(),
                        env=env)
        assert proc.returncode == 0, (op, proc.stderr)
    with open(os.path.join(str(tmp_path), "hook.log")) as f:
        log = f.read()
    squat = os.path.join(squatted, POOL_DIRNAME)
    assert "refusing the start" not in log, log
    assert "this pool is skipped, the others are used" in log and squat in log
    assert "ERROR" not in log and "unexpected" not in log, log
    file_path = os.path.join(domain_dir, "pc.ram")
    assert os.stat(file_path).st_size == 64 * MIB
    proc = isolated([script, NAME, "stopped", "end", "-"], [squatted],
                    input=domain_xml(domain_id=None).decode(), env=env)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(file_path)
