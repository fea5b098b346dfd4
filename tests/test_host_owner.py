"""kvmaccel.host.owner: qemu.conf's ``user``/``group`` (and ``--owner``) as libvirt reads them.

There were three rules: the hook's (``+N`` a number, bare digits a name only), ``prealloc``'s
(bare digits a number without a lookup) and ``--owner``'s (no ``+N``).  libvirt's, the one
now: a name first, digits that name no one as an id, ``+N`` always an id.
"""

from __future__ import annotations

import grp
import pwd

import pytest

from kvmaccel.errors import HostError
from kvmaccel.host import owner
from kvmaccel.host.owner import MAX_ID, group_id, qemu_owner, user_id


def test_names_and_plus_numbers() -> None:
    assert qemu_owner("root", "root") == (0, 0)
    assert qemu_owner("+0", "+0") == (0, 0)
    assert qemu_owner("+107", "+64055") == (107, 64055)


def test_bare_digits_that_name_no_one_are_an_id() -> None:
    """libvirt's qemu.conf: "parse this value first as a name and then, if the name doesn't
    exist, as a user id" (the hook refused ``107`` before)."""
    with pytest.raises(KeyError):
        pwd.getpwnam("107")
    assert user_id("107", "qemu.conf") == 107
    assert group_id("107", "qemu.conf") == 107


def test_bare_digits_that_are_a_name_are_that_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user named ``107`` wins over uid 107 (``prealloc`` took the digits as an id); ``+107``
    is uid 107 whoever is named so."""
    real_pw, real_gr = pwd.getpwnam, grp.getgrnam

    def fake_pw(name: str) -> pwd.struct_passwd:
        return pwd.getpwnam("root") if name == "107" else real_pw(name)

    def fake_gr(name: str) -> grp.struct_group:
        return grp.getgrnam("root") if name == "107" else real_gr(name)

    monkeypatch.setattr(owner.pwd, "getpwnam", fake_pw)
    monkeypatch.setattr(owner.grp, "getgrnam", fake_gr)
    assert qemu_owner("107", "107") == (0, 0)
    assert qemu_owner("+107", "+107") == (107, 107)


@pytest.mark.parametrize("user", ["qemu-no-such-kvmaccel", "+", "+qemu", "+-5", "", "a\0b",
                                  "١٠٧"])
def test_unknown_is_one_error_naming_what_to_do(user: str) -> None:
    with pytest.raises(HostError, match=r"unknown user .* in qemu.conf: .*install libvirt"):
        qemu_owner(user, "root")
    with pytest.raises(HostError, match=r"unknown group .* in --owner: no group"):
        group_id(user, "--owner")


def test_ids_above_the_largest_are_refused() -> None:
    assert user_id(f"+{MAX_ID}", "qemu.conf") == MAX_ID
    with pytest.raises(HostError, match="above the largest possible"):
        user_id(f"+{MAX_ID + 1}", "qemu.conf")  # (uid_t) -1: chown would change nothing
    with pytest.raises(HostError, match="above the largest possible"):
        group_id("99999999999", "--owner")
