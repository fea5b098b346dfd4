"""Editing a domain's ``<emulator>`` as text, at the places an XML parser found.

``kvmaccel enable`` points a domain's ``<emulator>`` at the front and remembers the one it
had in the domain's ``<metadata>`` (libvirt keeps namespaced elements there)::

    <kvmaccel:front xmlns:kvmaccel="https://github.com/kvmaccel/kvmaccel/front/1"
                    emulator="/usr/bin/qemu-system-x86_64"/>

``kvmaccel disable`` puts it back.  The XML is edited as text so that everything else stays
byte for byte, and ``restore_emulator(set_emulator(x, f)) == x`` exactly.  The places are
found with expat (the parser :mod:`kvmaccel.model.domxml` uses), never with a pattern: an
``<emulator>`` in a comment, a CDATA section or another element's text is no emulator; only
``/domain/devices/emulator`` and ``/domain/metadata`` count.

What enable changed is written into the note, so that disable can undo it exactly: ``none``
(the domain had no ``<emulator>``), ``meta`` (nor a ``<metadata>``), and the original text of
whatever was not plain (``text``: the emulator's content when it was not its value escaped the
usual way, such as ``&#45;`` or CDATA; ``tag``: a self-closed ``<emulator/>``; ``metatag`` and
``devtag``: a self-closed ``<metadata/>`` or ``<devices/>``).  Notes written before these
existed (``emulator``, ``none``, ``meta`` only) are undone the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import DomainError, HookError
from .domxml import new_parser, run_expat

METADATA_NS = "https://github.com/kvmaccel/kvmaccel/front/1"
NOTE_PREFIX = "kvmaccel"
_SEP = "}"
_NOTE = f"{METADATA_NS}{_SEP}front"
_TAG_END = re.compile(rb"""(?:\s+[^\s=/>]+\s*=\s*(?:"[^"]*"|'[^']*'))*\s*(/?)>""")


@dataclass
class _Elem:
    """One element: byte offsets of its start tag (``start``, ``open_end``) and of its end
    (``close_start``, ``end``; both ``open_end`` when self-closed)."""

    start: int
    open_end: int
    self_closed: bool
    attrs: dict[str, str]
    close_start: int = -1
    end: int = -1
    text: list[str] = field(default_factory=list)
    children: int = 0


@dataclass
class _Layout:
    data: bytes
    root_open_end: int = -1
    root_tag: str = ""
    anchor_end: int = -1  # after </uuid>, else after </name>: where a new <metadata> goes
    metadata: _Elem | None = None
    devices: _Elem | None = None
    emulators: list[_Elem] = field(default_factory=list)
    note: _Elem | None = None

    @property
    def newline(self) -> bytes:
        return b"\r\n" if b"\r\n" in self.data else b"\n"


def _layout(xml: str) -> _Layout:
    data = xml.encode("utf-8", errors="surrogatepass")
    lay = _Layout(data)
    parser = new_parser(namespace_separator=_SEP)
    stack: list[tuple[str, _Elem]] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        at = parser.CurrentByteIndex
        m = _TAG_END.match(data, _name_end(data, at))
        if m is None:
            raise DomainError(f"cannot read the tag at byte {at}")
        el = _Elem(at, m.end(), m.group(1) == b"/", attrs)
        path = [t for t, _ in stack]
        if stack:
            stack[-1][1].children += 1
        if not stack:
            lay.root_open_end = el.open_end
            lay.root_tag = tag
        elif path == ["domain"]:
            if tag == "metadata" and lay.metadata is None:
                lay.metadata = el
            elif tag == "devices" and lay.devices is None:
                lay.devices = el
        elif path == ["domain", "devices"] and tag == "emulator" and stack[-1][1] is lay.devices:
            lay.emulators.append(el)
        elif (path == ["domain", "metadata"] and tag == _NOTE and lay.note is None
              and stack[-1][1] is lay.metadata):
            lay.note = el
        stack.append((tag, el))

    def end(tag: str) -> None:
        _, el = stack.pop()
        if el.self_closed:
            el.close_start = el.end = el.open_end
        else:
            el.close_start = parser.CurrentByteIndex
            el.end = data.index(b">", el.close_start) + 1
        if len(stack) == 1 and tag in ("uuid", "name") and (tag == "uuid" or lay.anchor_end < 0):
            lay.anchor_end = el.end

    def text(chunk: str) -> None:
        if stack:
            stack[-1][1].text.append(chunk)

    run_expat(parser, data, start, end, text)
    if lay.root_tag != "domain":
        raise DomainError(f"the root element must be <domain>, not <{lay.root_tag}>")
    return lay


_NAME = re.compile(rb"<[^\s/>]+")


def _name_end(data: bytes, at: int) -> int:
    """The end of the element name that starts at ``data[at] == b'<'``."""
    m = _NAME.match(data, at)
    assert m is not None
    return m.end()


def _escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(value: str) -> str:
    return (_escape_text(value).replace('"', "&quot;").replace("\t", "&#9;")
            .replace("\n", "&#10;").replace("\r", "&#13;"))


def _indent(data: bytes, at: int) -> bytes:
    """The spaces and tabs before ``at`` on its line (empty when other text precedes it)."""
    line = data.rfind(b"\n", 0, at) + 1
    lead = data[line:at]
    return lead if lead.strip(b" \t") == b"" else b""


def _child_indent(data: bytes, el: _Elem) -> bytes:
    m = re.compile(rb"\r?\n([ \t]*)<").match(data, el.open_end)
    return m.group(1) if m else _indent(data, el.start) + b"  "


def _raw(data: bytes, start: int, end: int) -> str:
    return data[start:end].decode("utf-8", errors="surrogatepass")


