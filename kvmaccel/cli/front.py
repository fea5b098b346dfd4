"""``kvmaccel front install|uninstall|status`` and ``kvmaccel enable|disable``: a thin layer
over :mod:`kvmaccel.setup.front`.

``enable`` points a persistent domain's ``<emulator>`` at the front (remembering the one it
had, in the domain's ``<metadata>``); ``disable`` puts it back.  Both go through libvirt-python,
or, with ``--xml FILE --dry-run``, print the XML they would define without libvirt.  A running
guest keeps its QEMU; the change applies at its next start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import click

from ..errors import HookError, UsageError
from ..setup import divert as divert_mod
from ..setup import front as hook_front
from .common import quiet_libvirt, read_text_input


@click.group()
def front() -> None:
    """The emulator front: lets kvmaccel populate <hugepages/> and memfd guests.

    libvirt hands such guests a directory or nothing; the front, run as the guest's
    <emulator>, hands QEMU the file kvmaccel's hook populated.  Install it, then
    `kvmaccel enable DOMAIN`.
    """


qemu_option = click.option("--qemu", default=hook_front.DEFAULT_QEMU, show_default=True,
                           metavar="PATH", help="The real QEMU binary the front execs.")


@front.command()
@qemu_option
@click.option("--divert", is_flag=True,
              help="Put the front at QEMU's own path (dpkg-divert), for every guest.")
def install(qemu: str, divert: bool) -> None:
    """Install the front beside QEMU as <QEMU>-kvmaccel (or, with --divert, in its place)."""
    if divert:
        st = divert_mod.install(qemu)
        click.echo(f"diverted {qemu} to {st.qemu} and installed the front at {st.path}; "
                   f"{divert_mod.APT_CONF_DIR}/{divert_mod.APT_HOOK_NAME} touches it after "
                   "QEMU upgrades so that libvirt probes QEMU again")
        click.echo("every guest using this QEMU now starts through the front")
        return
    st = hook_front.install(qemu)
    click.echo(f"installed {st.path}: execs {st.qemu}")
    click.echo("now start guests through it: kvmaccel enable DOMAIN... (or --all)")


@front.command()
@qemu_option
def uninstall(qemu: str) -> None:
    """Remove the front `install` wrote (with --divert: undo the diversion), and nothing else."""
    done = divert_mod.uninstall(qemu)  # HookError (exit 1) when it cannot put QEMU back
    if done is not None:
        click.echo(done)
        return
    path = hook_front.front_path(qemu)
    if hook_front.uninstall(path):
        click.echo(f"removed {path}; guests still enabled will not start until "
                   "'kvmaccel disable --all'")
    else:
        click.echo(f"{path} was not installed")


@front.command()
@qemu_option
def status(qemu: str) -> None:
    """Say whether the front is installed and which QEMU it execs."""
    here = hook_front.read_status(qemu)
    if here.diverted:
        click.echo(f"{qemu}: kvmaccel's front {here.version} (diverted), execs {here.qemu}")
    with contextlib.suppress(HookError):  # no dpkg: no diversion
        found = divert_mod.diversion(qemu)
        if here.diverted and not found.is_kvmaccels():
            click.echo(f"{qemu}: but dpkg does not divert it to {qemu}{divert_mod.REAL_SUFFIX}"
                       " (changed outside kvmaccel): 'kvmaccel front uninstall' says what to do")
        elif not here.diverted and found.divert_to is not None:
            click.echo(found.describe() + ("; a leftover of kvmaccel's: 'kvmaccel front "
                                           "uninstall' removes it"
                                           if found.is_kvmaccels() else ""))
    st = hook_front.read_status(hook_front.front_path(qemu))
    if st.installed:
        click.echo(f"{st.path}: kvmaccel's front {st.version}, execs {st.qemu}")
    else:
        click.echo(f"{st.path}: not installed (kvmaccel front install)")


def _domain_command(name: str, edit: Callable[[str], hook_front.EmulatorChange],
                    doc: str) -> click.Command:
    @click.command(name=name, help=doc)
    @click.argument("domains", nargs=-1, metavar="DOMAIN...")
    @click.option("--all", "all_domains", is_flag=True, help="Every persistent domain.")
    @click.option("--xml", "xml_file", metavar="FILE",
                  help="Edit this domain XML file instead of a defined domain (with --dry-run).")
    @click.option("--dry-run", is_flag=True,
                  help="Print the domain XML that would be defined; change nothing.")
    @click.option("--connect", "uri", default="qemu:///system", show_default=True,
                  metavar="URI", help="libvirt connection.")
    def command(domains: tuple[str, ...], all_domains: bool, xml_file: str | None,
                dry_run: bool, uri: str) -> None:
        if xml_file is not None:
            if domains or all_domains or not dry_run:
                raise UsageError("--xml FILE needs --dry-run and no DOMAIN or --all")
            change = edit(read_text_input(xml_file))
            click.echo(change.xml, nl=False)
            click.echo(_describe(xml_file, change), err=True)
            return
        if bool(domains) == all_domains:
            raise UsageError("name the domains, or give --all")
        _edit_defined(domains, all_domains, uri, dry_run, name, edit)

    return command


def _describe(what: str, change: hook_front.EmulatorChange) -> str:
    if not change.changed:
        return f"{what}: unchanged (<emulator> {change.old})"
    return f"{what}: <emulator> {change.old or '(none)'} -> {change.new or '(none)'}"


def _edit_defined(names: tuple[str, ...], all_domains: bool, uri: str, dry_run: bool,
                  op: str, edit: Callable[[str], hook_front.EmulatorChange]) -> None:
    quiet_libvirt()
    try:
        import libvirt
    except ImportError:
        raise UsageError("libvirt-python is not installed (pip install 'kvmaccel[libvirt]'); "
                         "or edit a file with --xml FILE --dry-run") from None
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise UsageError(f"cannot connect to {uri}: {e.get_error_message()}") from None
    try:
        if all_domains:
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
        else:
            doms = []
            for n in names:
                try:
                    doms.append(conn.lookupByName(n))
                except libvirt.libvirtError:
                    raise UsageError(f"no domain {n} on {uri}") from None
        for dom in doms:
            if not dom.isPersistent():
                raise UsageError(f"{dom.name()} is transient; {op} changes persistent domains")
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            change = edit(xml)
            if (op == "enable" and change.changed and change.new
                    and not hook_front.is_front(change.new) and not dry_run):
                raise UsageError(f"{change.new} is not installed: kvmaccel front install "
                                 f"--qemu {change.old}")
            if dry_run:
                click.echo(change.xml, nl=False)
            elif change.changed:
                conn.defineXML(change.xml)
            line = _describe(dom.name(), change)
            if change.changed and dom.isActive():
                line += " (running: takes effect at its next start)"
            click.echo(line, err=dry_run)
    finally:
        conn.close()


enable = _domain_command("enable", hook_front.enable_xml, """Start DOMAIN... through
kvmaccel's front: set each persistent domain's <emulator> to the front of its QEMU,
remembering the one it had.  A running guest changes at its next start.""")

disable = _domain_command("disable", hook_front.disable_xml, """Undo `kvmaccel enable`:
give DOMAIN... back the <emulator> it had.  A running guest changes at its next start.""")

__all__ = ["disable", "enable", "front"]
