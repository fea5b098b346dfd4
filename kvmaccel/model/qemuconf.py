"""The few ``/etc/libvirt/qemu.conf`` settings that decide where libvirt puts guest memory.

* ``memory_backing_dir``: default ``/var/lib/libvirt/qemu/ram``.  A configured value gets
  ``/libvirt/qemu`` appended (libvirt ``src/qemu/qemu_conf.c``,
  ``virQEMUDriverConfigLoadMemoryEntry``): ``memory_backing_dir = "/dev/shm"`` puts guest files
  under ``/dev/shm/libvirt/qemu/<shortname>/``.
* ``hugetlbfs_mount``: a string or a list of strings.  Absent means libvirt finds the
  hugetlbfs mounts in ``/proc/mounts`` itself.
* ``user`` and ``group``: the owner of the files QEMU opens.  The defaults are Debian's build
  settings (``-Dqemu_user=libvirt-qemu -Dqemu_group=libvirt-qemu``); upstream's are ``root``.

The file uses libvirt's ``virConf`` syntax: ``name = value`` where a value is a quoted string,
an integer or a ``[ ... ]`` list that may span lines; ``#`` starts a comment.  Settings
kvmaccel does not use are read and ignored.  Errors raise
:class:`~kvmaccel.errors.ConfigError` naming the file and line.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .textfile import read_regular

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/libvirt/qemu.conf"
DEFAULT_MEMORY_BACKING_DIR = "/var/lib/libvirt/qemu/ram"
DEFAULT_USER = "libvirt-qemu"
DEFAULT_GROUP = "libvirt-qemu"

Value = str | int | list[str | int]


@dataclass(frozen=True)
class QemuConf:
    """The path- and owner-deciding settings of qemu.conf, with libvirt's defaults."""

    memory_backing_dir: str = DEFAULT_MEMORY_BACKING_DIR  # effective, suffix applied
    memory_backing_dir_configured: str | None = None  # the raw value, None when absent
    hugetlbfs_mount: tuple[str, ...] | None = None  # None: libvirt reads /proc/mounts
    user: str = DEFAULT_USER
    group: str = DEFAULT_GROUP
    path: str | None = None  # the file read, None for pure defaults


_TOKEN = re.compile(
    r'''\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<triple>"""(?:.|\n)*?""")
      | (?P<dq>"[^"\n]*")
      | (?P<sq>'[^'\n]*')
      | (?P<int>-?\d+)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<punct>[=\[\],;])
      | (?P<nl>\n)
    )''',
    re.VERBOSE,
)


def _tokens(text: str, path: str) -> list[tuple[str, str | int, int]]:
    """Split virConf text into (kind, value, line) tokens."""
    out: list[tuple[str, str | int, int]] = []
    pos = 0
    line = 1
    while pos < len(text):
        if text[pos] in " \t\r":
            pos += 1
            continue
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"{path}:{line}: cannot parse {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind == "triple":
            out.append(("str", raw[3:-3], line))
        elif kind in ("dq", "sq"):
            out.append(("str", raw[1:-1], line))
        elif kind == "int":
            out.append(("int", int(raw), line))
        elif kind in ("name", "punct"):
            out.append((kind, raw, line))
        line += raw.count("\n")
        pos = m.end()
    return out


def parse_virconf(text: str, path: str = "qemu.conf") -> dict[str, Value]:
    """Parse libvirt ``virConf`` text into ``{name: value}``.  Raises :class:`ConfigError`."""
    toks = _tokens(text, path)
    result: dict[str, Value] = {}
    i = 0

    def expect(kind: str, value: str | None = None) -> tuple[str, str | int, int]:
        nonlocal i
        if i >= len(toks):
            raise ConfigError(f"{path}: unexpected end of file")
        tok = toks[i]
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise ConfigError(f"{path}:{tok[2]}: expected {value or kind}, found {tok[1]!r}")
        i += 1
        return tok

    while i < len(toks):
        if toks[i][0] == "punct" and toks[i][1] == ";":
            i += 1
            continue
        _, name, _ = expect("name")
        expect("punct", "=")
        if i >= len(toks):
            raise ConfigError(f"{path}: {name} has no value")
        kind, value, line = toks[i]
        if kind in ("str", "int"):
            i += 1
            result[str(name)] = value
        elif kind == "punct" and value == "[":
            i += 1
            items: list[str | int] = []
            while i < len(toks) and not (toks[i][0] == "punct" and toks[i][1] == "]"):
                kind, item, line = toks[i]
                if kind not in ("str", "int"):
                    raise ConfigError(f"{path}:{line}: {name} list holds {item!r}")
                items.append(item)
                i += 1
                if i < len(toks) and toks[i][0] == "punct" and toks[i][1] == ",":
                    i += 1
            expect("punct", "]")
            result[str(name)] = items
        else:
            raise ConfigError(f"{path}:{line}: {name} has no value")
    return result


def _string(values: dict[str, Value], key: str, path: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key} must be a string, not {value!r}")
    return value


def qemu_conf_from_text(text: str, path: str = "qemu.conf") -> QemuConf:
    """Build a :class:`QemuConf` from qemu.conf text.  Raises :class:`ConfigError`."""
    values = parse_virconf(text, path)
    mbd = _string(values, "memory_backing_dir", path)
    if mbd is not None and not mbd.startswith("/"):
        raise ConfigError(f"{path}: memory_backing_dir {mbd!r} must be an absolute path")
    hugetlbfs: tuple[str, ...] | None = None
    raw = values.get("hugetlbfs_mount")
    if isinstance(raw, str):
        # libvirt (virConfGetValueStringList with compatString) takes one string as a list of
        # one; an empty string disables hugepages.
        hugetlbfs = (raw,) if raw else ()
    elif isinstance(raw, list):
        if not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{path}: hugetlbfs_mount must be a string or a list of strings")
        hugetlbfs = tuple(str(x) for x in raw)
    elif raw is not None:
        raise ConfigError(f"{path}: hugetlbfs_mount must be a string or a list of strings")
    return QemuConf(
        memory_backing_dir=(
            f"{mbd.rstrip('/')}/libvirt/qemu" if mbd else DEFAULT_MEMORY_BACKING_DIR
        ),
        memory_backing_dir_configured=mbd,
        hugetlbfs_mount=hugetlbfs,
        user=_string(values, "user", path) or DEFAULT_USER,
        group=_string(values, "group", path) or DEFAULT_GROUP,
        path=path,
    )


def read_qemu_conf(path: str | None = None, root: str = "/") -> QemuConf:
    """Read qemu.conf at ``path`` (default ``<root>/etc/libvirt/qemu.conf``).

    A missing default file gives libvirt's defaults (a debug line); a missing file that was
    named explicitly, or an unreadable one, raises :class:`ConfigError`.
    """
    explicit = path is not None
    target = path if path is not None else os.path.join(root, DEFAULT_PATH.lstrip("/"))
    if explicit and not path:
        raise ConfigError("the qemu.conf name is empty; give the path of libvirt's qemu.conf")
    try:
        text = read_regular(target).decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"qemu.conf {target} does not exist") from None
        log.debug("no %s: using libvirt's defaults", target)
        return QemuConf()
    except OSError as e:
        raise ConfigError(f"cannot read {target}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not UTF-8 text; give libvirt's qemu.conf") from None
    return qemu_conf_from_text(text, target)
