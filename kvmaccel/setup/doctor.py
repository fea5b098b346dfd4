"""``kvmaccel doctor``: is this host ready for kvmaccel, finding by finding.

Each check is a small function of a :class:`DoctorInput` that returns :class:`Finding` values;
:data:`CHECKS` lists them in the order they print.  A new check (the emulator front's, a pool
keeper's) is one more function in that list.  A finding is one line: what is, and when it is
not right, what to do.  ``fail`` means kvmaccel cannot do its job as set up (the CLI exits 1);
``warn`` means it works but something is likely not what the operator wants; ``ok`` and
``info`` only report.

Nothing here changes the host.  The domain XMLs of the defined guests come from the caller
(the CLI reads them through libvirt, read-only): this module never calls libvirt's API,
since it sits in the hook's layer and a hook must never call it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import __version__
from ..engine import records
from ..errors import KvmaccelError
from ..host.facts import HostFacts, Mount, SecurityFacts, read_host, read_security
from ..model.domain import parse_domain
from ..model.qemuconf import QemuConf, parse_virconf
from ..model.units import format_size
from ..plan.config import HookConfig, read_config
from ..plan.forhost import for_host, host_qemu_conf
from ..plan.planner import POPULATABLE_FS
from . import install as hook_install

FRONT_PATH = "/usr/bin/qemu-system-x86_64-kvmaccel"
OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    check: str  # what was checked: "hugetlbfs", "qemu.conf", "hook", ...
    status: str  # OK, INFO, WARN or FAIL
    message: str  # one line: what is, and what to do when it is not right


@dataclass(frozen=True)
class DoctorInput:
    """What the checks look at.  ``domains``: (name, XML) of every defined guest, or None
    when they could not be read (``domains_note`` says why)."""

    root: str = "/"
    libvirt_dir: str = hook_install.DEFAULT_LIBVIRT_DIR
    qemu_conf_path: str | None = None  # None: the config's, else <root>/etc/libvirt/qemu.conf
    config_path: str | None = None
    front_path: str = FRONT_PATH
    domains: Sequence[tuple[str, str]] | None = None
    domains_note: str = "libvirt was not asked"
    record_file: str | None = None  # None: $KVMACCEL_RECORD_FILE, else the config's
    host: HostFacts | None = field(default=None, compare=False)

    def host_facts(self) -> HostFacts:
        return self.host if self.host is not None else read_host(self.root)


Check = Callable[[DoctorInput], list[Finding]]


def check_kvmaccel(inp: DoctorInput) -> list[Finding]:
    return [Finding("kvmaccel", OK, f"kvmaccel {__version__}, Python {sys.version.split()[0]} "
                                   f"({sys.executable}), from {os.path.dirname(__file__)}")]


def check_config(inp: DoctorInput) -> list[Finding]:
    try:
        cfg = read_config(inp.config_path)
    except KvmaccelError as e:
        return [Finding("config", FAIL, f"{e}; fix the file (keys: kvmaccel/plan/config.py): "
                                        "the hook fails open and populates nothing")]
    where = cfg.path or f"{inp.config_path or 'the default config'} (absent: defaults)"
    status = OK if cfg.enabled else WARN
    advice = "" if cfg.enabled else "; set enabled = true for the hook to act"
    return [Finding("config", status, f"{where}: enabled = {str(cfg.enabled).lower()}, strict "
                                      f"= {str(cfg.strict).lower()}, pool "
                                      f"{'on' if cfg.pool_enabled else 'off'}{advice}")]


def _hugepages_dirs_not_hugetlbfs(mounts: Sequence[Mount], root: str) -> list[str]:
    mounted = {m.path for m in mounts if m.fs_type == "hugetlbfs"}
    found = []
    for path in ("/dev/hugepages", "/hugepages", "/mnt/hugepages"):
        if path not in mounted and os.path.isdir(os.path.join(root, path.lstrip("/"))):
            found.append(path)
    return found


def check_hugetlbfs(inp: DoctorInput) -> list[Finding]:
    host = inp.host_facts()
    findings = []
    mounts = [m for m in host.mounts if m.fs_type == "hugetlbfs"]
    if not mounts:
        findings.append(Finding("hugetlbfs", WARN, "no hugetlbfs mount: guests can only use "
                                "4K tmpfs pages; mkdir -p /dev/hugepages && mount -t hugetlbfs "
                                "-o pagesize=2M none /dev/hugepages"))
    for m in mounts:
        findings.append(Finding("hugetlbfs", OK, f"{m.path}: hugetlbfs "
                                f"{format_size((m.page_size_kib or 0) * 1024)} pages"))
    for path in _hugepages_dirs_not_hugetlbfs(host.mounts, inp.root):
        findings.append(Finding("hugetlbfs", WARN, f"{path} is a directory but no hugetlbfs is "
                                "mounted there: files made in it are 4K pages on its parent's "
                                f"filesystem; mount -t hugetlbfs -o pagesize=2M none {path}"))
    for size_kib, pool in sorted(host.hugepages.items()):
        per_node = ", ".join(
            f"node{n} {node.hugepages[size_kib].free_pages}/{node.hugepages[size_kib].nr_pages}"
            for n, node in sorted(host.nodes.items()) if size_kib in node.hugepages)
        size = format_size(size_kib * 1024)
        served = any(m.page_size_kib == size_kib for m in mounts)
        line = (f"{size} pages: {pool.free_pages} free of {pool.nr_pages}"
                + (f" (free/total {per_node})" if per_node else ""))
        if pool.nr_pages and not served:
            findings.append(Finding("hugepages", WARN, f"{line}, but no hugetlbfs mount has "
                                    f"pagesize={size}; mount one to use them"))
        elif served and not pool.nr_pages:
            findings.append(Finding("hugepages", WARN, f"{line}: a mount uses {size} pages but "
                                    "none are reserved; echo N > /sys/kernel/mm/hugepages/"
                                    f"hugepages-{size_kib}kB/nr_hugepages"))
        else:
            findings.append(Finding("hugepages", OK if pool.nr_pages else INFO, line))
    return findings


def _config(inp: DoctorInput) -> HookConfig:
    """The config, or the defaults when it cannot be read (``check_config`` says why)."""
    try:
        return read_config(inp.config_path)
    except KvmaccelError:
        return HookConfig()


def _qemu_conf(inp: DoctorInput) -> QemuConf:
    return host_qemu_conf(_config(inp), inp.qemu_conf_path, inp.root)


def check_qemu_conf(inp: DoctorInput) -> list[Finding]:
    try:
        conf = _qemu_conf(inp)
    except KvmaccelError as e:
        return [Finding("qemu.conf", FAIL, f"{e}")]
    host = inp.host_facts()
    where = conf.path or "libvirt's defaults (no qemu.conf)"
    findings = []
    mount = host.mount_of(conf.memory_backing_dir)
    fs = mount.fs_type if mount else "an unknown filesystem"
    if mount and mount.fs_type in POPULATABLE_FS:
        page = format_size((mount.page_size_kib or host.base_page_size_kib) * 1024)
        findings.append(Finding("qemu.conf", OK, f"memory_backing_dir: guests with <source "
                                f"type='file'/> get files under {conf.memory_backing_dir} "
                                f"({fs} {page})"))
    else:
        findings.append(Finding("qemu.conf", WARN, f"memory_backing_dir "
                                f"{conf.memory_backing_dir} is on {fs}: kvmaccel populates no "
                                "file-backed guest there; set memory_backing_dir = "
                                '"/dev/hugepages" (or "/dev/shm") in ' + where))
    if conf.hugetlbfs_mount is not None:
        for path in conf.hugetlbfs_mount:
            m = host.mount_of(path)
            if m is None or m.path != path.rstrip("/") or m.fs_type != "hugetlbfs":
                findings.append(Finding("qemu.conf", FAIL, f"hugetlbfs_mount {path} is not a "
                                        "hugetlbfs mount: libvirt refuses <hugepages/> guests; "
                                        "mount it or fix " + where))
    settings: dict[str, object] = {}
    if conf.path:
        try:
            with open(conf.path, encoding="utf-8") as f:
                settings = dict(parse_virconf(f.read(), conf.path))
        except (OSError, KvmaccelError):
            settings = {}
    drivers = settings.get("security_driver", "default (AppArmor on Debian)")
    findings.append(Finding("qemu.conf", INFO, f"{where}: QEMU runs as {conf.user}:"
                            f"{conf.group}; security_driver {drivers}"))
    return findings


def check_hook(inp: DoctorInput) -> list[Finding]:
    try:
        st = hook_install.status(inp.libvirt_dir)
    except KvmaccelError as e:
        return [Finding("hook", FAIL, str(e))]
    if not st.installed:
        return [Finding("hook", WARN, f"not installed ({st.path}): guests start without "
                                      "kvmaccel; kvmaccel hook install")]
    if not st.ours:
        return [Finding("hook", FAIL, f"{st.path} was not written by kvmaccel; move it away, "
                                      "then kvmaccel hook install")]
    info = st.info or {}
    findings = []
    if not st.python_ok:
        findings.append(Finding("hook", FAIL, f"{st.path} runs {st.python}, which is missing: "
                                              "kvmaccel hook install (or scripts/install.sh)"))
    else:
        version = info.get("version")
        stale = version != __version__
        findings.append(Finding("hook", WARN if stale else OK,
                                f"installed: {st.path}, kvmaccel {version}, python {st.python}"
                                + ("; reinstall: kvmaccel hook install" if stale else "")))
        if not _passes_started(st.path):
            findings.append(Finding("hook", WARN, f"{st.path} predates `started begin`: a "
                                    "filler is then stopped only by itself, not when the guest "
                                    "starts; reinstall: kvmaccel hook install"))
    for line in hook_install.notice_advice(st.mtime_unix):
        if "runs a new hook only after" in line:
            findings.append(Finding("hook", WARN, line))
    return findings


def _passes_started(path: str) -> bool:
    """The installed script runs kvmaccel at ``started begin`` (scripts written before it
    stopped the filler there exit 0 at once)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return True  # unreadable: status() said so already
    _, found, rest = text.partition('case "$2 $3" in\n')
    return not found or '"started begin"' in rest.split("\n", 1)[0]


