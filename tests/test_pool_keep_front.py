"""The keeper and ``doctor`` see a front-enabled guest as the hook does (real libvirtd, QEMU).

A guest whose ``<emulator>`` is kvmaccel's front gets its ``<hugepages/>`` memory (a directory
for libvirt, a memfd for ``<source type='memfd'/>``) from a file the hook prepares.  The keeper
must keep a pool file for that file, so that the guest's first start (after a reboot, when
no start has left one) comes from the pool; ``doctor`` must report the guest served.  Both
once planned without the front: the keeper kept nothing and doctor said "not served".

The set-up (front, private hugetlbfs mounts named by qemu.conf's ``hugetlbfs_mount``, the hook
with its own config) is :mod:`tests.test_hook_front_integration`'s module fixture.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmaccel.bench import virsh
from tests.test_hook_front_integration import (
    GUESTS,
    Env,
    Guest,
    check_served,
    defined,
    state_of,
)
from tests.test_hook_front_integration import env as env  # the module fixture, re-used
from tests.test_hook_integration import wait_for_states

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

SERVED = [g for g in GUESTS if g.key in ("2m-1cell", "memfd-2m")]


def kvmaccel(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "kvmaccel", *args, "--config", env.config_path],
                          capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("guest", SERVED, ids=lambda g: g.key)
def test_after_pool_keep_the_first_start_through_the_front_comes_from_the_pool(
        env: Env, guest: Guest) -> None:
    env.write_config(pool=True)
    pool = env.pool(guest.page_kib)
    assert pool.entries() == []  # no start has left a file: as after a reboot
    with defined(env, guest):
        keep = kvmaccel(env, "pool", "keep", "--once")
        assert keep.returncode == 0, keep.stderr
        # old: "nothing to do" (the guest planned without the front populates nothing)
        wait_for_states(pool, ["clean"] * guest.cells)
        assert pool.entries()[0].key.size_bytes == guest.size_bytes // guest.cells

        doctor = kvmaccel(env, "doctor")
        line = next((x for x in doctor.stdout.splitlines() if f"{guest.name}:" in x), "")
        # old: "guests: kvmaccel-front-...: not served: ... a directory" (or a memfd)
        assert f"{guest.name}: served" in line, doctor.stdout

        virsh.virsh("start", guest.name)
        state = state_of(env, guest)
        assert state["files"] == [] and len(state["pool_links"]) == guest.cells, env.log()
        assert "started from the pool" in env.log()
        check_served(env, guest)
        virsh.virsh("destroy", guest.name)
        wait_for_states(pool, ["clean"] * guest.cells)
        assert pool.drain() == guest.size_bytes
