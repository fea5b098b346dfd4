"""``kvmaccel pool fill|list|scrub|drain``: the warm pool by hand (see :mod:`kvmaccel.pool.manage`).

A thin layer: it finds the pools, builds :class:`~kvmaccel.pool.manage.PoolKey` values from options
or from a domain's plan, and delegates.  The pool's limits come from the ``[pool]`` table of
the config file, or from ``--max-bytes`` / ``--max-node-bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import paths
from ..errors import UnsafePathError, UsageError
from ..host.facts import HostFacts, read_host
from ..model.domain import parse_domain
from ..model.units import format_size, parse_page_size, parse_size
from ..plan.config import read_config
from ..plan.forhost import for_host
from ..pool.discovery import existing_pools, refused_line
from ..pool.manage import Pool, PoolKey, key_for, pool_dir_for, spawn_scrub
from ..safefs import private_dirs
from .common import (
    Seconds,
    cancel_on_signals,
    existing_dirs,
    limits_options,
    load_config,
    make_limits,
    parse_nodes,
    read_input,
)

log = logging.getLogger(__name__)


def _pool(directory: str, host: HostFacts, max_bytes: str | None,
          max_node_bytes: str | None) -> Pool:
    config = read_config()
    return Pool(
        pool_dir_for(directory, host.mounts),
        max_bytes=parse_size(max_bytes) if max_bytes is not None else config.pool_max_bytes,
        max_node_bytes=(parse_size(max_node_bytes) if max_node_bytes is not None
                        else config.pool_max_node_bytes))


def _page_of(directory: str, host: HostFacts) -> int:
    """The page size, in KiB, of the filesystem ``directory`` is on: its hugetlbfs mount's,
    or the base page size on tmpfs (what a pool file there is made of, whatever was asked)."""
    best = host.mount_of(directory)
    if best is not None and best.fs_type == "hugetlbfs" and best.page_size_kib:
        return best.page_size_kib
    return host.base_page_size_kib


def _all_pools(host: HostFacts, directories: tuple[str, ...]) -> list[Pool]:
    """The pools named, or every pool that exists on a hugetlbfs or tmpfs mount."""
    if directories:
        return [Pool(pool_dir_for(d, host.mounts)) for d in directories]
    return [Pool(path) for path in existing_pools(host.mounts)]


T = TypeVar("T")


def per_pool(host: HostFacts, directories: tuple[str, ...], work: Callable[[Pool], T]
             ) -> list[T]:
    """``work`` done on each pool of :func:`_all_pools`.  A pool whose directory is not
    kvmaccel's (another user made ``.kvmaccel-pool`` first on a world-writable tmpfs, a
    symlink, a file) is skipped with one warning line and the others are done; when it was
    named with ``--dir``, its refusal is then the command's error (exit 1)."""
    done: list[T] = []
    refused: list[UnsafePathError] = []
    for p in _all_pools(host, directories):
        try:
            p.check()
            done.append(work(p))
        except UnsafePathError as e:
            refused.append(e)
            if not directories:
                log.warning("%s", refused_line(e))
    if directories and refused:
        for earlier in refused[:-1]:
            log.warning("%s", refused_line(earlier))
        raise refused[-1]
    return done


def _enter_cgroup(name: str | None = None) -> None:
    """Fills, scrubs and the keeper run in the config's ``cgroup``, when it names one."""
    from ..engine.cgroup import enter

    name = read_config().cgroup if name is None else name
    if name:
        enter(name)


@click.group()
def pool() -> None:
    """Pre-populated, pre-zeroed backing files that guests start from."""


@pool.command()
@click.option("--size", help="Size of each file, e.g. 8G (not with --for).")
@click.option("--page-size", help="Huge page size (a hugetlbfs mount with it); default: "
              "base pages on /dev/shm.")
@click.option("--dir", "directory", callback=existing_dirs,
              help="A directory on the filesystem the pool is for.")
@click.option("--nodes", help="Host nodes the memory is bound to, e.g. 0 or 0,1.")
@click.option("--policy", type=click.Choice(["bind", "preferred", "interleave"]),
              default="bind", show_default=True)
@click.option("--count", type=click.IntRange(1, 1000), default=1, show_default=True)
@click.option("--for", "domain_xml", metavar="DOMAIN.xml",
              help="Fill one file per backend kvmaccel would populate for this domain "
                   "(- reads stdin).")