def check_front(inp: DoctorInput) -> list[Finding]:
    if os.path.lexists(inp.front_path):
        return [Finding("front", OK, f"installed: {inp.front_path}")]
    return [Finding("front", INFO, "not installed (kvmaccel front install)")]


def check_keeper(inp: DoctorInput) -> list[Finding]:
    """The pool keeper: a systemd unit, or a --daemon whose pidfile names a live process."""
    from ..plan.config import read_config
    from ..pool.keep import UNIT_PATH

    unit = os.path.join(inp.root, UNIT_PATH.lstrip("/"))
    if os.path.exists(unit):
        return [Finding("keeper", OK, f"systemd unit {UNIT_PATH} installed (is it enabled? "
                        "systemctl is-enabled kvmaccel-pool-keep)")]
    try:
        pidfile = os.path.join(read_config(inp.config_path).run_dir, "pool-keep.pid")
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError, KvmaccelError):
        return [Finding("keeper", INFO, "not running: a guest's first start after boot is a "
                        "fresh populate (kvmaccel pool keep --install-unit, or --daemon)")]
    return [Finding("keeper", OK, f"kvmaccel pool keep --daemon runs (pid {pid})")]


def check_security(inp: DoctorInput) -> list[Finding]:
    sec: SecurityFacts = read_security(inp.root)
    findings = []
    if sec.apparmor_enabled:
        findings.append(Finding("apparmor", INFO, "enabled: libvirt confines each QEMU to its "
                                "domain's profile, which may run only qemu-system-* and read "
                                "its own memory directories (the hook itself is unconfined)"))
    else:
        findings.append(Finding("apparmor", INFO, "not enabled in this kernel" if
                                sec.apparmor_enabled is None else "disabled"))
    if sec.selinux_enforcing is not None:
        findings.append(Finding("selinux", INFO, "enforcing: files kvmaccel links into a "
                                "guest's directory get libvirt's labels at start"
                                if sec.selinux_enforcing else "permissive"))
    return findings


