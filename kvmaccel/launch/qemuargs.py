"""Memory backends read from QEMU's own command line, and the rewrites ``kvmaccel run`` needs.

Layering: argv <-> typed model only.  No I/O, no threads, no policy: which backend to populate
is the planner's business, populating it the engine's.  Every function takes the full command
line, ``argv[0]`` being the QEMU program, as handed to ``exec``.

QEMU's syntax, as checked against qemu-system-x86_64 7.2 (Debian 12):

* Options are ``-name`` or ``--name`` (not ``-name=value``); all but :data:`NO_ARG_OPTIONS` take
  the next element as their argument; elements not starting with ``-`` are disk images.
* ``-object`` is JSON when its argument starts with ``{`` (QEMU's JSON also takes single-quoted
  strings and refuses duplicate keys), else ``key=value,...``: ``,,`` is a literal comma, a first
  element without ``=`` is the ``qom-type``, a later bare ``key`` means ``key=on`` and ``nokey``
  ``key=off`` (deprecated short forms), a repeated key wins last, except ``id`` (first) and
  ``host-nodes`` (the values add up; each is ``N`` or ``N-M``).  Booleans are exactly
  ``on|yes|true|y`` and ``off|no|false|n``.
* Sizes (``qemu_strtosz``): decimal or ``0x`` hex, a decimal fraction, a binary suffix
  ``BKMGTPE`` (either case), rounded to the nearest byte (``1.999k`` is 2047).  ``-m`` reads a
  value ending in a digit as MiB, and defaults (also for 0) to 128 MiB, 0 for machine ``none``.
* ``-m``, ``-machine``/``-M`` merge when repeated (a later key wins); ``-mem-path`` wins last.
* Without ``-numa node,memdev=`` or ``-machine memory-backend=``, QEMU makes the guest RAM itself:
  a ``memory-backend-file`` on ``-mem-path`` (``share=off``), else ``memory-backend-ram``, with the
  id ``pc.ram`` (``ram`` for machine ``none``, ``microvm.ram`` for ``microvm``).
* ``-mem-prealloc`` sets ``prealloc=on`` as a *default of every memory backend* (a global
  property): an explicit ``prealloc=off`` on an ``-object`` still wins.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import UsageError
from .objargs import (
    BACKEND_TYPES,
    FILE,
    MEMFD,
    RAM,
    Form,
    _bool,
    _keyval_pairs,
    _nodes,
    _parse_object,
    _size,
    _split_keyval,
    _string,
    _uint,
    parse_keyval,
    parse_qemu_size,
)

POLICIES = ("default", "preferred", "bind", "interleave")
DEFAULT_RAM_BYTES = 128 << 20

# QEMU options without an argument: 7.2's table (probed one by one with "-OPT -version"), plus
# options of older and newer releases, so that an old launch script is still read correctly.
_NO_ARG = """
S s h help version async-teardown daemonize enable-kvm enable-sync-profile full-screen mem-prealloc
no-acpi no-fd-bootchk no-hpet no-reboot no-shutdown no-user-config nodefaults nographic portrait
only-migratable preconfig singlestep snapshot usb win2k-hack semihosting xen-attach old-param
xen-domid-restrict curses sdl alt-grab ctrl-grab no-quit no-frame enable-fips nodefconfig tdf
rtc-td-hack no-kvm no-kvm-irqchip no-kvm-pit no-kvm-pit-reinjection show-cursor
"""
NO_ARG_OPTIONS = frozenset(_NO_ARG.split())
# Properties only these types have; they are dropped when a backend becomes a file backend.
_ONLY_MEMFD = frozenset({"hugetlb", "hugetlbsize", "seal"})
_REWRITE_FIXED = frozenset({"qom-type", "id", "size", "host-nodes", "policy"})

PropValue = str | int | bool | None


@dataclass(frozen=True)
class MemoryBackend:
    """One ``memory-backend-file|memfd|ram`` of the command line, or QEMU's implicit one.

    ``share``, ``prealloc``, ``hugetlb`` are None where the argument does not say (see
    :attr:`share_effective` and :meth:`QemuMemoryConfig.prealloc_effective`).  ``props`` holds the
    properties as written (JSON values, or strings for key=value; ``host-nodes`` a list).
    ``arg_index`` is the index in argv of the ``-object`` element (its argument follows it);
    None for the implicit backend (``form == "implicit"``).
    """

    qom_type: str
    id: str
    size_bytes: int
    mem_path: str | None = None
    share: bool | None = None
    prealloc: bool | None = None
    prealloc_threads: int | None = None
    host_nodes: frozenset[int] = frozenset()
    policy: str | None = None
    hugetlb: bool | None = None
    hugetlbsize_bytes: int | None = None
    form: Form = "implicit"
    arg_index: int | None = None
    props: Mapping[str, object] = field(default_factory=dict, hash=False, repr=False)

    @property
    def share_effective(self) -> bool:
        """``share`` with QEMU's default filled in: on for memfd, off for file and ram."""
        return self.share if self.share is not None else self.qom_type == MEMFD


