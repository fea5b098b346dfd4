"""``kvmaccel pool keep``: keep the pool warm before guests need it.

A pool file otherwise exists only after a guest started once, or after someone ran
``kvmaccel pool fill``: after every host boot each guest's first start was a fresh populate.
The keeper makes the pool what its targets say it should be, one pass at a time:

1. **Targets.**  The config's ``[[pool.keep]]`` entries (size, page size, filesystem, nodes,
   policy, count), and, with ``[pool] keep_domains`` (the default), one file for every
   backend kvmaccel would populate of every persistent domain libvirt knows, autostart ones
   first, each planned as its next start would be (libvirt-python, read-only).
2. **Scrub** every dirty file (nothing found after a reboot, when every state under /run is
   gone, is ever served before a scrub has zeroed it: a file with no state is dirty).
3. **Give back** clean, unreserved files no target needs any more.
4. **Fill** what is missing, at nice 19, within the pool's limits (``max_mib``,
   ``max_node_mib``) and never into the free floor: ``keep_free_mib`` of each page size on
   each node (default a tenth of the node's pages of that size) stays free for everything
   that is not kvmaccel's (other guests, DPDK, QEMU's own allocations).

Every action is one log line saying what and why.  ``--once`` does one pass (tests, cron,
boot); ``--daemon`` detaches (:mod:`kvmaccel.setup.keeper`) and repeats every ``--interval``
seconds with a pidfile, until SIGTERM; ``--install-unit`` writes a systemd unit that runs it
in the foreground.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .. import safefs
from ..errors import KvmaccelError, UnsafePathError, UsageError
from ..host.facts import HostFacts, Mount, read_host
from ..model.units import format_size
from ..plan.config import HookConfig, KeepTarget
from ..plan.limits import Limits
from .discovery import existing_pools, refused_line
from .manage import Pool, PoolError, PoolKey, key_for, pool_dir_for

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0
UNIT_PATH = "/etc/systemd/system/kvmaccel-pool-keep.service"
FLOOR_FRACTION = 10  # the default floor: a tenth of each node's pages of each size


@dataclass(frozen=True)
class Target:
    """``count`` files of ``key`` in the pool ``pool_dir``, and why (``source``)."""

    pool_dir: str
    key: PoolKey
    count: int
    source: str


def config_targets(entries: Sequence[KeepTarget], host: HostFacts) -> list[Target]:
    """The ``[[pool.keep]]`` entries as targets.  Raises :class:`UsageError` for an entry no
    mount can hold."""
    targets = []
    for i, entry in enumerate(entries):
        directory = entry.directory or _mount_for(entry.page_size_kib, host.mounts)
        page_kib = entry.page_size_kib or host.base_page_size_kib
        key = key_for(entry.size_bytes, page_kib, entry.nodes, entry.policy)
        targets.append(Target(pool_dir_for(directory, host.mounts), key, entry.count,
                              f"[[pool.keep]] {i + 1}"))
    return targets


def _mount_for(page_kib: int | None, mounts: Sequence[Mount]) -> str:
    if page_kib is None:
        return "/dev/shm"
    for mount in mounts:
        if mount.fs_type == "hugetlbfs" and mount.page_size_kib == page_kib:
            return mount.path
    raise UsageError(f"[[pool.keep]]: no hugetlbfs mount with {page_kib} KiB pages; mount one "
                     "or give dir")


def domain_targets(config: HookConfig, host: HostFacts, uri: str) -> list[Target]:
    """A file for every backend kvmaccel would populate, per persistent domain of ``uri``,
    autostart domains first.  A domain that cannot be planned is logged and skipped."""
    import libvirt  # only here: the keeper without domains needs no libvirt

    from ..model.domain import parse_domain
    from ..plan.forhost import for_host

    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        raise KvmaccelError(f"cannot reach libvirt at {uri}: {e.get_error_message()}; start "
                            "libvirtd, or set keep_domains = false") from None
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
        domains.sort(key=lambda d: (not d.autostart(), d.name()))
        planning = for_host(config, host=host)  # as the hook plans: the front, tuning, energy
        targets = []
        for dom in domains:
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
                plan = planning.plan(parse_domain(xml))
            except (KvmaccelError, libvirt.libvirtError) as e:
                log.info("keep: domain %s: not planned (%s)", dom.name(), e)
                continue
            for backend in plan.populated:
                assert backend.file_path is not None  # a memfd through the front: no mem_path
                try:
                    pool_dir = pool_dir_for(backend.file_path, host.mounts)
                except UsageError:
                    continue
                key = key_for(backend.file_size_bytes, backend.page_size_kib,
                              backend.host_nodes or (), backend.policy)
                targets.append(Target(pool_dir, key, 1, f"domain {dom.name()}"))
        return targets
    finally:
        conn.close()


def floor_bytes(config: HookConfig, host: HostFacts, node: int | None, page_kib: int) -> int:
    """What must stay free of ``page_kib`` pages on ``node`` (None: host-wide)."""
    if config.pool_keep_free_bytes is not None:
        return config.pool_keep_free_bytes
    if page_kib == host.base_page_size_kib:
        total = (host.nodes[node].mem_total_kib * 1024 if node is not None
                 else sum(n.mem_total_kib for n in host.nodes.values()) * 1024)
        return total // FLOOR_FRACTION
    pools = host.hugepages if node is None else host.nodes[node].hugepages
    pool = pools.get(page_kib)
    return (pool.nr_pages * page_kib * 1024 // FLOOR_FRACTION) if pool else 0


def above_floor(key: PoolKey, config: HookConfig, host: HostFacts) -> str | None:
    """None when one more file of ``key`` leaves every floor intact, else why not."""
    for node, length in key.node_bytes().items():
        free = host.free_bytes(node, key.page_size_kib)
        floor = floor_bytes(config, host, node, key.page_size_kib)
        if free - length < floor:
            where = "host-wide" if node is None else f"on node {node}"
            return (f"{format_size(free)} of {format_size(key.page_size_kib * 1024)} pages free "
                    f"{where}; another {format_size(length)} would go below the "
                    f"{format_size(floor)} kept free (keep_free_mib)")
    return None


def keep_once(config: HookConfig, targets: Iterable[Target], limits: Limits | None = None,
              cancel: threading.Event | None = None) -> list[str]:
    """One pass: scrub, give back, fill.  Returns the actions taken, one line each (also
    logged).  A fill the floor or the pool's limits refuse is an action too ("not filling")."""
    actions: list[str] = []

    def act(line: str) -> None:
        actions.append(line)
        log.info("keep: %s", line)

    wanted: Counter[tuple[str, PoolKey]] = Counter()
    sources: dict[tuple[str, PoolKey], str] = {}
    for t in targets:
        wanted[(t.pool_dir, t.key)] += t.count
        sources.setdefault((t.pool_dir, t.key), t.source)
    host = read_host()
    pool_dirs = {d for d, _ in wanted} | set(existing_pools(host.mounts))
    for pool_dir in sorted(pool_dirs):
        pool = Pool(pool_dir, max_bytes=config.pool_max_bytes,
                    max_node_bytes=config.pool_max_node_bytes)
        try:
            _keep_pool(pool, config, host, wanted, sources, limits, cancel, act)
        except UnsafePathError as e:  # not kvmaccel's directory: the other pools go on
            log.warning("keep: %s", refused_line(e))
    return actions