def check_records(inp: DoctorInput) -> list[Finding]:
    path = inp.record_file or records.record_file()
    starts = [r for r in records.read(path) if r.get("event") == "start"]
    if not starts:
        return [Finding("records", INFO, f"{path}: no start recorded yet (`kvmaccel metrics` "
                                         "reads it)")]
    failed = [r for r in starts if r.get("result") != "ok"]
    last = starts[-1]
    status = WARN if last.get("result") != "ok" else OK
    return [Finding("records", status, f"{path}: {len(starts)} start(s), {len(failed)} not ok; "
                    f"the last: {last.get('domain')} {last.get('result')}"
                    + (f" ({last.get('reason')}); see the hook's log" if status == WARN else ""))]


def check_guests(inp: DoctorInput) -> list[Finding]:
    if inp.domains is None:
        return [Finding("guests", INFO, f"not checked: {inp.domains_note}")]
    if not inp.domains:
        return [Finding("guests", INFO, "no guest is defined")]
    try:  # as the hook plans them: the config's qemu.conf and limits, the front, tuning, energy
        planning = for_host(read_config(inp.config_path), root=inp.root,
                            host=inp.host_facts(), qemu_conf=inp.qemu_conf_path)
    except KvmaccelError as e:
        return [Finding("guests", FAIL, f"cannot plan guests: {e}")]
    findings = []
    for name, xml in inp.domains:
        try:
            plan = planning.plan(parse_domain(xml))
        except KvmaccelError as e:
            findings.append(Finding("guests", WARN, f"{name}: not served: {e}"))
            continue
        served = plan.populated
        if served:
            total = sum(b.size_bytes for b in served)
            kinds = sorted({f"{b.filesystem} {format_size(b.page_size_kib * 1024)}"
                            for b in served})
            short = [c for c in plan.capacity if not c.ok]
            findings.append(Finding(
                "guests", WARN if short else OK,
                f"{name}: served, {format_size(total)} in {len(served)} backend(s) on "
                f"{', '.join(kinds)}" + (f"; but only {format_size(short[0].available_bytes)} of "
                                        f"{format_size(short[0].needed_bytes)} is free now"
                                        if short else "")))
        else:
            reasons = sorted({b.skip_reason for b in plan.backends if b.skip_reason})
            findings.append(Finding("guests", INFO, f"{name}: not served: "
                                    + ("; ".join(reasons) or "it has no memory backend")))
    return findings


CHECKS: list[Check] = [check_kvmaccel, check_config, check_hugetlbfs, check_qemu_conf,
                       check_hook, check_front, check_keeper, check_security, check_records,
                       check_guests]


def run(inp: DoctorInput, checks: Sequence[Check] = CHECKS) -> list[Finding]:
    """Every check's findings, in order.  A check that raises becomes one ``fail`` line."""
    findings: list[Finding] = []
    for check in checks:
        try:
            findings.extend(check(inp))
        except (KvmaccelError, OSError) as e:
            findings.append(Finding(check.__name__.removeprefix("check_"), FAIL,
                                    f"could not check: {e}"))
    return findings