@click.option("--qemu-conf", type=click.Path(dir_okay=False), help="qemu.conf for --for.")
@click.option("--reserve", is_flag=True, help="With --for: reserve the files to that guest.")
@click.option("--max-bytes", help="Most the pool may hold (default: the config's).")
@click.option("--max-node-bytes", help="Most the pool may hold per node.")
@click.option("--json", "as_json", is_flag=True)
@limits_options
def fill(size: str | None, page_size: str | None, directory: str | None, nodes: str | None,
         policy: str, count: int, domain_xml: str | None, qemu_conf: str | None,
         reserve: bool, max_bytes: str | None, max_node_bytes: str | None, as_json: bool,
         **limit_args: Any) -> None:
    """Add COUNT clean files to a pool (of --size, or as a domain's plan says)."""
    if reserve and domain_xml is None:
        raise UsageError("--reserve reserves the files of --for DOMAIN.xml to that guest; give "
                         "--for, or drop --reserve")
    if domain_xml is not None and (size or page_size or nodes or directory):
        raise UsageError("--for takes sizes, pages, nodes and directories from the domain; "
                         "drop --size, --page-size, --nodes and --dir")
    for text in (max_bytes, max_node_bytes):
        if text is not None:
            parse_size(text)  # now, before anything is made
    _enter_cgroup()
    host = read_host()
    limits = make_limits(**limit_args)
    wanted: list[tuple[str, PoolKey]] = []
    if domain_xml is not None:
        domain = parse_domain(read_input(domain_xml))
        plan = for_host(read_config(), host=host, qemu_conf=qemu_conf,
                        limits=limits).plan(domain)
        for b in plan.populated:
            assert b.file_path is not None
            wanted.append((os.path.dirname(b.file_path), key_for(
                b.file_size_bytes, b.page_size_kib, b.host_nodes or (), b.policy,
                plan.uuid if reserve else None)))
        if not wanted:
            raise UsageError(f"{domain_xml}: kvmaccel populates none of this domain's memory "
                             "(see 'kvmaccel plan'); nothing to fill")
    else:
        if size is None:
            raise UsageError("give --size (e.g. --size 8G) or --for DOMAIN.xml")
        size_bytes = parse_size(size)
        asked = parse_page_size(page_size) if page_size is not None else None
        if directory is None:
            if asked is not None and asked != host.base_page_size_kib:
                mounts = [m for m in host.hugetlbfs_mounts if m.page_size_kib == asked]
                if not mounts:
                    raise UsageError(f"no hugetlbfs mount with {page_size} pages; mount one or "
                                     "give --dir")
                directory = mounts[0].path
            else:
                directory = "/dev/shm"
        # The file's pages are its filesystem's: a pool file keyed otherwise serves no guest.
        page_kib = _page_of(directory, host)
        if asked is not None and asked != page_kib:
            raise UsageError(f"--page-size {page_size}: {directory} is on a filesystem of "
                             f"{format_size(page_kib * 1024)} pages; give --page-size "
                             f"{format_size(page_kib * 1024)}, or --dir on a hugetlbfs of "
                             f"{page_size} pages")
        node_list = parse_nodes(nodes)
        wanted.append((directory, key_for(size_bytes, page_kib, node_list, policy)))
    report = []
    for where, key in wanted:
        target = _pool(where, host, max_bytes, max_node_bytes)
        # SIGINT/SIGTERM cancel as for populate: the file being filled has no name yet, so
        # nothing of it stays; the files already added stay, clean.
        with cancel_on_signals() as cancel:
            results = target.fill(key, count, host, limits, cancel=cancel)
        for result in results:
            report.append({"pool": target.directory, **result.as_dict()})
            if not as_json:
                click.echo(f"{target.directory}: +{format_size(key.size_bytes)} of "
                           f"{result.memory_text} clean in "
                           f"{result.seconds:.2f} s ({result.gib_per_s:.2f} GiB/s)")
    if as_json:
        click.echo(json.dumps(report, indent=2))