@dataclass(frozen=True)
class Emulator:
    """The domain's ``<emulator>``: ``value`` its text as libvirt reads it (None: the domain
    has none); ``remembered``: what enable remembered (None: not enabled)."""

    value: str | None
    remembered: str | None


def read_emulator(xml: str) -> Emulator:
    """The domain's emulator and what enable remembered.  Raises :class:`DomainError` for
    XML that is malformed or not a domain, :class:`HookError` for several emulators."""
    lay = _layout(xml)
    if len(lay.emulators) > 1:
        raise HookError("the domain XML has more than one <emulator>; fix it first")
    value = "".join(lay.emulators[0].text) if lay.emulators else None
    return Emulator(value, lay.note.attrs.get("emulator", "") if lay.note else None)


def set_emulator(xml: str, new: str) -> str:
    """``xml`` with ``<devices><emulator>`` set to ``new``, the one it had remembered in a
    note.  The caller checks :func:`read_emulator` first (not enabled, one emulator at
    most).  Raises :class:`HookError` for a domain without ``<devices>``."""
    lay = _layout(xml)
    data, nl = lay.data, lay.newline
    if lay.devices is None:
        raise HookError("the domain XML has no <devices>; cannot set its emulator")
    note: dict[str, str] = {}
    edits: list[tuple[int, int, bytes]] = []
    element = f"<emulator>{_escape_text(new)}</emulator>".encode()
    dev = lay.devices
    if lay.emulators:
        emu = lay.emulators[0]
        note["emulator"] = "".join(emu.text)
        if emu.self_closed:
            note["tag"] = _raw(data, emu.start, emu.end)
            edits.append((emu.start, emu.end, element))
        else:
            content = _raw(data, emu.open_end, emu.close_start)
            if content != _escape_text(note["emulator"]):
                note["text"] = content
            edits.append((emu.open_end, emu.close_start, _escape_text(new).encode()))
    else:
        note["emulator"] = ""
        note["none"] = "1"
        if dev.self_closed:
            note["devtag"] = _raw(data, dev.start, dev.end)
            ind = _indent(data, dev.start)
            edits.append((dev.start, dev.end, b"<devices>" + nl + ind + b"  " + element + nl
                          + ind + b"</devices>"))
        else:
            edits.append((dev.open_end, dev.open_end,
                          nl + _child_indent(data, dev) + element))
    meta = lay.metadata
    if meta is None:
        note["meta"] = "1"
    elif meta.self_closed:
        note["metatag"] = _raw(data, meta.start, meta.end)
    attrs = "".join(f' {k}="{_escape_attr(v)}"' for k, v in note.items())
    text = f'<{NOTE_PREFIX}:front xmlns:{NOTE_PREFIX}="{METADATA_NS}"{attrs}/>'.encode()
    if meta is None:
        at = lay.anchor_end if lay.anchor_end >= 0 else lay.root_open_end
        ind = _indent(data, data.rfind(b"<", 0, at)) if lay.anchor_end >= 0 else b"  "
        edits.append((at, at, nl + ind + b"<metadata>" + nl + ind + b"  " + text + nl + ind
                      + b"</metadata>"))
    elif meta.self_closed:
        ind = _indent(data, meta.start)
        edits.append((meta.start, meta.end, b"<metadata>" + nl + ind + b"  " + text + nl + ind
                      + b"</metadata>"))
    else:
        edits.append((meta.open_end, meta.open_end, nl + _child_indent(data, meta) + text))
    return _apply(data, edits)


def restore_emulator(xml: str) -> tuple[str, str | None]:
    """``xml`` as it was before :func:`set_emulator`, and the emulator put back (None: the
    domain had none, and has none again).  ``xml`` not enabled is returned as it is."""
    lay = _layout(xml)
    data = lay.data
    note, meta = lay.note, lay.metadata
    if note is None or meta is None:
        return xml, "".join(lay.emulators[0].text) if lay.emulators else None
    a = note.attrs
    old = a.get("emulator", "")
    edits: list[tuple[int, int, bytes]] = []
    emu = lay.emulators[0] if lay.emulators else None
    dev = lay.devices
    if emu is not None and dev is not None:
        if "devtag" in a and dev.children == 1:
            edits.append((dev.start, dev.end, a["devtag"].encode()))
        elif a.get("none") == "1":
            edits.append((_line_start(data, emu.start), emu.end, b""))
        elif "tag" in a:
            edits.append((emu.start, emu.end, a["tag"].encode()))
        else:
            content = a["text"] if "text" in a else _escape_text(old)
            edits.append((emu.open_end, emu.close_start, content.encode()))
    alone = meta.children == 1
    if "metatag" in a and alone:
        edits.append((meta.start, meta.end, a["metatag"].encode()))
    elif a.get("meta") == "1" and alone:
        edits.append((_line_start(data, meta.start), meta.end, b""))
    else:
        edits.append((_line_start(data, note.start), note.end, b""))
    return _apply(data, edits), None if a.get("none") == "1" else old


def _line_start(data: bytes, at: int) -> int:
    """``at`` moved back over the newline and indentation that precede it (what enable put
    before an element it added), when only those precede it on its line."""
    start = at
    while start > 0 and data[start - 1:start] in (b" ", b"\t"):
        start -= 1
    if data[start - 1:start] != b"\n":
        return at
    start -= 1
    return start - 1 if data[start - 1:start] == b"\r" else start


def _apply(data: bytes, edits: list[tuple[int, int, bytes]]) -> str:
    out = data
    for start, end, text in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + text + out[end:]
    return out.decode("utf-8", errors="surrogatepass")
