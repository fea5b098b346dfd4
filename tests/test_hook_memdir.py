"""kvmaccel.hook.memdir: the memfd guest's hugepage directory the hook makes, played against
by a local user who can write the parent, or the qemu user who put something at the name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmaccel.errors import BackingError
from kvmaccel.hook import memdir

NOBODY = (65534, 65534)


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (owners)")
    p = tmp_path / "mnt" / "libvirt" / "qemu"
    p.mkdir(parents=True)
    p.chmod(0o755)
    return p


def test_makes_it_owned_by_the_qemu_user_and_removes_it_empty(parent: Path) -> None:
    d = parent / "5-g"
    assert memdir.is_guest_dir(str(d), "5-g") and not memdir.is_guest_dir(str(d), "6-g")
    assert memdir.make_guest_dir(str(d), NOBODY)
    st = d.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (*NOBODY, 0o700)
    assert not memdir.make_guest_dir(str(d), NOBODY)  # libvirt's or ours: used, not made
    (d / "kvmaccel-ram-node0").touch()
    assert not memdir.remove_guest_dir(str(d))  # not empty: left
    (d / "kvmaccel-ram-node0").unlink()
    assert memdir.remove_guest_dir(str(d)) and not d.exists()


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


def test_qemu_owner_names_and_numbers() -> None:
    assert memdir.qemu_owner("root", "root") == (0, 0)
    assert memdir.qemu_owner("+107", "+64055") == (107, 64055)
    with pytest.raises(BackingError, match="not known"):
        memdir.qemu_owner("no-such-user-kvmaccel", "root")
