"""One mount lookup (:func:`kvmaccel.host.facts.mount_of`): the longest mounted prefix that ends
at a ``/``, after resolving symlinks; and the callers that once had their own.

``bench-run`` picked a mount by bare prefix, so a ``/dev/hugepages1G`` directory was taken for
the ``/dev/hugepages`` 2M mount; here with real mounts side by side, a 2M hugetlbfs ``P`` and a
tmpfs at ``P`` + ``1G``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmaccel.host.facts import Mount, mount_of, read_host
from kvmaccel.pool.manage import pool_dir_for
from tests.conftest import need

from .test_launch_run import qemu  # noqa: F401 (fixture)

HP2M = Mount("/dev/hugepages", "hugetlbfs", 2048)
HP1G = Mount("/dev/hugepages1G", "hugetlbfs", 1048576)
ROOT = Mount("/", "ext4", None)


@pytest.mark.parametrize("mounts", [(ROOT, HP2M, HP1G), (ROOT, HP1G, HP2M)])
def test_a_mount_holds_a_path_only_up_to_a_slash(mounts: tuple[Mount, ...]) -> None:
    assert mount_of("/dev/hugepages1G/libvirt/qemu/1-x", mounts) == HP1G
    assert mount_of("/dev/hugepages1G", mounts) == HP1G
    assert mount_of("/dev/hugepages/x", mounts) == HP2M
    assert mount_of("/dev/hugepages/", mounts) == HP2M
    assert mount_of("/dev/hugepagesX/x", mounts) == ROOT
    assert mount_of("/dev/hugepagesX/x", (HP2M, HP1G)) is None


def test_of_two_mounts_on_one_point_the_later_holds_it() -> None:
    top = Mount("/dev/hugepages", "tmpfs", None)
    assert mount_of("/dev/hugepages/f", (ROOT, HP2M, top)) == top


def test_a_path_through_a_symlink_is_on_the_mount_it_leads_to(tmp_path: Path) -> None:
    link = tmp_path / "hp"
    link.symlink_to("/dev/hugepages")
    assert mount_of(str(link / "f"), (ROOT, Mount(str(tmp_path), "tmpfs", None), HP2M)) == HP2M


@contextlib.contextmanager
def side_by_side() -> Iterator[tuple[str, str]]:
    """A private 2M hugetlbfs at P and a private tmpfs at P + "1G"."""
    from tests.conftest import private_mount

    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as p:
        sibling = p + "1G"
        os.mkdir(sibling, 0o755)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "none", sibling],
                           check=True)
            try:
                yield p, sibling
            finally:
                subprocess.run(["umount", sibling], check=True)
        finally:
            os.rmdir(sibling)


def test_pool_dir_and_planner_do_not_take_a_sibling_for_the_mount() -> None:
    need(os.geteuid() == 0, "needs root (mounts)")
    with side_by_side() as (p, sibling):
        host = read_host()
        assert pool_dir_for(f"{sibling}/guest", host.mounts) == f"{sibling}/.kvmaccel-pool"
        assert pool_dir_for(f"{p}/guest", host.mounts) == f"{p}/.kvmaccel-pool"
        m = host.mount_of(sibling)
        assert m is not None and (m.path, m.fs_type) == (sibling, "tmpfs")


def test_bench_run_refuses_a_directory_beside_the_hugetlbfs_mount(qemu: str) -> None:  # noqa: F811
    need(os.geteuid() == 0, "needs root (mounts)")
    with side_by_side() as (_, sibling):
        proc = subprocess.run([sys.executable, "-m", "kvmaccel", "bench-run", "--size", "64M",
                               "--runs", "1", "--dir", sibling], capture_output=True, text=True,
                              timeout=300)
        # old: taken for the 2M mount beside it; QEMU started, timed, exit 0
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert f"{sibling} is not on a hugetlbfs mount" in proc.stderr
        assert os.listdir(sibling) == []
