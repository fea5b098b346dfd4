"""kvmaccel.bench.start and kvmaccel.bench.virsh: the pure parts (XML, qemu.conf, the table)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmaccel.bench.start import (
    StartResult,
    _check_room,
    configurations,
    domain_xml,
    format_table,
)
from kvmaccel.bench.virsh import render_qemu_conf
from kvmaccel.errors import CapacityError
from kvmaccel.host.facts import HugePagePool, read_host
from kvmaccel.model.domain import parse_domain

SYSFS = Path(__file__).resolve().parent / "data" / "sysfs"


def test_configurations_and_their_xml() -> None:
    configs = {c.name: c for c in configurations(2, "/dev/hugepages", "/dev/shm", [2 << 30])}
    assert len(configs) == 42 and "kvmaccel-shm+locked" in configs
    assert configs["kvmaccel-restart-shm"].restart and configs["kvmaccel-restart-shm"].pool
    gig = parse_domain(domain_xml(configs["kvmaccel-front-pool-1g"], "g", 8 << 30))
    assert configs["kvmaccel-front-pool-1g"].front and configs["kvmaccel-front-pool-1g"].pool
    assert [p.size_kib for p in gig.memory_backing.hugepages or ()] == [1 << 20]
    assert configs["kvmaccel-pool-shm@2G"].guest_bytes(8 << 30) == 2 << 30
    assert configs["kvmaccel-pool-hugetlbfs+locked"].pool
    locked = configs["qemu-hugepages-2+locked"]
    xml = domain_xml(locked, "g", 8 << 30)
    d = parse_domain(xml)
    assert d.memory_bytes == 8 << 30 and d.memory_backing.allocation_threads == 2
    assert "mem-lock=on" in xml
    assert locked.qemu_conf() == {"user": "root", "group": "root", "hugetlbfs_mount":
                                  "/dev/hugepages", "clear_emulator_capabilities": 0}
    hook = configs["kvmaccel-hugetlbfs"]
    d = parse_domain(domain_xml(hook, "g", 1 << 30))
    assert d.memory_backing.source_type == "file" and d.memory_backing.access_mode == "shared"
    assert d.memory_backing.allocation_threads is None
    assert hook.qemu_conf() == {"memory_backing_dir": "/dev/hugepages"}
    for name in ("kvmaccel-front", "kvmaccel-front-pool+locked"):
        through = configs[name]
        d = parse_domain(domain_xml(through, "g", 1 << 30))
        assert d.emulator == "/usr/bin/qemu-system-x86_64-kvmaccel"
        assert d.memory_backing.hugepages is not None and through.hook
        assert through.qemu_conf()["hugetlbfs_mount"] == "/dev/hugepages"
    assert configs["kvmaccel-front-pool"].pool
    # The filler's configurations: the same XML as QEMU's own at the same threads.
    same = configs["kvmaccel-front-2"]
    assert same.overlap and same.front and same.threads == configs["qemu-hugepages-2"].threads
    assert domain_xml(same, "g", 1 << 30).replace(
        "/usr/bin/qemu-system-x86_64-kvmaccel", "/usr/bin/qemu-system-x86_64") == domain_xml(
        configs["qemu-hugepages-2"], "g", 1 << 30)
    assert not configs["kvmaccel-front-before"].overlap
    assert configs["kvmaccel-front-restart"].restart and configs["kvmaccel-front-restart"].front


def test_qemu_conf_settings_replace_earlier_ones() -> None:
    text = render_qemu_conf('# c\nmemory_backing_dir = "/x"\nuser = "qemu"\n',
                            {"memory_backing_dir": "/dev/shm", "clear_emulator_capabilities": 0})
    assert '#kvmaccel# memory_backing_dir = "/x"' in text and 'user = "qemu"' in text
    assert text.endswith('memory_backing_dir = "/dev/shm"\nclear_emulator_capabilities = 0\n')


def test_table_ratios() -> None:
    configs = {c.name: c for c in configurations(2, "/dev/hugepages")}
    results = [StartResult(configs["qemu-shm-2"], [4.0, 6.0, 5.0]),
               StartResult(configs["qemu-hugepages-2"], [1.0]),
               StartResult(configs["kvmaccel-shm"], [4.0], [3.0]),
               StartResult(configs["kvmaccel-hugetlbfs"], [], error="boom"),
               StartResult(configs["kvmaccel-pool-shm"], [0.5]),
               StartResult(configs["kvmaccel-restart-shm"], [0.6])]
    table = format_table(results, 8 << 30, 2)
    assert "| qemu-shm-2 | 5.00 | - | - | 5.00x | - |" in table
    assert "| kvmaccel-shm | 4.00 | 3.00 | - | 4.00x | 0.80x |" in table
    assert "failed: boom" in table
    assert "| kvmaccel-restart-shm | 0.60 | - | - | 0.60x | 1.20x of kvmaccel-pool-shm |" in table


def test_room_counts_free_pages_less_the_reserved() -> None:
    """Pages promised to mappings that exist (resv_hugepages) are not there for a new guest:
    the bench counted free_hugepages alone, where every start (the engine) counts them out,
    so it went on to a start that then failed."""
    config = configurations(2, "/dev/hugepages", "/dev/shm", [])
    hugepages = [c for c in config if c.name == "qemu-hugepages-2"]
    host = read_host(str(SYSFS / "two-node"))
    free_60_resv = dataclasses.replace(host, hugepages={
        **host.hugepages, 2048: HugePagePool(2048, 100, 100, reserved_pages=60)})
    _check_room(80 << 20, hugepages, "/dev/hugepages", free_60_resv)  # 40 pages of 40
    with pytest.raises(CapacityError, match=r"a 100M bench guest needs 100M of 2M pages "
                       r"host-wide but only 80M is free \(free_hugepages - resv_hugepages"
                       r".*; or choose a smaller --size"):
        _check_room(100 << 20, hugepages, "/dev/hugepages", free_60_resv)