@pool.command(name="list")
@click.option("--dir", "directories", multiple=True, callback=existing_dirs,
              help="Only this pool's filesystem.")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(directories: tuple[str, ...], as_json: bool) -> None:
    """Every pool file: state, size, page size, nodes, age, who uses it.

    ``held``: another process still has the file open or mapped (it waits, unscrubbed and
    unserved); ``bad``: not a file the pool may scrub or serve as it is (the next scrub or
    drain removes it); the last column says why."""
    entries = [e for found in per_pool(read_host(), directories,
                                       lambda p: p.entries(probe_holders=True))
               for e in found]
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    if not entries:
        click.echo("no pool files")
        return
    rows = [("STATE", "SIZE", "PAGE", "NODES", "AGE", "USED BY", "FILE")]
    now = time.time()
    for e in entries:
        rows.append((e.state, format_size(e.key.size_bytes),
                     format_size(e.key.page_size_kib * 1024),
                     ",".join(map(str, e.key.host_nodes)) or "-",
                     f"{now - e.updated_unix:.0f}s",
                     f"{e.domain_uuid}/{e.backend_id}" if e.state == "in_use" else "-",
                     e.path + (f" ({e.reason})" if e.reason else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    _held_and_kept_free(entries)


def _held_and_kept_free(entries: list[Any]) -> None:
    """Per page size and node: what the pool holds, what is free, what is kept free."""
    from ..pool.keep import floor_bytes

    host, config = read_host(), read_config()
    held: dict[tuple[int, int | None], int] = {}
    for e in entries:
        for node, length in e.key.node_bytes().items():
            held[(e.key.page_size_kib, node)] = held.get((e.key.page_size_kib, node), 0) + length
    click.echo("")
    for (page_kib, node), length in sorted(held.items(), key=lambda kv: (kv[0][0],
                                                                        kv[0][1] or -1)):
        where = "any node" if node is None else f"node {node}"
        click.echo(f"{format_size(page_kib * 1024)} pages, {where}: the pool holds "
                   f"{format_size(length)}, {format_size(host.free_bytes(node, page_kib))} "
                   f"free, {format_size(floor_bytes(config, host, node, page_kib))} kept free "
                   "(keep_free_mib)")


@pool.command()
@click.option("--dir", "directories", multiple=True, callback=existing_dirs,
              help="Only this pool's filesystem.")
@click.option("--detach", is_flag=True, help="Scrub in a background process at nice 19.")
@limits_options
def scrub(directories: tuple[str, ...], detach: bool, **limit_args: Any) -> None:
    """Zero every dirty pool file (helpers at nice 19) and mark it clean."""
    if detach:
        spawn_scrub(directories)
        click.echo("scrub started in the background")
        return
    _enter_cgroup()
    host = read_host()
    limits = make_limits(**limit_args)

    def scrub_one(p: Pool) -> None:
        for entry in p.scrub(host, limits):
            click.echo(f"scrubbed {entry.path} ({format_size(entry.key.size_bytes)})")

    per_pool(host, directories, scrub_one)


@pool.command()
@click.option("--dir", "directories", multiple=True, callback=existing_dirs,
              help="Only this pool's filesystem.")
def drain(directories: tuple[str, ...]) -> None:
    """Remove every pool file not in use, giving its pages back to the system."""
    freed = sum(per_pool(read_host(), directories, lambda p: p.drain()))
    click.echo(f"drained {format_size(freed) if freed else 'nothing'}")


@pool.command()
@click.option("--once", is_flag=True, help="One pass, then exit (tests, cron, boot).")
@click.option("--daemon", is_flag=True, help="Detach and keep going in the background, for "
              "hosts without systemd; the pidfile says which process.")
@click.option("--pidfile", help="With --daemon (default: <run_dir>/pool-keep.pid).")
@click.option("--interval", type=Seconds(0.1, 86400), default=60.0, show_default=True,
              help="Seconds between passes.")
@click.option("--uri", default="qemu:///system", show_default=True,
              help="libvirt, for the persistent domains' targets (keep_domains).")
@click.option("--config", "config_file", metavar="FILE",
              help="The config file (default: /etc/kvmaccel/kvmaccel.toml).")
@click.option("--install-unit", is_flag=True, help="Write a systemd unit that runs the "
              "keeper (enable it with systemctl), and exit.")
def keep(once: bool, daemon: bool, pidfile: str | None, interval: float, uri: str,
         config_file: str | None, install_unit: bool) -> None:
    """Keep the pool warm: scrub, give back, fill what its targets want (see the config's
    [pool] keep_domains, keep_free_mib and [[pool.keep]])."""
    import logging
    import threading

    from ..errors import KvmaccelError
    from ..pool import keep as k

    if pidfile is not None and not daemon:
        raise UsageError("--pidfile goes with --daemon; drop it, or add --daemon")
    config = load_config(config_file)
    # The keeper's places: the hook's pool states (its config's run dir), not another's.
    paths.use(paths.resolve(os.environ, run_dir=config.run_dir,
                            record_file=paths.places().record_file))
    if install_unit:
        click.echo(f"wrote {k.install_unit(config_file)}; run: systemctl daemon-reload && "
                   "systemctl enable --now kvmaccel-pool-keep")
        return
    if once and daemon:
        raise UsageError("give --once or --daemon, not both")
    _enter_cgroup(config.cgroup)

    def targets() -> list[k.Target]:
        host = read_host()
        found = k.config_targets(config.pool_keep, host)
        if config.pool_keep_domains:
            try:
                found += k.domain_targets(config, host, uri)
            except KvmaccelError as e:
                logging.getLogger("kvmaccel.pool.keep").warning(
                    "keep: no domain targets: %s", e)
        return found

    logger = logging.getLogger("kvmaccel")
    if once:
        with cancel_on_signals() as cancel:
            actions = k.keep_once(config, targets(), config.limits, cancel)
        for line in actions or ["nothing to do: the pool is what its targets want"]:
            click.echo(line)
        return
    if daemon:
        from ..setup.keeper import daemonize

        if pidfile is None:
            private_dirs(config.run_dir)
            pidfile = os.path.join(config.run_dir, "pool-keep.pid")
        started = daemonize(pidfile)  # returns when the daemon runs, or raises why not
        if isinstance(started, int):
            click.echo(f"keeper started (pid {started}); its pid is in {pidfile}")
            return
        with started:  # the daemon: a failure before ready() goes back to the caller
            logger.setLevel(logging.INFO)
            from ..libvirt.full import LogFileHandler  # opened as the records are: no symlink

            handler = LogFileHandler(os.path.join(os.path.dirname(config.log_file),
                                                  "pool-keep.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s kvmaccel-keep[%(process)d]: "
                                                   "%(message)s"))
            logger.addHandler(handler)
            started.ready()
            k.run_forever(config, targets, interval, config.limits, threading.Event())
    logger.setLevel(logging.INFO)  # in the foreground (a service): one line per action
    k.run_forever(config, targets, interval, config.limits)
