"""kvmaccel.model.qemuconf: virConf syntax, the /libvirt/qemu suffix rule, defaults, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmaccel.errors import ConfigError
from kvmaccel.model.qemuconf import (
    DEFAULT_MEMORY_BACKING_DIR,
    QemuConf,
    parse_virconf,
    qemu_conf_from_text,
    read_qemu_conf,
)

DEBIAN_STYLE = '''
# Master configuration file for the QEMU driver.
#vnc_listen = "0.0.0.0"
user = "libvirt-qemu"   # trailing comment
group = "kvm"
security_driver = [ "selinux", "apparmor" ]
max_files = 32768
hugetlbfs_mount = ["/dev/hugepages2M",
                   "/dev/hugepages1G"]
memory_backing_dir = "/dev/shm/x/"
cgroup_device_acl = [
    "/dev/null", "/dev/full", "/dev/zero",
    "/dev/random", "/dev/urandom",
]
'''


def test_defaults_when_absent() -> None:
    conf = qemu_conf_from_text("# nothing set\n")
    assert conf.memory_backing_dir == DEFAULT_MEMORY_BACKING_DIR == "/var/lib/libvirt/qemu/ram"
    assert conf.memory_backing_dir_configured is None
    assert conf.hugetlbfs_mount is None
    assert (conf.user, conf.group) == ("libvirt-qemu", "libvirt-qemu")


def test_settings_and_suffix_rule() -> None:
    conf = qemu_conf_from_text(DEBIAN_STYLE)
    assert conf.memory_backing_dir == "/dev/shm/x/libvirt/qemu"
    assert conf.memory_backing_dir_configured == "/dev/shm/x/"
    assert conf.hugetlbfs_mount == ("/dev/hugepages2M", "/dev/hugepages1G")
    assert (conf.user, conf.group) == ("libvirt-qemu", "kvm")


@pytest.mark.parametrize(("text", "mounts"), [
    ('hugetlbfs_mount = "/dev/hugepages"', ("/dev/hugepages",)),
    ("hugetlbfs_mount = '/mnt/huge'", ("/mnt/huge",)),
    ('hugetlbfs_mount = ""', ()),
    ('hugetlbfs_mount = []', ()),
])
def test_hugetlbfs_mount_string_or_list(text: str, mounts: tuple[str, ...]) -> None:
    assert qemu_conf_from_text(text).hugetlbfs_mount == mounts


def test_parse_virconf_values() -> None:
    values = parse_virconf('a = 1\nb = "x"\nc = [ 1, "y" ]\nd = """multi\nline"""\n')
    assert values == {"a": 1, "b": "x", "c": [1, "y"], "d": "multi\nline"}


@pytest.mark.parametrize(("text", "message"), [
    ("user =", "no value"),
    ("user = ]", "no value"),
    ('memory_backing_dir = "relative/dir"', "absolute path"),
    ("memory_backing_dir = 5", "must be a string"),
    ("hugetlbfs_mount = [1]", "list of strings"),
    ('user "x"', "expected ="),
    ("user = @", "cannot parse"),
])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        qemu_conf_from_text(text, "/etc/libvirt/qemu.conf")


def test_read_from_root_and_explicit_path(tmp_path: Path) -> None:
    assert read_qemu_conf(root=str(tmp_path)) == QemuConf()
    conf_dir = tmp_path / "etc" / "libvirt"
    conf_dir.mkdir(parents=True)
    (conf_dir / "qemu.conf").write_text('memory_backing_dir = "/dev/hugepages"\n')
    assert read_qemu_conf(root=str(tmp_path)).memory_backing_dir == "/dev/hugepages/libvirt/qemu"
    with pytest.raises(ConfigError, match="does not exist"):
        read_qemu_conf(str(tmp_path / "missing.conf"))
