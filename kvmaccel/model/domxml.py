"""Reading domain XML underneath :mod:`kvmaccel.model.domain`: a tree whose elements know their
line, libvirt's size units, and typed readers for attributes and text that raise a
:class:`~kvmaccel.errors.DomainError` pointing at the element.

Together with :mod:`kvmaccel.model.domain` (which builds the model with these) it is the only
code in kvmaccel that parses domain XML.  The underscored names are that module's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from xml.parsers import expat

from ..errors import DomainError, UsageError
from .units import MAX_CPU_ID, MAX_NODE_ID, parse_cpu_spec


class _Element(ET.Element):
    """An Element that remembers the line it started on."""

    line: int | None = None


def _parse_tree(data: bytes) -> _Element:
    """Parse with expat directly so every element carries its line number."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DomainError(f"domain XML holds a NUL byte at line {line}", line=line)
    parser = new_parser()
    stack: list[_Element] = []
    root: list[_Element] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        el = _Element(tag, attrs)
        el.line = parser.CurrentLineNumber
        if stack:
            stack[-1].append(el)
        else:
            root.append(el)
        stack.append(el)

    def end(tag: str) -> None:
        stack.pop()

    def text(chunk: str) -> None:
        if stack:
            el = stack[-1]
            if len(el):
                last = el[-1]
                last.tail = (last.tail or "") + chunk
            else:
                el.text = (el.text or "") + chunk

    run_expat(parser, data, start, end, text)
    return root[0]


def new_parser(namespace_separator: str | None = None) -> expat.XMLParserType:
    """An expat parser for domain XML; it never reads a DTD's parameter entities."""
    parser = expat.ParserCreate(namespace_separator=namespace_separator)
    # Domain XML never needs a DTD; refusing one rules out entity-expansion tricks.
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    return parser


def run_expat(parser: expat.XMLParserType, data: bytes,
              start: Callable[[str, dict[str, str]], None], end: Callable[[str], None],
              text: Callable[[str], None]) -> None:
    """Feed all of ``data`` to ``parser`` with these handlers.  Raises :class:`DomainError`
    for a DOCTYPE (refused) or malformed XML, naming expat's reason and where."""

    def doctype(*_: object) -> None:
        raise DomainError("domain XML must not have a DOCTYPE", line=parser.CurrentLineNumber)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise DomainError(
            f"malformed domain XML: {expat.errors.messages[e.code]} at line {e.lineno}, "
            f"column {e.offset + 1}",
            line=e.lineno,
        ) from None


def _err(el: ET.Element, message: str) -> DomainError:
    line = getattr(el, "line", None)
    where = f" at line {line}" if line else ""
    return DomainError(f"<{el.tag}>{where}: {message}", element=el.tag, line=line)


_SUFFIX_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_UNIT_HELP = "use b, KB, k/KiB, MB, M/MiB, GB, G/GiB, TB, T/TiB, PB, P/PiB, EB or E/EiB"


def scale_unit(value: int, unit: str | None) -> int:
    """Return ``value`` ``unit`` in bytes (libvirt's ``virScaleInteger``; KiB when absent).

    Raises :class:`ValueError` naming the unit when libvirt would reject it.
    """
    if not unit:
        return value * 1024
    lower = unit.lower()
    if lower in ("b", "byte", "bytes"):
        return value
    if len(lower) == 1 or lower[1:] == "ib":
        base = 1024
    elif lower[1:] == "b":
        base = 1000
    else:
        raise ValueError(f"unknown unit {unit!r}; {_UNIT_HELP}")
    if lower[0] not in _SUFFIX_POWER:
        raise ValueError(f"unknown unit {unit!r}; {_UNIT_HELP}")
    return value * int(base ** _SUFFIX_POWER[lower[0]])


def _int(el: ET.Element, text: str | None, what: str) -> int:
    if text is None or not re.fullmatch(r"\s*\d+\s*", text):
        raise _err(el, f"{what} must be a non-negative integer, not {text!r}")
    return int(text)


MAX_SIZE_BYTES = (1 << 63) - 1
"""The largest size libvirt takes (``virDomainParseMemory`` caps at ``LLONG_MAX`` bytes;
libvirt 9.0 refuses ``<memory unit='KiB'>9007199254740992</memory>``, 8 EiB, as "numerical
overflow: value too large")."""


def _size(el: ET.Element, *, unit_attr: str = "unit", value: str | None = None,
          positive: bool = False) -> int:
    """Bytes in ``el`` (its text, or ``value``), rounded up to KiB as libvirt stores it.
    ``positive``: 0 is refused too."""
    number = _int(el, el.text if value is None else value, "the size")
    try:
        size = scale_unit(number, el.get(unit_attr))
    except ValueError as e:
        raise _err(el, str(e)) from None
    if size > MAX_SIZE_BYTES:
        raise _err(el, f"the size {number}{el.get(unit_attr) or ' KiB'} is too large (libvirt "
                       "takes at most 8 EiB less one byte); give the guest's real size")
    if positive and size == 0:
        raise _err(el, "the size is 0; give a size greater than zero")
    return -(-size // 1024) * 1024


def _nodes(el: ET.Element, text: str | None, what: str) -> frozenset[int]:
    """A node list (``nodeset``, ``nodemask``) or CPU list, bounded by the kernel's limits."""
    limit = MAX_NODE_ID if what.startswith("node") else MAX_CPU_ID
    try:
        result = parse_cpu_spec(text or "", limit)
    except UsageError as e:
        raise _err(el, f"invalid {what}: {e}") from None
    if not result:
        raise _err(el, f"{what} {text!r} is empty")
    return result


def _choice(el: ET.Element, attr: str, allowed: tuple[str, ...]) -> str | None:
    value = el.get(attr)
    if value is not None and value not in allowed:
        raise _err(el, f"{attr}={value!r} is not one of {', '.join(allowed)}")
    return value


def _yesno(el: ET.Element, attr: str) -> bool | None:
    value = el.get(attr)
    if value is None:
        return None
    if value not in ("yes", "no"):
        raise _err(el, f"{attr}={value!r} must be 'yes' or 'no'")
    return value == "yes"


def _alias(el: ET.Element) -> str | None:
    alias_el = el.find("alias")
    if alias_el is None:
        return None
    name = alias_el.get("name", "")
    # libvirt's aliases are [A-Za-z0-9_-]; they become file names, so nothing else passes.
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name in (".", ".."):
        raise _err(alias_el, f"alias {name!r} is not a safe file name component")
    return name
