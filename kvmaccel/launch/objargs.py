"""QEMU's option syntax: ``-object`` in JSON or ``key=value`` form, sizes, booleans, node lists.

The reading half of :mod:`kvmaccel.launch.qemuargs`, which builds the memory model on it; the
rules (as checked against qemu-system-x86_64 7.2) are listed there.  The underscored names are
that module's, not for other layers.  No I/O; errors are :class:`~kvmaccel.errors.UsageError`
naming the argument.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Literal

from ..errors import UsageError

FILE, MEMFD, RAM = "memory-backend-file", "memory-backend-memfd", "memory-backend-ram"
BACKEND_TYPES = (FILE, MEMFD, RAM)

_SIZE_RE = re.compile(r"^\s*\+?(?:0[xX]([0-9a-fA-F]+)|(\d+)(?:\.(\d*))?)([bkmgtpeBKMGTPE]?)$")
_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_NODES_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")

Form = Literal["keyval", "json", "implicit"]


def parse_qemu_size(text: str, what: str = "size") -> int:
    """Return the bytes in a QEMU size (``1G``, ``1.5M``, ``0x1000``, ``4096``), as QEMU reads it.

    Raises :class:`UsageError` (naming ``what``) for anything QEMU refuses, or 2**64 and more.
    """
    m = _SIZE_RE.match(text)
    bad = UsageError(f"{what} {text!r} is not a size; use bytes or a K, M, G, T suffix (8G)")
    if not m:
        raise bad
    hex_digits, digits, frac_digits, suffix = m.groups()
    mul = 1 << _SHIFT[suffix.lower()]
    whole = int(hex_digits, 16) if hex_digits else int(digits)
    frac = Fraction(int(frac_digits), 10 ** len(frac_digits)) if frac_digits else Fraction(0)
    if frac and mul == 1:
        raise bad
    value = whole * mul + int(frac * mul + Fraction(1, 2))
    if value >= 1 << 64:
        raise bad
    return value


def _split_keyval(text: str) -> list[str]:
    """Split ``key=value,...`` on single commas; tokens keep their ``,,`` escapes."""
    tokens, start, i = [], 0, 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                i += 2
                continue
            tokens.append(text[start:i])
            start = i + 1
        i += 1
    tokens.append(text[start:])
    return tokens


def _keyval_pairs(tokens: list[str], implied_key: str) -> list[tuple[str, str] | None]:
    """(key, value) per token, unescaped; None for an empty token (a trailing comma)."""
    pairs: list[tuple[str, str] | None] = []
    for n, token in enumerate(tokens):
        text = token.replace(",,", ",")
        if "=" in text:
            key, value = text.split("=", 1)
            pairs.append((key, value))
        elif n == 0:
            pairs.append((implied_key, text))
        elif not text:
            pairs.append(None)
        elif text.startswith("no"):
            pairs.append((text[2:], "off"))
        else:
            pairs.append((text, "on"))
    return pairs


def parse_keyval(text: str, implied_key: str) -> dict[str, str]:
    """Read QEMU ``key=value,...`` options (``-m``, ``-numa``, ``-machine``): a later key wins."""
    return {p[0]: p[1] for p in _keyval_pairs(_split_keyval(text), implied_key) if p}


def _load_json(text: str, where: str) -> dict[str, object]:
    def pairs_hook(items: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in items]
        dups = sorted({k for k in keys if keys.count(k) > 1})
        if dups:
            raise UsageError(f"{where}: duplicate key {dups[0]!r} in JSON; give it once")
        return dict(items)

    def requote(m: re.Match[str]) -> str:  # QEMU's JSON also takes 'single-quoted' strings
        s = m.group(0)
        return s if s[0] == '"' else '"' + s[1:-1].replace("\\'", "'").replace('"', '\\"') + '"'

    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', requote, text)
    try:
        obj = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix it") from None
    assert isinstance(obj, dict)  # the text starts with "{"
    return obj


def _parse_object(text: str, index: int) -> tuple[Form, dict[str, object]]:
    """Return the form and the properties of one ``-object`` argument (at argv[index])."""
    where = f"-object at argument {index}"
    props: dict[str, object]
    if text.startswith("{"):
        form: Form = "json"
        props = _load_json(text, where)
    else:
        form = "keyval"
        props = {}
        for pair in _keyval_pairs(_split_keyval(text), "qom-type"):
            if pair is None:
                continue
            key, value = pair
            if key == "host-nodes":
                nodes = props.setdefault(key, [])
                assert isinstance(nodes, list)
                nodes.append(value)
            elif not (key == "id" and key in props):
                props[key] = value
    qom_type = props.get("qom-type")
    if not isinstance(qom_type, str) or not qom_type:
        raise UsageError(f"{where}: no qom-type; start it with the type, e.g. {RAM},id=...")
    return form, props


def _bool(props: Mapping[str, object], key: str, where: str, strict: bool) -> bool | None:
    value = props.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and not strict and value in _TRUE + _FALSE:
        return value in _TRUE
    raise UsageError(f"{where}: {key}={value!r} is not a boolean; use {'true' if strict else 'on'}")


def _uint(value: object, strict: bool) -> int | None:
    """A JSON integer, or (key=value) a decimal or 0x hex number; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 1 << 64 else None
    if isinstance(value, str) and not strict and re.fullmatch(r"\d+|0[xX][0-9a-fA-F]+", value):
        return int(value, 16) if value[1:2] in ("x", "X") else int(value)
    return None


def _size(props: Mapping[str, object], key: str, where: str, strict: bool) -> int | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, str) and not strict:
        return parse_qemu_size(value, f"{where}: {key}")
    size = _uint(value, strict=True)
    if size is None:
        raise UsageError(f"{where}: {key} {value!r} is not a size; give a number of bytes")
    return size


def _nodes(value: object, where: str, strict: bool) -> frozenset[int]:
    """``host-nodes``: a JSON list of integers, or key=value ``N``/``N-M`` items."""
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise UsageError(f"{where}: host-nodes must be a list of node numbers, as in [0, 1]")
    nodes: set[int] = set()
    for item in value:
        first = last = _uint(item, strict=True)
        m = _NODES_RE.match(item) if isinstance(item, str) and not strict else None
        if m:
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if first is None or last is None or last < first:
            raise UsageError(f"{where}: host-nodes {item!r} is not a node or range; use 0 or 0-3")
        nodes.update(range(first, last + 1))
    return frozenset(nodes)


def _string(props: Mapping[str, object], key: str, where: str) -> str | None:
    value = props.get(key)
    if value is None or (isinstance(value, str) and value):
        return value
    raise UsageError(f"{where}: {key}={value!r} is not a non-empty string; fix it")
