"""The emulator front: a ``/bin/sh`` script libvirt runs as a guest's ``<emulator>``.

For ``<hugepages/>`` guests libvirt hands QEMU a *directory* (``<mount>/libvirt/qemu/
<shortname>``) and QEMU fills a temporary file it unlinks at once; for ``<source
type='memfd'/>`` QEMU makes the memory itself.  No qemu.conf key, ``<qemu:override>`` or
``-set`` changes a JSON ``-object``; a domain's ``<emulator>`` may be any executable, which
libvirt runs for capability probing and for the start, as the qemu user, inside the guest's
cgroups.  So the front rewrites only the memory backends kvmaccel's hook prepared a file
for *at this start* and execs the real QEMU; everything else, and every backend without such
a file, passes byte for byte, so an absent or failed hook leaves QEMU starting exactly as it
would without kvmaccel.

What proves a file is the hook's: the guest's directory ``D`` (``<mount>/libvirt/qemu/
<shortname>``) belongs to the qemu user, who may put anything in it, so a name there proves
nothing.  At each start the hook (root) makes ``D/.kvmaccel`` (root's, mode 0755; any one
left from before is removed first, one it did not make refused) and puts ``kvmaccel-<id>``
in it (:mod:`kvmaccel.serve.memdir`).  The qemu user cannot create, rename or remove a name
in a directory of root's, cannot chown, and cannot move a directory of root's into ``D``
from elsewhere (a directory changing parent needs write permission on itself).  The front
takes only ``D`` of this guest (its shortname from ``$HOME``, which libvirt sets to
``<...>/domain-<shortname>``), a directory of the running user in a parent it neither owns
nor can write; it opens ``D/.kvmaccel`` on a descriptor ``N`` and then checks *that*
directory (its parent is ``D``, and the running user neither owns nor can write it; as root,
it is root's), and hands QEMU ``/proc/self/fd/N/kvmaccel-<id>``: renaming things in ``D``
after the check changes nothing QEMU opens.  So a file the qemu user planted, a directory
swapped in, or a hugetlbfs mount libvirt does not use (nothing there passes) is never handed
over; nor, under ``--divert``, a file in a shared directory such as ``/dev/shm`` (such a
mem-path is not ``<...>/libvirt/qemu/<shortname>``).

Why shell: AppArmor's guest profile (Debian, Ubuntu) may execute only ``/usr/bin/qemu-system-*``,
``kvm``, ``qemu-kvm`` and a few shells, not python3; so the front is installed under a name
that profile already allows (``/usr/bin/qemu-system-x86_64-kvmaccel``).

Why a named file: QEMU opens ``mem-path`` with ``open()``, and AppArmor checks the path the
kernel resolves: ``/proc/self/fd/N`` of an unlinked file is refused ("deleted entry"), so the
file has a name in a directory the guest is granted (``D/**``); through the held directory
``N`` it resolves to that name.

The script's second line (``# kvmaccel-front: {json}``) says which QEMU it execs and what the
install did, so that uninstall removes only what install wrote.

Errors: :class:`~kvmaccel.errors.HookError` with what to do.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from dataclasses import dataclass

from .. import __version__, safefs
from ..errors import HookError

# What reads a front lives in host/, where every planner can ask it; these names stay here too.
from ..host.emulator import MARKER as MARKER
from ..host.emulator import SUFFIX as SUFFIX
from ..host.emulator import FrontStatus as FrontStatus
from ..host.emulator import is_front as is_front
from ..host.emulator import read_status as read_status
from ..model import domedit
from ..model.domedit import METADATA_NS as METADATA_NS  # re-exported

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
FILE_PREFIX = "kvmaccel-"  # the hook's file for backend <id>: <dir>/.kvmaccel/kvmaccel-<id>
PROOF_DIR = ".kvmaccel"  # made by the hook (root) in the guest's directory at each start

# libvirt 9.0 writes every memory backend as one JSON object with its members in a fixed
# order, no spaces ("qom-type" first, then "id").  The script relies only on that: it reads a
# string member by its first '"key":"', refuses any value with a backslash (an escape: such a
# backend passes through untouched), and edits members it finds.  Key=value -object syntax
# (libvirt before 7.x) passes through untouched.
SCRIPT = r'''#!/bin/sh
@MARKER@
# kvmaccel's emulator front (`kvmaccel front --help`).  libvirt runs it as a guest's
# <emulator>; it execs the real QEMU with the same arguments, except memory backends for which
# kvmaccel's hook prepared a populated file for this start, kvmaccel-<id> in the directory
# .kvmaccel that the hook (root) made in the guest's hugepage directory D:
#  * memory-backend-file with mem-path D: mem-path that file, share true (QEMU would map a
#    private copy otherwise);
#  * memory-backend-memfd with hugetlb true, and such a file in the guest's directory D of the
#    hugetlbfs mount of that page size: a memory-backend-file of the same members on it.
# D counts only as libvirt's directory for this guest: <mount>/libvirt/qemu/<shortname>, the
# shortname from $HOME (libvirt's <...>/domain-<shortname>), a directory of this user in a
# parent it neither owns nor can write.  D/.kvmaccel is opened and held on a descriptor N (no
# rename can change what it is after that) and must then be a directory whose parent is D and
# that this user neither owns nor can write (running as root: one of root's), so that only
# root can have made a name in it; QEMU gets /proc/self/fd/N/kvmaccel-<id>.
# Everything else passes byte for byte; so does every backend without such a file.
QEMU=@QEMU@
case "$*" in
    *memory-backend-*) ;;
    *) exec "$QEMU" "$@" ;;
esac
case $HOME in */domain-?*) short=${HOME##*/domain-} ;; *) exec "$QEMU" "$@" ;; esac
case $short in */*|*\\*) exec "$QEMU" "$@" ;; esac
root=
if [ -O / ]; then root=1; fi

# v = the string value of member $2 in JSON object $1; fails when absent or escaped.
val() {
    case $1 in *"\"$2\":\""*) ;; *) return 1 ;; esac
    v=${1#*\"$2\":\"}
    v=${v%%\"*}
    case $v in ''|*\\*) return 1 ;; esac
}
# drop member $1 (a scalar value) from $out
drop() {
    case $out in *",\"$1\":"*) ;; *) return 0 ;; esac
    post=${out#*,\"$1\":}
    case $post in *,*) post=,${post#*,} ;; *) post="}" ;; esac
    out=${out%%,\"$1\":*}$post
}
# share true in $out
share() {
    case $out in
        *'"share":true'*) ;;
        *'"share":false'*) out=${out%%\"share\":false*}\"share\":true${out#*\"share\":false} ;;
        *) out=${out%\}},\"share\":true} ;;
    esac
}
# Not ours and not writable by us (as root: root's), directory $1.
foreign() {
    if [ -n "$root" ]; then [ -O "$1" ]; else [ ! -O "$1" ] && [ ! -w "$1" ]; fi
}
# x = /proc/self/fd/N, a descriptor held on $1/.kvmaccel, when $1 is this guest's directory D
# and that one passes the checks above (once per D; descriptors 3 to 9 that are free).
pin() {
    d=$1
    case $d in */libvirt/qemu/"$short") ;; *) return 1 ;; esac
    n=3
    while [ $n -le 9 ]; do
        eval "p=\${pin$n-}"
        if [ "$p" = "$d" ]; then x=/proc/self/fd/$n; return 0; fi
        n=$((n + 1))
    done
    p=${d%/*}
    [ -d "$p" ] && [ ! -h "$p" ] && foreign "$p" || return 1
    [ -d "$d" ] && [ ! -h "$d" ] && [ -O "$d" ] || return 1
    [ -d "$d/.kvmaccel" ] && [ -r "$d/.kvmaccel" ] || return 1
    n=3
    while [ -h /proc/self/fd/$n ]; do
        n=$((n + 1))
        [ $n -le 9 ] || return 1
    done
    eval "command exec $n<\"\$d/.kvmaccel\"" || return 1
    x=/proc/self/fd/$n
    if [ -d "$x" ] && [ "$x/.." -ef "$d" ] && foreign "$x"; then
        eval "pin$n=\$d"
        return 0
    fi
    eval "exec $n<&-"
    return 1
}
# A prepared file: a regular file, not a symlink.
ready() { [ -f "$1" ] && [ ! -h "$1" ]; }

from_file() {
    case $1 in '{"qom-type":"memory-backend-file","id":"'*) ;; *) return 1 ;; esac
    val "$1" id && id=$v || return 1
    case $id in */*) return 1 ;; esac
    val "$1" mem-path && pin "$v" || return 1
    f=$x/kvmaccel-$id
    ready "$f" || return 1
    rest=${1#*\"mem-path\":\"}
    out=${1%%\"mem-path\":\"*}\"mem-path\":\"$f\"${rest#*\"}
    share
}

from_memfd() {
    case $1 in '{"qom-type":"memory-backend-memfd","id":"'*) ;; *) return 1 ;; esac
    case $1 in *'"hugetlb":true'*) ;; *) return 1 ;; esac
    val "$1" id && id=$v || return 1
    case $id in */*) return 1 ;; esac
    want=
    case $1 in *'"hugetlbsize":'*)
        want=${1#*\"hugetlbsize\":}; want=${want%%,*}; want=${want%%\}*}
        case $want in ''|*[!0-9]*) return 1 ;; esac
        want=pagesize=$((want / 1048576))M ;;
    esac
    f=
    while read -r _ mnt fs opts _; do
        [ "$fs" = hugetlbfs ] || continue
        case $mnt in *\\*) continue ;; esac
        [ -z "$want" ] || case ",$opts," in *",$want,"*) ;; *) continue ;; esac
        [ ! -h "$mnt/libvirt" ] || continue
        if pin "$mnt/libvirt/qemu/$short" && ready "$x/kvmaccel-$id"; then
            f=$x/kvmaccel-$id
            break
        fi
    done < /proc/mounts
    [ -n "$f" ] || return 1
    rest=${1#*\"id\":\"}
    out="{\"qom-type\":\"memory-backend-file\",\"id\":\"$id\",\"mem-path\":\"$f\"${rest#*\"}"
    drop hugetlb; drop hugetlbsize; drop seal
    share
}

# Rebuild the argv as a list of references ("${7}", or "$r7" for a rewritten one) for one
# eval at the end: linear in the number of arguments, each passed as the very same bytes.
i=0
list=
prev=
for a; do
    i=$((i + 1))
    if [ "$prev" = -object ] && { from_file "$a" || from_memfd "$a"; }; then
        eval "r$i=\$out"
        list="$list \"\$r$i\""
    else
        list="$list \"\${$i}\""
    fi
    prev=$a
done
eval "exec \"\$QEMU\" $list"
'''


def front_path(qemu: str) -> str:
    """Where the front for ``qemu`` goes: beside it, with ``-kvmaccel`` appended (a name
    the guest's AppArmor profile already lets it execute: ``/usr/bin/qemu-system-*``)."""
    return qemu + SUFFIX


def render(qemu: str, *, diverted: bool = False) -> str:
    """The front's text, exec'ing ``qemu``.  Raises :class:`HookError` for a path the
    script could not quote safely."""
    if not os.path.isabs(qemu) or "\n" in qemu:
        raise HookError(f"{qemu!r}: give the absolute path of the QEMU binary to wrap")
    info = {"version": __version__, "qemu": qemu, "diverted": diverted}
    return (SCRIPT.replace("@MARKER@", MARKER + json.dumps(info))
            .replace("@QEMU@", shlex.quote(qemu)))


def _check_qemu(qemu: str) -> None:
    try:
        st = os.stat(qemu)
    except OSError as e:
        raise HookError(f"{qemu}: {e.strerror}; install QEMU first or name it with --qemu") \
            from None
    if not stat.S_ISREG(st.st_mode) or not os.access(qemu, os.X_OK):
        raise HookError(f"{qemu} is not an executable file; name the QEMU binary with --qemu")
    if read_status(qemu).installed:
        raise HookError(f"{qemu} is itself kvmaccel's front; name the real QEMU with --qemu")


def install(qemu: str = DEFAULT_QEMU, path: str | None = None) -> FrontStatus:
    """Write the front for ``qemu`` at ``path`` (default :func:`front_path`), mode 0755,
    root's; atomically (a temporary name, then rename).  Replaces only a front kvmaccel
    wrote.  Raises :class:`HookError`."""
    path = path or front_path(qemu)
    _check_qemu(qemu)
    if os.path.lexists(path) and not read_status(path).installed:
        raise HookError(f"{path} exists and kvmaccel did not write it; refusing to replace it")
    _write_front(path, render(qemu))
    return read_status(path)


def _write_front(path: str, text: str, rename: bool = True) -> str:
    """Write ``text`` beside ``path`` (0755, fsynced), in its directory of root's
    (:func:`kvmaccel.safefs.write_atomic_at`), and, if ``rename``, rename it over ``path``;
    return the path it has (not renamed: its temporary name, which :mod:`.divert` links)."""
    directory, name = os.path.split(path)
    try:
        dfd = safefs.open_checked_dir(directory or ".", own=False)
        try:
            tmp = safefs.write_atomic_at(dfd, name, text, mode=0o755, durable=True,
                                         place=rename)
        finally:
            os.close(dfd)
    except OSError as e:
        raise HookError(f"cannot write {path}: {e.strerror}") from e
    return os.path.join(directory, tmp)


def uninstall(path: str) -> bool:
    """Remove the front at ``path`` if kvmaccel wrote it; False when nothing was there.
    Raises :class:`HookError` for a file kvmaccel did not write."""
    if not os.path.lexists(path):
        return False
    if not read_status(path).installed:
        raise HookError(f"{path} was not written by kvmaccel; left alone")
    os.unlink(path)
    return True


# --- a domain's <emulator>: enable and disable ---------------------------------------------
#
# The XML is edited as text (kvmaccel.model.domedit), so that everything but the places
# kvmaccel changes stays byte for byte and disable gives back exactly what enable got.  The
# emulator the domain had is remembered in the domain itself (libvirt keeps namespaced
# <metadata> elements):
#     <kvmaccel:front xmlns:kvmaccel="..." emulator="/usr/bin/qemu-system-x86_64"/>


@dataclass(frozen=True)
class EmulatorChange:
    """What enable or disable did to one domain's XML."""

    xml: str
    old: str | None  # the <emulator> before (None: the domain had none)
    new: str | None
    changed: bool


def remembered_emulator(xml: str) -> str | None:
    """The emulator enable replaced, or None when the domain is not enabled."""
    return domedit.read_emulator(xml).remembered


def enable_xml(xml: str, front: str | None = None) -> EmulatorChange:
    """The domain XML with ``<emulator>`` set to the front of its QEMU (``front``, default
    :func:`front_path` of the current one), remembering the current one.  A domain already
    enabled, or whose emulator is a front already, is returned unchanged.  Raises
    :class:`~kvmaccel.errors.DomainError` for XML that is malformed or no domain, and
    :class:`HookError` for one with no ``<devices>`` or several ``<emulator>``."""
    current = domedit.read_emulator(xml)
    old = current.value.strip() if current.value is not None else None
    if current.remembered is not None or (old and is_front(old)):
        return EmulatorChange(xml, old, old, False)
    new = front or front_path(old or DEFAULT_QEMU)
    return EmulatorChange(domedit.set_emulator(xml, new), old, new, True)


def disable_xml(xml: str) -> EmulatorChange:
    """The domain XML with the emulator enable remembered put back and the note removed; a
    domain not enabled is returned unchanged."""
    current = domedit.read_emulator(xml)
    now = current.value.strip() if current.value is not None else None
    if current.remembered is None:
        return EmulatorChange(xml, now, now, False)
    text, old = domedit.restore_emulator(xml)
    return EmulatorChange(text, now, old.strip() if old is not None else None, True)
