"""The hook, driven as libvirt drives it (the installed script, argv and the domain XML on
stdin, a clean environment), against an attacker who owns the guest's directory.

The per-domain directory belongs to the qemu user (``nobody`` here); everything root does in
it must act on the file root made, whatever its owner puts at the file's name meanwhile.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

from kvmaccel.libvirt import entry
from kvmaccel.pool.manage import POOL_DIRNAME, Pool
from kvmaccel.setup import install

from .test_hook import NAME, UUID, domain_xml
from .test_pool_isolation import NOBODY, SWAPPER, as_nobody, swaps


def write_config(tmp_path: str, shm_dir: str, run_dir: str) -> str:
    with open(os.path.join(tmp_path, "qemu.conf"), "w") as f:
        f.write(f'memory_backing_dir = "{shm_dir}"\n')
    path = os.path.join(tmp_path, "kvmaccel.toml")
    with open(path, "w") as f:
        f.write(f'syslog = false\nlog_file = "{tmp_path}/hook.log"\nlog_level = "debug"\n'
                f'run_dir = "{run_dir}"\nqemu_conf = "{tmp_path}/qemu.conf"\n')
    return path


def call(script: str, op: str, subop: str, xml: bytes) -> subprocess.CompletedProcess[bytes]:
    """As libvirt calls a hook: a clean environment, the XML on stdin."""
    return subprocess.run([script, NAME, op, subop, "-"], input=xml, capture_output=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # + the test's records
                               "KVMACCEL_RECORD_FILE": os.environ["KVMACCEL_RECORD_FILE"]},
                          timeout=120)


def test_the_pool_never_adopts_what_the_owner_swapped_in(tmp_path: str, shm_dir: str,
                                                         run_dir: str) -> None:
    """The fresh file used to be created at its final name, populated, and then linked into
    the pool *by path*: its owner replaced the name with a symlink to another user's file
    on the same tmpfs, and root linked that file into the pool (to be scrubbed, then served
    to the next guest).  Now nobody sees the file before it is complete, and the pool links
    the file root populated, by its descriptor."""
    config = write_config(str(tmp_path), shm_dir, run_dir)
    libvirt_dir = os.path.join(str(tmp_path), "libvirt")
    os.mkdir(libvirt_dir)
    install.install(libvirt_dir, config_path=config)
    script = install.hook_path(libvirt_dir)
    victim = os.path.join(shm_dir, "another-users-file")
    with open(victim, "w") as f:
        f.write("not the pool's")
    os.chown(victim, 1234, 1234)
    domain_dir = os.path.join(shm_dir, "libvirt", "qemu", f"7-{NAME}")
    os.makedirs(domain_dir)
    os.chown(domain_dir, NOBODY, NOBODY)  # libvirt makes it, owned by the qemu user
    swapper = as_nobody(SWAPPER, domain_dir, "pc.ram", victim)
    try:
        assert swapper.stdout is not None and swapper.stdout.readline().strip() == "watching"
        assert call(script, "prepare", "begin", domain_xml()).returncode == 0
        proc = call(script, "start", "begin", domain_xml())
        assert proc.returncode == 0, proc.stderr
        # The owner really replaced the name root gave the populated file (inotify saw it
        # made): a run where the swap never landed would prove nothing.
        assert swaps(swapper) == 1
    finally:
        swapper.kill()
        swapper.wait()
    with open(os.path.join(str(tmp_path), "hook.log")) as f:
        log = f.read()
    victim_st = os.stat(victim)
    assert victim_st.st_nlink == 1  # never linked anywhere
    pool = Pool(os.path.join(shm_dir, POOL_DIRNAME), state_root=os.path.join(run_dir, "pool"))
    assert "unexpected" not in log and "ERROR" not in log, log
    # The file root populated joins the pool, in use by the guest, unless its name was swapped
    # away before the pool could link it (an unlinked file cannot be linked again): never the
    # victim.
    entries = pool.entries()
    assert len(entries) <= 1, entries
    for e in entries:  # a regular file of the pool's own, not a link to or of the victim
        assert stat.S_ISREG(os.lstat(e.path).st_mode)
        assert os.stat(e.path).st_ino != victim_st.st_ino
    assert all(e.recorded_state == "in_use" and e.key.size_bytes == 64 << 20 for e in entries)
    # The guest stops; the scrub runs: the other user's file is untouched.
    assert call(script, "stopped", "end", domain_xml(domain_id=None)).returncode == 0
    subprocess.run([sys.executable, "-m", "kvmaccel", "pool", "scrub", "--dir", shm_dir],
                   env={**os.environ, "KVMACCEL_RUN_DIR": run_dir}, check=True, timeout=120)
    with open(victim) as f:
        assert f.read() == "not the pool's"
    assert os.stat(victim).st_uid == 1234


def test_the_config_snapshot_lives_in_the_configs_run_dir(tmp_path: str, shm_dir: str,
                                                          run_dir: str) -> None:
    """The warm path's copy of the config went to $KVMACCEL_RUN_DIR or /run/kvmaccel, not
    to the run_dir the config names; the installed script now says where that is."""
    mine = os.path.join(str(tmp_path), "configured-run")
    config = write_config(str(tmp_path), shm_dir, mine)
    assert entry.main([NAME, "prepare", "begin", "-"], io.BytesIO(domain_xml()),
                      config_path=config) == 0
    assert os.path.isdir(os.path.join(mine, "hook-config"))
    assert not os.path.exists(os.path.join(run_dir, "hook-config"))
    libvirt_dir = os.path.join(str(tmp_path), "libvirt")
    os.mkdir(libvirt_dir)
    install.install(libvirt_dir, config_path=config)
    with open(install.hook_path(libvirt_dir)) as f:
        assert f"export KVMACCEL_RUN_DIR={mine}" in f.read()
    # Run as libvirt runs it, the second prepare is the warm path's (it reads the snapshot).
    for _ in range(2):
        assert call(install.hook_path(libvirt_dir), "prepare", "begin",
                    domain_xml()).returncode == 0
    with open(os.path.join(str(tmp_path), "hook.log")) as f:
        assert "plan: as before" in f.read()
    assert UUID in " ".join(os.listdir(os.path.join(mine, "domains")))
