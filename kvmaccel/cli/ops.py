"""``kvmaccel doctor`` and ``kvmaccel metrics``: what an operator asks of a host.

Thin: the checks are :mod:`kvmaccel.setup.doctor`, the metrics :mod:`kvmaccel.pool.metrics`.
The one thing done here is reading the defined guests' XML from libvirt, read-only, for the
doctor (the hook's layer never calls libvirt's API).
"""

from __future__ import annotations

import click

from ..engine import records
from ..errors import UsageError
from ..paths import DEFAULT_RECORD_FILE
from ..setup import doctor as doc
from ..setup import install as hook_install
from .common import existing_dirs, existing_file, file_if_any, quiet_libvirt

_MARK = {doc.OK: "ok", doc.INFO: "--", doc.WARN: "WARN", doc.FAIL: "FAIL"}


def _defined_domains(uri: str) -> tuple[list[tuple[str, str]] | None, str]:
    """(name, inactive XML) of every defined guest, or None and why not."""
    if uri.startswith("qemu:") and not hook_install.daemons():
        return None, "no libvirt daemon is running (start libvirtd to check the guests)"
    try:
        import libvirt
    except ImportError:
        return None, ("libvirt-python is missing for this Python (Debian: apt-get install "
                      "python3-libvirt, and use scripts/install.sh's environment)")
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        return None, f"cannot connect to {uri} read-only: {e}"
    try:
        domains = [(d.name(), d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                   for d in conn.listAllDomains()]
    except libvirt.libvirtError as e:
        return None, f"cannot list the guests of {uri}: {e}"
    finally:
        conn.close()
    return sorted(domains), ""


@click.command()
@click.option("--libvirt-dir", default=hook_install.DEFAULT_LIBVIRT_DIR, show_default=True,
              metavar="DIR", help="libvirt's configuration directory (hooks/ lives in it).")
@click.option("--qemu-conf", "qemu_conf", metavar="FILE",
              help="libvirt's qemu.conf (default: the config's qemu_conf).")
@click.option("--config", "config_path", metavar="FILE", callback=existing_file,
              help="kvmaccel's config file.")
@click.option("--uri", default="qemu:///system", show_default=True,
              help="libvirt connection for the defined guests (read-only).")
@click.option("--no-guests", is_flag=True, help="Do not ask libvirt for the guests.")
@click.pass_context
def doctor(ctx: click.Context, libvirt_dir: str, qemu_conf: str | None,
           config_path: str | None, uri: str, no_guests: bool) -> None:
    """Check this host for kvmaccel: one line per finding, with what to do.

    Huge page mounts and free pages per node and size, the qemu.conf settings that matter,
    the hook and the emulator front, AppArmor and SELinux, and which defined guests kvmaccel
    would serve and why not the others.  Exit 1 when something is wrong (a FAIL line).
    """
    quiet_libvirt()
    domains, note = (None, "--no-guests") if no_guests else _defined_domains(uri)
    findings = doc.run(doc.DoctorInput(libvirt_dir=libvirt_dir, qemu_conf_path=qemu_conf,
                                       config_path=config_path, domains=domains,
                                       domains_note=note))
    for f in findings:
        click.echo(f"{_MARK[f.status]:4}  {f.check}: {f.message}")
    failed = sum(f.status == doc.FAIL for f in findings)
    warned = sum(f.status == doc.WARN for f in findings)
    click.echo(f"{failed} problem(s), {warned} warning(s)")
    if failed:
        ctx.exit(1)


@click.command()
@click.option("--textfile", "textfile_dir", metavar="DIR",
              help="Write DIR/kvmaccel.prom atomically (node_exporter's textfile collector) "
                   "instead of printing.")
@click.option("--records", "record_path", metavar="FILE", callback=file_if_any,
              help="The record file (default $KVMACCEL_RECORD_FILE, else the config's "
                   f"record_file, {DEFAULT_RECORD_FILE} unless set).")
@click.option("--pool-dir", "pool_dirs", multiple=True, metavar="DIR", callback=existing_dirs,
              help="Pools to report (default: every pool on a hugetlbfs or tmpfs mount).")
def metrics(textfile_dir: str | None, record_path: str | None,
            pool_dirs: tuple[str, ...]) -> None:
    """Print kvmaccel's metrics in Prometheus's text format.

    Starts by result and source, a start-time histogram, the share of starts the warm pool
    served, stops, scrubs and fills (from the record file), and the pool's bytes by state,
    page size and node with the scrub backlog (from the pools themselves).
    """
    from ..host.facts import read_host
    from ..pool.metrics import render, write_textfile
    from .pool import per_pool

    entries = [e for found in per_pool(read_host(), pool_dirs, lambda p: p.entries())
               for e in found]
    text = render(records.read(record_path), entries)
    if textfile_dir is None:
        click.echo(text, nl=False)
        return
    try:
        path = write_textfile(textfile_dir, text)
    except OSError as e:
        raise UsageError(f"cannot write metrics into {textfile_dir}: {e.strerror or e}; give "
                         "an existing directory (node_exporter's --collector.textfile."
                         "directory)") from None
    click.echo(f"wrote {path}")
