"""``kvmaccel prealloc``: a domain's plan populated outside any hook.

The XML lookup runs against libvirt's test driver (``test:///default``, in this process); the
real daemon is used where the hook tests run it.  Files go to a /dev/shm directory named as
``memory_backing_dir`` by a qemu.conf written for the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from kvmaccel.cli.main import main

from .conftest import need


def import_libvirt() -> Any:
    """The libvirt Python binding; a missing one is a :func:`need` (it fails the test
    command), never a silent importorskip."""
    try:
        import libvirt
    except ImportError:
        need(False, "the libvirt Python binding is not installed (pip install -e '.[libvirt]')")
    return libvirt

MIB = 1 << 20

SHARED = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""
PLAIN = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


@pytest.fixture
def qemu_conf(shm_dir: str, tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(str(tmp_path), "qemu.conf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'memory_backing_dir = "{shm_dir}"\nuser = "root"\ngroup = "root"\n')
    return path


@pytest.fixture
def test_conn() -> Iterator[Any]:
    """A connection to libvirt's test driver; domains defined on it are seen by the CLI (the
    driver's state is shared by every connection of this process)."""
    libvirt = import_libvirt()
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_prealloc_domain_from_test_driver(test_conn: Any, shm_dir: str, qemu_conf: str) -> None:
    dom = test_conn.defineXML(SHARED.format(name="kvtest-shared"))
    try:
        result = invoke("prealloc", "--domain", "kvtest-shared", "--connect", "test:///default",
                        "--qemu-conf", qemu_conf, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        path = f"{shm_dir}/libvirt/qemu/-1-kvtest-shared/pc.ram"
        assert summary["populated"] == [{"id": "pc.ram", "path": path, "bytes": 64 * MIB,
                                         "host_nodes": []}]
        assert summary["skipped"] == [] and summary["result"]["bytes"] == 64 * MIB
        st = os.stat(path)
        assert st.st_size == 64 * MIB and st.st_blocks * 512 == 64 * MIB
        assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
        again = invoke("release", path)
        assert again.exit_code == 0 and not os.path.exists(path)
    finally:
        dom.undefine()


def test_prealloc_reports_what_it_cannot_populate(test_conn: Any, qemu_conf: str) -> None:
    dom = test_conn.defineXML(PLAIN.format(name="kvtest-plain"))
    try:
        result = invoke("prealloc", "--domain", "kvtest-plain", "--connect", "test:///default",
                        "--qemu-conf", qemu_conf)
        assert result.exit_code == 4
        assert "skipped pc.ram: anonymous memory" in result.output
    finally:
        dom.undefine()


def test_prealloc_refuses_running_and_unknown_domains(test_conn: Any) -> None:
    result = invoke("prealloc", "--domain", "test", "--connect", "test:///default")
    assert result.exit_code == 2 and "is running (id 1)" in result.output
    result = invoke("prealloc", "--domain", "nope", "--connect", "test:///default")
    assert result.exit_code == 2
    assert "no domain 'nope' at test:///default (defined: test)" in result.output


def test_prealloc_xml_file_with_id(tmp_path: os.PathLike[str], shm_dir: str,
                                   qemu_conf: str) -> None:
    xml = os.path.join(str(tmp_path), "guest.xml")
    with open(xml, "w", encoding="utf-8") as f:
        f.write(SHARED.format(name="kvtest-file"))
    result = invoke("prealloc", xml, "--id", "7", "--qemu-conf", qemu_conf)
    assert result.exit_code == 0, result.output
    path = f"{shm_dir}/libvirt/qemu/7-kvtest-file/pc.ram"
    assert f"populated {path}" in result.output and os.path.exists(path)
    # a second run finds kvmaccel's own file of the right size and populates it again in place
    result = invoke("prealloc", xml, "--id", "7", "--qemu-conf", qemu_conf)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("args", "message"), [
    ([], "give either DOMAIN.xml or --domain NAME"),
    (["x.xml", "--domain", "d"], "give either DOMAIN.xml or --domain NAME"),
    (["x.xml", "--connect", "test:///default"], "--connect goes with --domain NAME"),
    (["/nonexistent.xml"], "cannot read /nonexistent.xml"),
])
def test_prealloc_bad_arguments(args: list[str], message: str) -> None:
    result = invoke("prealloc", *args)
    assert result.exit_code == 2 and message in result.output


def test_prealloc_against_the_real_daemon(shm_dir: str, qemu_conf: str,
                                          tmp_path: os.PathLike[str]) -> None:
    virsh = shutil.which("virsh")
    need(virsh is not None and subprocess.run(
        [virsh or "virsh", "-c", "qemu:///system", "version"], capture_output=True,
        check=False).returncode == 0, "libvirtd is not running (virsh -c qemu:///system)")
    assert virsh is not None
    import_libvirt()
    xml = os.path.join(str(tmp_path), "guest.xml")
    with open(xml, "w", encoding="utf-8") as f:
        f.write(SHARED.format(name="kvtest-prealloc"))
    subprocess.run([virsh, "-c", "qemu:///system", "define", xml], check=True,
                   capture_output=True)
    try:
        result = invoke("prealloc", "--domain", "kvtest-prealloc", "--connect", "qemu:///system",
                        "--id", "3", "--qemu-conf", qemu_conf)
        assert result.exit_code == 0, result.output
        assert os.path.exists(f"{shm_dir}/libvirt/qemu/3-kvtest-prealloc/pc.ram")
    finally:
        subprocess.run([virsh, "-c", "qemu:///system", "undefine", "kvtest-prealloc"],
                       capture_output=True, check=False)