def _keep_pool(pool: Pool, config: HookConfig, host: HostFacts,
               wanted: Counter[tuple[str, PoolKey]], sources: dict[tuple[str, PoolKey], str],
               limits: Limits | None, cancel: threading.Event | None,
               act: Callable[[str], None]) -> None:
    """One pass on one pool (:func:`keep_once`).  Raises :class:`UnsafePathError` for a
    pool directory that is not kvmaccel's."""
    pool_dir = pool.directory
    pool.check()
    for entry in pool.scrub(host, limits):
        act(f"scrubbed {entry.path} ({format_size(entry.key.size_bytes)})")
    have: Counter[PoolKey] = Counter()
    for entry in pool.entries():
        if entry.state == "bad":
            continue
        key = entry.key._replace(reserved_uuid=None)
        if entry.state == "clean" and entry.key.reserved_uuid is None and \
                have[key] >= wanted[(pool_dir, key)]:
            if pool.give_back_unused(entry):
                act(f"gave back {entry.path}: no target needs it")
            continue
        have[key] += 1
    for (where, key), count in sorted(wanted.items(), key=lambda kv: kv[0][1]):
        if where != pool_dir:
            continue
        for _ in range(count - have[key]):
            host = read_host()
            why = above_floor(key, config, host)
            if why:
                act(f"not filling {_shape(key)} in {pool_dir} for {sources[(where, key)]}: "
                    f"{why}")
                break
            try:
                (result,) = pool.fill(key, 1, host, limits, cancel=cancel)
            except PoolError as e:
                act(f"not filling {_shape(key)} in {pool_dir}: {e}")
                break
            act(f"filled {_shape(key)} in {pool_dir} for {sources[(where, key)]} in "
                f"{result.seconds:.2f} s")


def _shape(key: PoolKey) -> str:
    nodes = ",".join(map(str, key.host_nodes)) or "any node"
    return f"{format_size(key.size_bytes)} of {format_size(key.page_size_kib * 1024)} pages " \
           f"({nodes})"


# --- running as a service -----------------------------------------------------------------

def run_forever(config: HookConfig, make_targets: Callable[[], list[Target]],
                interval_s: float, limits: Limits | None = None,
                stop: threading.Event | None = None) -> None:
    """Pass after pass every ``interval_s`` seconds until ``stop`` is set (SIGTERM and SIGINT
    set it, from the main thread).  A pass that fails is logged; the next one runs."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    while not stop.is_set():
        try:
            keep_once(config, make_targets(), limits, cancel=stop)
        except (KvmaccelError, OSError) as e:
            log.warning("keep: pass failed: %s; trying again in %g s", e, interval_s)
        stop.wait(interval_s)


def unit_text(python: str, config_path: str | None) -> str:
    config = f" --config {config_path}" if config_path else ""
    return f"""[Unit]
Description=kvmaccel: keep the warm pool of guest memory filled and scrubbed
After=libvirtd.service virtqemud.service

[Service]
Type=simple
ExecStart={python} -m kvmaccel pool keep{config}
Nice=19
CPUWeight=idle
IOSchedulingClass=idle
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def install_unit(config_path: str | None, path: str = UNIT_PATH) -> str:
    """Write the systemd unit (running this Python's kvmaccel), 0644, atomically into its
    directory of root's (:func:`kvmaccel.safefs.write_atomic`); return its path.  Raises
    :class:`OSError`, :class:`UnsafePathError`."""
    safefs.write_atomic(path, unit_text(sys.executable, config_path), mode=0o644,
                        durable=True, own=False)
    return path
