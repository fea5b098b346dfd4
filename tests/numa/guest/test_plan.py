"""On a real two-node kernel: the planner reads each node's free huge pages from /sys, and a
guest that fits host-wide but not on the node it is bound to is refused.

Node 0 keeps 256 free 2M pages, node 1 is cut to 64 (128 MiB).  The guest has two cells of
2M-page RAM in shared files under memory_backing_dir (a hugetlbfs): 128 MiB bound to node 0,
256 MiB bound to node 1.  Host-wide 640 MiB are free for its 384 MiB; node 1 lacks 128 MiB.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmaccel.libvirt import entry as hook_entry

from .conftest import MIB, record, set_node_hugepages

NAME = "numa-guest"
PAGE = 2 * MIB


def domain_xml(bound: bool) -> str:
    numatune = ("<numatune><memnode cellid='0' mode='strict' nodeset='0'/>"
                "<memnode cellid='1' mode='strict' nodeset='1'/></numatune>") if bound else ""
    return f"""<domain type='kvm' id='3'>
  <name>{NAME}</name><uuid>7d3c1a52-6a0e-4c1e-9d9b-2f7f0b1c2d3e</uuid>
  <memory unit='MiB'>384</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>2</vcpu>{numatune}
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu><numa>
    <cell id='0' cpus='0' memory='128' unit='MiB'/>
    <cell id='1' cpus='1' memory='256' unit='MiB'/>
  </numa></cpu>
</domain>"""


@pytest.fixture
def node1_short(mounts: dict[str, str], tmp_path: os.PathLike[str]) -> Iterator[str]:
    """Node 1 cut to 64 free 2M pages; yields a directory with the XMLs and qemu.conf."""
    assert set_node_hugepages(1, 2048, 64) == 64
    directory = str(tmp_path)
    with open(f"{directory}/qemu.conf", "w") as f:
        f.write(f'memory_backing_dir = "{mounts["2M"]}"\n')
    for bound in (True, False):
        with open(f"{directory}/{'bound' if bound else 'unbound'}.xml", "w") as f:
            f.write(domain_xml(bound))
    try:
        yield directory
    finally:
        set_node_hugepages(1, 2048, 256)


def plan(directory: str, xml: str) -> dict[str, object]:
    """``kvmaccel plan --root / --json`` (the command, in its own process)."""
    out = subprocess.run([sys.executable, "-m", "kvmaccel", "plan", "--root", "/", "--json",
                          "--qemu-conf", f"{directory}/qemu.conf", f"{directory}/{xml}"],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


def test_plan_reads_real_free_pages_per_node(
        node1_short: str, request: pytest.FixtureRequest) -> None:
    bound = plan(node1_short, "bound.xml")
    checks = {c["node"]: c for c in bound["capacity"]}  # type: ignore[attr-defined]
    record(request, "capacity", bound["capacity"])
    assert checks[0]["available_bytes"] == 256 * PAGE and checks[0]["ok"]
    assert checks[0]["needed_bytes"] == 128 * MIB
    assert checks[1]["available_bytes"] == 64 * PAGE and not checks[1]["ok"]
    assert checks[1]["needed_bytes"] == 256 * MIB


def test_hook_refuses_a_guest_that_fits_only_host_wide(
        node1_short: str, tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]
        ) -> None:
    config = f"{tmp_path}/kvmaccel.toml"
    with open(config, "w") as f:
        f.write(f'syslog = false\nlog_file = "{tmp_path}/hook.log"\nstrict = true\n'
                f'run_dir = "{os.environ["KVMACCEL_RUN_DIR"]}"\n'
                f'qemu_conf = "{node1_short}/qemu.conf"\n')
    with open(f"{node1_short}/bound.xml", "rb") as f:
        xml = f.read()
    assert hook_entry.main([NAME, "prepare", "begin", "-"], io.BytesIO(xml),
                          config_path=config) == 1
    err = capsys.readouterr().err
    assert "needs 256M of 2M pages on node 1 but only 128M is free" in err, err
    with open(f"{node1_short}/unbound.xml", "rb") as f:
        xml = f.read()
    assert hook_entry.main([NAME, "prepare", "begin", "-"], io.BytesIO(xml),
                          config_path=config) == 0, "the same guest, unbound, fits host-wide"