@dataclass(frozen=True)
class UnsupportedBackend:
    """A ``memory-backend-*`` object of another type (``memory-backend-epc``, ``-shm``...)."""

    qom_type: str
    id: str
    arg_index: int


@dataclass(frozen=True)
class NumaNode:
    """One ``-numa node``; ``node_id`` as QEMU numbers it (``nodeid=`` or the next free one)."""

    node_id: int
    memdev: str | None
    arg_index: int


@dataclass(frozen=True)
class QemuMemoryConfig:
    """Everything of a QEMU command line that decides the guest's memory backends."""

    backends: tuple[MemoryBackend, ...]
    unsupported_backends: tuple[UnsupportedBackend, ...]
    ram_size_bytes: int
    maxmem_bytes: int | None
    memory_slots: int | None
    numa_nodes: tuple[NumaNode, ...]
    machine_type: str | None
    machine_memory_backend: str | None
    mem_path: str | None
    mem_prealloc: bool

    def backend(self, backend_id: str) -> MemoryBackend:
        """The backend ``backend_id``; :class:`UsageError` if missing or of an unsupported type."""
        for b in self.backends:
            if b.id == backend_id:
                return b
        for u in self.unsupported_backends:
            if u.id == backend_id:
                raise UsageError(
                    f"memory backend {backend_id!r} is a {u.qom_type}, which kvmaccel does not "
                    f"support; use {', '.join(BACKEND_TYPES)}"
                )
        known = ", ".join(b.id for b in self.backends) or "none"
        raise UsageError(f"no memory backend {backend_id!r} in the QEMU arguments (have: {known})")

    @property
    def ram_backend_ids(self) -> tuple[str, ...]:
        """Ids of the backends that make the guest's RAM (NUMA memdevs, or the machine's)."""
        memdevs = tuple(n.memdev for n in self.numa_nodes if n.memdev is not None)
        if memdevs:
            return memdevs
        if self.machine_memory_backend is not None:
            return (self.machine_memory_backend,)
        return tuple(b.id for b in self.backends if b.form == "implicit")

    def prealloc_effective(self, backend: MemoryBackend) -> bool:
        """Whether QEMU preallocates ``backend``: its ``prealloc``, else ``-mem-prealloc``."""
        return backend.prealloc if backend.prealloc is not None else self.mem_prealloc


def _backend(form: Form, props: dict[str, object], index: int) -> MemoryBackend:
    qom_type, backend_id, strict = str(props["qom-type"]), str(props["id"]), form == "json"
    where = f"memory backend {backend_id!r}"
    size = _size(props, "size", where, strict)
    if size is None:
        raise UsageError(f"{where}: no size; add size=... (e.g. size=8G)")
    if size == 0:
        raise UsageError(f"{where}: size is 0; give the backend's size")
    mem_path = _string(props, "mem-path", where)
    if qom_type == FILE and mem_path is None:
        raise UsageError(f"{where}: a {FILE} needs mem-path=PATH; add it")
    policy = _string(props, "policy", where)
    if policy is not None and policy not in POLICIES:
        raise UsageError(f"{where}: policy {policy!r} is unknown; use one of {', '.join(POLICIES)}")
    raw_threads = props.get("prealloc-threads")
    threads = None if raw_threads is None else _uint(raw_threads, strict)
    if raw_threads is not None and threads is None:
        raise UsageError(f"{where}: prealloc-threads={raw_threads!r} is not a number; use e.g. 4")
    memfd = qom_type == MEMFD
    return MemoryBackend(
        qom_type=qom_type,
        id=backend_id,
        size_bytes=size,
        mem_path=mem_path if qom_type == FILE else None,
        share=_bool(props, "share", where, strict),
        prealloc=_bool(props, "prealloc", where, strict),
        prealloc_threads=threads,
        host_nodes=_nodes(props.get("host-nodes"), where, strict),
        policy=policy,
        hugetlb=_bool(props, "hugetlb", where, strict) if memfd else None,
        hugetlbsize_bytes=_size(props, "hugetlbsize", where, strict) if memfd else None,
        form=form,
        arg_index=index,
        props=MappingProxyType(props),
    )


