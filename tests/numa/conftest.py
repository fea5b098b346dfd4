"""The two-node NUMA test layer (see tests/numa/vm.py and README.md).

On the host, this directory holds tests that boot a real two-node guest once per session
(:func:`guest_run`) and report each test that ran inside it.  The in-guest tests themselves
(``guest/``) are collected only inside the guest, where ``guest.sh`` sets
``KVMACCEL_IN_NUMA_GUEST``.
"""

from __future__ import annotations

import os

import pytest

from ..conftest import need
from . import vm

collect_ignore = [] if os.environ.get("KVMACCEL_IN_NUMA_GUEST") == "1" else ["guest"]


@pytest.fixture(scope="session")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> vm.GuestRun:
    """Boot the guest once, run every in-guest test, return their results."""
    need(os.geteuid() == 0, "the NUMA guest needs root (it runs as root inside)")
    kernel = vm.find_kernel()
    need(kernel is not None, "no guest kernel: run scripts/numa-kernel.sh (the test command "
                             "does)")
    vng = vm.find_vng()
    need(vng is not None, "vng not found: pip install virtme-ng (pyproject's numa-test extra)")
    missing = vm.missing_tools()
    need(not missing, f"apt packages missing for the NUMA guest: {' '.join(missing)}")
    assert kernel is not None and vng is not None
    out = str(tmp_path_factory.mktemp("numa-guest"))
    run = vm.boot(kernel, vng, out)
    print(f"\nNUMA guest: {run.seconds:.1f} s, results in {out}")
    return run
