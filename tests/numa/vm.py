"""Boot the two-node NUMA guest once and collect what the tests inside it found.

The guest is Debian's own kernel (``scripts/numa-kernel.sh`` unpacks it into a cache, nothing
is installed) booted by virtme-ng (``vng``, PyPI ``virtme-ng``) under QEMU's TCG:

* two NUMA nodes of 4 GiB, with CPUs 0-1 on node 0 and 2-3 on node 1;
* one boot-time 1 GiB page on each node (``hugepages=0:1,1:1``).  ``nokaslr`` is needed:
  with a randomised kernel base both pages can end up on one node;
* the host's root shared read-only over 9p, so the checkout and its ``.venv`` are there as on
  the host, and one host directory shared read-write, where ``guest.sh`` leaves junit XML,
  logs and exit codes.  ``vng`` itself exits 255 whatever the guest did, and without
  ``--verbose`` the guest's console is lost, so the results travel only through that directory.

TCG, not KVM: on the machines this was built on ``/dev/kvm`` is a paravirtual KVM for nested
clouds (``kvm_pvm``) that cannot boot an unmodified kernel, and TCG works everywhere.  It boots
in 6-10 s; a Python start inside costs seconds, so ``guest.sh`` runs every check in one pytest
process.  The guest's RAM is anonymous memory of the QEMU process on the host: only what
the tests touch (about 3 GiB) is ever allocated.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
KERNEL_CACHE = "/var/cache/kvmaccel-test/kernel"
MEMORY = "8G"
NUMA = ("4G,cpus=0-1", "4G,cpus=2-3")
CPUS = 4
APPEND = "nokaslr hugepagesz=1G hugepages=0:1,1:1"
TIMEOUT_S = 600  # a quiet machine needs 90-160 s


def find_kernel() -> str | None:
    """The guest kernel image: ``$KVMACCEL_NUMA_KERNEL`` (set by scripts/test.sh), else the
    newest one ``scripts/numa-kernel.sh`` left in its cache."""
    image = os.environ.get("KVMACCEL_NUMA_KERNEL")
    if image:
        return image if os.path.isfile(image) else None
    found = sorted(glob.glob(f"{KERNEL_CACHE}/linux-image-*/boot/vmlinuz-*"))
    return found[-1] if found else None


def find_vng() -> str | None:
    """vng from the venv running the tests, else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "vng")
    return beside if os.access(beside, os.X_OK) else shutil.which("vng")


def missing_tools() -> list[str]:
    """What the guest needs on the host beyond vng and the kernel (apt packages)."""
    wanted = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
              "modprobe": "kmod"}
    return [pkg for prog, pkg in wanted.items() if shutil.which(prog) is None
            and not os.path.exists(f"/usr/sbin/{prog}") and not os.path.exists(f"/sbin/{prog}")]


@dataclass
class Case:
    """One in-guest test case from junit XML."""

    module: str
    name: str
    outcome: str  # passed, failed, error, skipped, xfailed
    message: str
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class GuestRun:
    out_dir: str
    seconds: float
    cases: list[Case]
    problems: list[str]

    def log(self, name: str) -> str:
        path = os.path.join(self.out_dir, name)
        if not os.path.exists(path):
            return f"({name}: missing)"
        with open(path, errors="replace") as f:
            return f.read()


def read_junit(path: str) -> list[Case]:
    """Every testcase of a junit XML file (pytest's ``--junitxml``)."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = tc.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                if tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                message = (child.get("message") or "") + "\n" + (child.text or "")
                break
        props = {p.get("name", ""): p.get("value", "") for p in tc.iter("property")}
        cases.append(Case(tc.get("classname", "").rsplit(".", 1)[-1], tc.get("name", ""),
                          outcome, message.strip(), props))
    return cases


def boot(kernel: str, vng: str, out_dir: str, timeout_s: float = TIMEOUT_S) -> GuestRun:
    """Boot the guest, run ``guest.sh`` in it, and read back what it wrote to ``out_dir``."""
    env = dict(os.environ)
    # vng starts virtme-run, virtme-ng-init, busybox... found on PATH.
    env["PATH"] = os.path.dirname(vng) + os.pathsep + env.get("PATH", "")
    argv = [vng, "--run", kernel, "-m", MEMORY, "--cpus", str(CPUS)]
    for node in NUMA:
        argv += ["--numa", node]
    argv += ["--disable-kvm", "--force-9p", "--append", APPEND, f"--rwdir={out_dir}",
             "--verbose", "--exec", f"sh {HERE}/guest.sh {out_dir} {CHECKOUT}"]
    t0 = time.monotonic()
    problems = []
    with open(os.path.join(out_dir, "console.log"), "wb") as console:
        # vng runs QEMU as a child of its own: on a timeout, kill the whole process group.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, cwd=CHECKOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            problems.append(f"the guest did not finish within {timeout_s} s")
    seconds = time.monotonic() - t0
    cases = []
    xml_path = os.path.join(out_dir, "guest.xml")
    if os.path.exists(xml_path):
        cases = read_junit(xml_path)
    else:
        problems.append("the guest wrote no guest.xml (see console.log and guest.log)")
    return GuestRun(out_dir, seconds, cases, problems)


if __name__ == "__main__":  # by hand: python -m tests.numa.vm OUT_DIR
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "numa-out")
    os.makedirs(out, exist_ok=True)
    k, v = find_kernel(), find_vng()
    if not (k and v):
        sys.exit(f"kernel {k}, vng {v}: run scripts/numa-kernel.sh and pip install virtme-ng")
    r = boot(k, v, out)
    for c in r.cases:
        print(f"{c.outcome:8} {c.module}::{c.name} {c.properties or ''}")
    print(f"{r.seconds:.1f} s; problems: {r.problems or 'none'}")