def _options(argv: Sequence[str]) -> Iterable[tuple[int, str, str | None]]:
    """Yield (index, option name without dashes, argument or None) for argv[1:]."""
    if not argv or argv[0].startswith("-"):
        raise UsageError("the command line must start with the QEMU program; add it before options")
    i = 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            i += 1
            continue
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if name in NO_ARG_OPTIONS:
            yield i, name, None
            i += 1
        elif i + 1 < len(argv):
            yield i, name, argv[i + 1]
            i += 2
        else:
            raise UsageError(f"QEMU option {arg} at the end has no argument; give it one")


def _default_ram_id(machine_type: str | None) -> str:
    return {"none": "ram", "microvm": "microvm.ram"}.get(machine_type or "pc", "pc.ram")


def parse_qemu_argv(argv: Sequence[str]) -> QemuMemoryConfig:
    """Read the memory backends and memory options of a QEMU command line (``argv[0]`` = QEMU).

    Raises :class:`UsageError` (one line) for an ``-object`` that cannot be read (bad JSON, no
    qom-type), a memory backend without an id, size or (file) mem-path, a value that does not
    parse, duplicate object ids, and a ``-numa node,memdev=`` or ``-machine memory-backend=``
    that names no backend or an unsupported one.
    """
    backends: list[MemoryBackend] = []
    unsupported: list[UnsupportedBackend] = []
    ids: set[str] = set()
    memory: dict[str, str] = {}
    machine: dict[str, str] = {}
    numa: list[NumaNode] = []
    mem_path: str | None = None
    mem_prealloc = False
    for i, name, value in _options(argv):
        if name == "mem-prealloc":
            mem_prealloc = True
        elif value is None:
            continue
        elif name == "object":
            form, props = _parse_object(value, i + 1)
            qom_type, obj_id = str(props["qom-type"]), props.get("id")
            if not isinstance(obj_id, str) or not obj_id:
                raise UsageError(f"{qom_type} at argument {i + 1}: no id; add id=NAME")
            if obj_id in ids:
                raise UsageError(f"two -object have the id {obj_id!r}; give each its own id")
            ids.add(obj_id)
            if qom_type in BACKEND_TYPES:
                backends.append(_backend(form, props, i))
            elif qom_type.startswith("memory-backend-"):
                unsupported.append(UnsupportedBackend(qom_type, obj_id, i))
        elif name == "m":
            memory.update(parse_keyval(value, "size"))
        elif name in ("machine", "M"):
            machine.update(parse_keyval(value, "type"))
        elif name == "mem-path":
            mem_path = value
        elif name == "numa":
            opts = parse_keyval(value, "type")
            if opts.get("type") == "node":
                node_text = opts.get("nodeid", str(len(numa)))
                if not node_text.isdigit():
                    raise UsageError(f"-numa nodeid={node_text!r} is not a number; use 0, 1, ...")
                numa.append(NumaNode(int(node_text), opts.get("memdev"), i))

    ram_text = memory.get("size")
    ram = parse_qemu_size(ram_text, "-m size") if ram_text else 0
    if ram_text and ram_text[-1].isdigit():  # QEMU's legacy suffix-less form counts MiB
        ram <<= 20
    ram = ram or (DEFAULT_RAM_BYTES if machine.get("type") != "none" else 0)
    maxmem_text, slots_text = memory.get("maxmem"), memory.get("slots")
    if slots_text is not None and not slots_text.isdigit():
        raise UsageError(f"-m slots={slots_text!r} is not a number; use e.g. slots=16")
    config = QemuMemoryConfig(
        backends=tuple(backends),
        unsupported_backends=tuple(unsupported),
        ram_size_bytes=ram,
        maxmem_bytes=parse_qemu_size(maxmem_text, "-m maxmem") if maxmem_text else None,
        memory_slots=int(slots_text) if slots_text is not None else None,
        numa_nodes=tuple(numa),
        machine_type=machine.get("type"),
        machine_memory_backend=machine.get("memory-backend"),
        mem_path=mem_path,
        mem_prealloc=mem_prealloc,
    )
    refs = [("-numa node,memdev", n.memdev) for n in numa]
    for what, ref in [*refs, ("-machine memory-backend", config.machine_memory_backend)]:
        try:
            if ref is not None:
                config.backend(ref)
        except UsageError as e:
            raise UsageError(f"{what}={ref}: {e}") from None
    if not config.ram_backend_ids and ram:
        ram_id = _default_ram_id(config.machine_type)
        implicit = MemoryBackend(FILE if mem_path else RAM, ram_id, ram, mem_path=mem_path)
        config = dataclasses.replace(config, backends=(*backends, implicit))
    return config


def _format_keyval(key: str, value: str | int | bool) -> str:
    if isinstance(value, bool):
        return f"{key}={'on' if value else 'off'}"
    return f"{key}={str(value).replace(',', ',,')}"


