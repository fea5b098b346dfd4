"""``kvmaccel doctor`` on a copy of a real host's /proc and /sys (tests/data/sysfs), with
its own libvirt directory, qemu.conf and config; and on libvirt's test driver."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmaccel.setup import doctor
from kvmaccel.setup import install as hook_install

from .test_launch_prealloc import import_libvirt

TOP = Path(__file__).resolve().parents[1]
ONE_NODE = TOP / "tests" / "data" / "sysfs" / "one-node"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """The one-node tree, with /dev/hugepages an empty directory and nothing mounted on it
    (what an unmounted test run leaves), and 2M pages reserved."""
    root = tmp_path / "root"
    shutil.copytree(ONE_NODE, root)
    mounts = root / "proc" / "mounts"
    mounts.write_text("".join(x for x in mounts.read_text().splitlines(keepends=True)
                              if "hugetlbfs" not in x))
    (root / "dev" / "hugepages").mkdir(parents=True)
    return root


def _input(tmp_path: Path, root: Path, **kwargs: object) -> doctor.DoctorInput:
    qemu_conf = tmp_path / "qemu.conf"
    if not qemu_conf.exists():
        qemu_conf.write_text('memory_backing_dir = "/dev/shm"\n')
    libvirt = tmp_path / "libvirt"
    libvirt.mkdir(exist_ok=True)
    values: dict[str, object] = dict(
        root=str(root), libvirt_dir=str(libvirt), qemu_conf_path=str(qemu_conf),
        config_path=str(tmp_path / "none.toml"), front_path=str(tmp_path / "front"))
    values.update(kwargs)
    return doctor.DoctorInput(**values)  # type: ignore[arg-type]


def _lines(findings: list[doctor.Finding]) -> list[str]:
    return [f"{f.status} {f.check}: {f.message}" for f in findings]


def test_an_unmounted_hugepages_directory_and_a_missing_hook(tmp_path: Path, host: Path) -> None:
    lines = _lines(doctor.run(_input(tmp_path, host)))
    assert any(x.startswith("warn hugetlbfs: no hugetlbfs mount") for x in lines), lines
    assert any(x.startswith("warn hugetlbfs: /dev/hugepages is a directory but no hugetlbfs")
               for x in lines), lines
    assert any(x.startswith("ok qemu.conf: memory_backing_dir") and "(tmpfs 4K)" in x
               for x in lines), lines
    assert any(x.startswith("warn hook: not installed") and "kvmaccel hook install" in x
               for x in lines), lines
    assert "info front: not installed (kvmaccel front install)" in lines
    assert "info guests: not checked: libvirt was not asked" in lines
    assert not any(x.startswith("fail") for x in lines), lines


def test_pages_per_node_and_an_installed_hook(tmp_path: Path) -> None:
    inp = _input(tmp_path, ONE_NODE)
    hook_install.install(inp.libvirt_dir)
    (tmp_path / "front").touch()
    lines = _lines(doctor.run(inp))
    assert any(x.startswith("ok hugetlbfs: /dev/hugepages: hugetlbfs 2M pages") for x in lines)
    assert any(x.startswith("ok hugepages: 2M pages: ") and "node0" in x for x in lines), lines
    assert any(x.startswith("ok hook: installed") and f"python {sys.executable}" in x
               for x in lines), lines
    assert f"ok front: installed: {tmp_path / 'front'}" in lines


def test_qemu_conf_on_disk_and_a_bad_hugetlbfs_mount(tmp_path: Path) -> None:
    (tmp_path / "qemu.conf").write_text('memory_backing_dir = "/var/lib/x"\n'
                                        'hugetlbfs_mount = ["/mnt/nothing"]\n')
    lines = _lines(doctor.run(_input(tmp_path, ONE_NODE)))
    assert any(x.startswith("warn qemu.conf: memory_backing_dir /var/lib/x/libvirt/qemu is on "
                            "ext4") for x in lines), lines
    assert any(x.startswith("fail qemu.conf: hugetlbfs_mount /mnt/nothing is not") for x in lines)


def test_the_records_line(tmp_path: Path) -> None:
    from kvmaccel.engine import records

    path = str(tmp_path / "records.jsonl")
    inp = _input(tmp_path, ONE_NODE, record_file=path)
    assert "no start recorded yet" in _lines(doctor.check_records(inp))[0]
    records.append("start", domain="a", source="pool", path=path)
    records.append("start", "failed_open", domain="b", reason="no room", path=path)
    line = _lines(doctor.check_records(inp))[0]
    assert line.startswith(f"warn records: {path}: 2 start(s), 1 not ok; the last: b "
                           "failed_open (no room)"), line


def test_which_guests_are_served(tmp_path: Path) -> None:
    served = (TOP / "vm-fixtures" / "small-shm.xml").read_text()
    hugepages = (TOP / "vm-fixtures" / "small-hugepages.xml").read_text()
    inp = _input(tmp_path, ONE_NODE, domains=[("a", served), ("b", hugepages),
                                              ("c", "<domain>")])
    lines = [x for x in _lines(doctor.run(inp)) if " guests: " in x]
    assert lines[0].startswith("ok guests: a: served, 1G in 1 backend(s) on tmpfs 4K"), lines
    assert lines[1].startswith("info guests: b: not served: huge pages: mem-path"), lines
    assert lines[2].startswith("warn guests: c: not served: "), lines


def _kvmaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmaccel", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_exit_status_and_libvirt_guests(tmp_path: Path) -> None:
    import_libvirt()
    config = tmp_path / "k.toml"
    config.write_text("strict = true\n")
    libvirt = tmp_path / "libvirt"
    libvirt.mkdir()
    qemu_conf = tmp_path / "qemu.conf"  # the host's own could hold a problem of its own
    qemu_conf.write_text('memory_backing_dir = "/dev/shm"\n')
    proc = _kvmaccel("doctor", "--libvirt-dir", str(libvirt), "--config", str(config),
                     "--qemu-conf", str(qemu_conf), "--uri", "test:///default")
    # Warnings only (no hook installed, a guest kvmaccel does not serve): exit 0.
    assert not [x for x in proc.stdout.splitlines() if x.startswith("FAIL")], proc.stdout
    assert proc.returncode == 0, proc.stderr
    # libvirt's test driver defines one guest, "test", in anonymous memory.
    assert "guests: test: not served: anonymous memory" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("warning(s)")
    config.write_text("strict = maybe\n")
    proc = _kvmaccel("doctor", "--libvirt-dir", str(libvirt), "--config", str(config),
                     "--no-guests")
    assert proc.returncode == 1
    assert any(x.startswith("FAIL  config: ") for x in proc.stdout.splitlines()), proc.stdout
    assert os.listdir(libvirt) == []  # doctor changes nothing


def test_the_keeper_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "kvmaccel.toml"
    config.write_text(f'run_dir = "{run_dir}"\n')
    inp = doctor.DoctorInput(root=str(tmp_path), config_path=str(config))
    (line,) = doctor.check_keeper(inp)
    assert line.status == doctor.INFO and "kvmaccel pool keep --install-unit" in line.message
    run_dir.mkdir()
    (run_dir / "pool-keep.pid").write_text(f"{os.getpid()}\n")
    (line,) = doctor.check_keeper(inp)
    assert line.status == doctor.OK and f"(pid {os.getpid()})" in line.message
    unit = tmp_path / "etc/systemd/system/kvmaccel-pool-keep.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    (line,) = doctor.check_keeper(inp)
    assert line.status == doctor.OK and "systemd unit" in line.message