def _edit_object(
    argv: Sequence[str],
    backend: MemoryBackend,
    qom_type: str,
    new_props: Mapping[str, PropValue],
    drop: Collection[str],
) -> list[str]:
    """Return argv with ``backend``'s ``-object`` argument edited in its own form."""
    if backend.arg_index is None:
        raise UsageError(
            f"memory backend {backend.id!r} is QEMU's implicit one (from -m/-mem-path) and has "
            "no -object to change; declare it with -object and -machine memory-backend="
        )
    index = backend.arg_index + 1
    if backend.form == "json":
        obj = {**backend.props, "qom-type": qom_type, **new_props}
        obj = {k: v for k, v in obj.items() if k not in drop and v is not None}
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    else:
        tokens = _split_keyval(argv[index])
        trailing_comma = len(tokens) > 1 and tokens[-1] == ""
        if trailing_comma:
            tokens.pop()
        out: list[str] = []
        done: set[str] = set()
        for token, pair in zip(tokens, _keyval_pairs(tokens, "qom-type"), strict=True):
            key = pair[0] if pair else ""
            if key == "qom-type":
                out.append(f"qom-type={qom_type}" if "=" in token else qom_type)
            elif key in drop:
                continue
            elif key in new_props:
                value = new_props[key]
                if key not in done and value is not None:
                    out.append(_format_keyval(key, value))
                done.add(key)
            else:
                out.append(token)
        out += [
            _format_keyval(k, v) for k, v in new_props.items() if k not in done and v is not None
        ]
        text = ",".join(out) + ("," if trailing_comma else "")
    result = list(argv)
    result[index] = text
    return result


def rewrite_backend(
    argv: Sequence[str], backend_id: str, *, new_props: Mapping[str, PropValue]
) -> list[str]:
    """Return argv with backend ``backend_id`` made a ``memory-backend-file`` with ``new_props``.

    The id, size, host-nodes and policy stay; memfd-only properties (hugetlb, hugetlbsize, seal)
    go; every other property is kept unless ``new_props`` sets it (a value of None removes it).
    Typical ``new_props``: ``{"mem-path": "/proc/self/fd/7", "share": True, "prealloc": False}``.
    The argument keeps its form (JSON stays JSON); every other element of argv is unchanged.

    Raises :class:`UsageError` for an unknown, unsupported or implicit backend, or when the result
    would have no mem-path; :class:`ValueError` when ``new_props`` tries to change a fixed property.
    """
    fixed = _REWRITE_FIXED & set(new_props)
    if fixed:
        raise ValueError(f"rewrite_backend keeps {', '.join(sorted(fixed))}; do not pass them")
    backend = parse_qemu_argv(argv).backend(backend_id)
    if new_props.get("mem-path", backend.mem_path) is None:
        raise UsageError(f"memory backend {backend_id!r} becomes a {FILE}; give it a mem-path")
    if backend.share is None:  # a memfd shares by default, a file does not: keep it as it was
        new_props = {"share": backend.share_effective, **new_props}
    return _edit_object(argv, backend, FILE, new_props, _ONLY_MEMFD)


def set_prealloc_off(argv: Sequence[str], backend_ids: Iterable[str]) -> list[str]:
    """Return argv with an explicit ``prealloc=off`` on each of ``backend_ids``.

    That is the way to stop QEMU preallocating memory that is already populated: an explicit
    property wins over ``-mem-prealloc``, which then still serves every other backend.
    Raises :class:`UsageError` for an unknown, unsupported or implicit backend.
    """
    result = list(argv)
    for backend_id in backend_ids:
        backend = parse_qemu_argv(result).backend(backend_id)
        result = _edit_object(result, backend, backend.qom_type, {"prealloc": False}, ())
    return result


def drop_mem_prealloc(argv: Sequence[str]) -> list[str]:
    """Return argv without ``-mem-prealloc``, when no backend still relies on it.

    Raises :class:`UsageError` naming the backends that have no explicit ``prealloc`` (QEMU's
    implicit RAM backend always relies on it): dropping the option would silently stop QEMU
    preallocating them.  Use :func:`set_prealloc_off` for the populated ones instead.
    """
    config = parse_qemu_argv(argv)
    relying = [b.id for b in config.backends if b.prealloc is None]
    if config.mem_prealloc and relying:
        raise UsageError(
            f"-mem-prealloc also preallocates {', '.join(relying)}; keep it and use "
            "prealloc=off on the populated backends"
        )
    drop = {i for i, name, _ in _options(argv) if name == "mem-prealloc"}
    return [a for i, a in enumerate(argv) if i not in drop]
