"""kvmaccel.launch.qemuargs: QEMU's memory arguments, against libvirt's argv corpus and the real
QEMU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvmaccel.errors import UsageError
from kvmaccel.launch.objargs import parse_qemu_size
from kvmaccel.launch.qemuargs import (
    MemoryBackend,
    PropValue,
    QemuMemoryConfig,
    drop_mem_prealloc,
    parse_qemu_argv,
    rewrite_backend,
    set_prealloc_off,
)

from .conftest import need

CASES_DIR = Path(__file__).resolve().parent / "data" / "libvirt-cases"
ARGS_FILES = sorted(CASES_DIR.glob("*.x86_64-latest.args")) + sorted(
    (CASES_DIR / "legacy-kv").glob("*.args")
)
FIELDS = ("qom_type", "id", "mem_path", "size_bytes", "share", "prealloc", "prealloc_threads")
QEMU = shutil.which("qemu-system-x86_64")


def read_args(path: Path) -> list[str]:
    """The argv of a libvirt .args file: continuations joined, environment assignments dropped.

    Legacy files break *inside* an argument (``prealloc=yes,\\<newline>mem-path=``), so the
    continuation goes without leaving a space (as in the corpus's extract.py).
    """
    tokens = shlex.split(path.read_text().replace("\\\n", ""))
    while re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        tokens.pop(0)
    return tokens


def q(*args: str) -> list[str]:
    return ["qemu-system-x86_64", *args]


def obj_json(**props: Any) -> str:
    return json.dumps({k.replace("_", "-"): v for k, v in props.items()})


def only(config: QemuMemoryConfig) -> MemoryBackend:
    (backend,) = [b for b in config.backends if b.form != "implicit"]
    return backend


# --- libvirt's corpus ---------------------------------------------------------------------------


def test_corpus_is_complete() -> None:
    assert len([p for p in ARGS_FILES if "legacy-kv" not in str(p)]) == 20
    assert len([p for p in ARGS_FILES if "legacy-kv" in str(p)]) == 2


@pytest.mark.parametrize("args_file", ARGS_FILES, ids=lambda p: p.name)
def test_libvirt_case(args_file: Path) -> None:
    name = args_file.name.removesuffix(".x86_64-latest.args").removesuffix(".args")
    expected = json.loads((args_file.parent / f"{name}.expected.json").read_text())["backends"]
    argv = read_args(args_file)
    config = parse_qemu_argv(argv)
    got = [b for b in config.backends if b.form != "implicit"]
    assert len(got) == len(expected)
    for backend, want in zip(got, expected, strict=True):
        assert {f: getattr(backend, f) for f in FIELDS} == {f: want[f] for f in FIELDS}
        assert sorted(backend.host_nodes) == (want["host_nodes"] or [])
        assert backend.policy == want["policy"]
        assert backend.form == ("keyval" if "legacy-kv" in str(args_file) else "json")
        assert backend.arg_index is not None and argv[backend.arg_index] == "-object"
    # Every -numa memdev names a backend (the parser raises otherwise), and libvirt always
    # declares the guest RAM itself: no implicit backend, -m size = the NUMA backends' sum.
    assert all(b.form != "implicit" for b in config.backends)
    ram = [config.backend(i).size_bytes for i in config.ram_backend_ids]
    assert sum(ram) == config.ram_size_bytes


def test_libvirt_memfd_and_hotplug_fields() -> None:
    memfd = parse_qemu_argv(read_args(CASES_DIR / "memfd-memory-numa.x86_64-latest.args"))
    node0 = memfd.backend("ram-node0")
    assert (node0.hugetlb, node0.hugetlbsize_bytes, node0.share_effective) == (True, 2 << 20, True)
    assert memfd.backend("memnvdimm0").props["prealloc-context"] == "tc-memnvdimm0"
    assert memfd.ram_backend_ids == ("ram-node0",)
    assert [(n.node_id, n.memdev) for n in memfd.numa_nodes] == [(0, "ram-node0")]
    assert memfd.maxmem_bytes == 1 << 50 and memfd.memory_slots == 16
    assert memfd.ram_size_bytes == 14680064 << 10


def test_every_backend_field_is_exercised() -> None:
    """Fails when a field of MemoryBackend is never given a non-default value by the tests' data."""
    backends = [b for p in ARGS_FILES for b in parse_qemu_argv(read_args(p)).backends]
    backends.append(only(parse_qemu_argv(q("-object", KV_SAMPLE))))
    defaults = MemoryBackend("t", "i", 1)
    for f in dataclasses.fields(MemoryBackend):
        values = {repr(getattr(b, f.name)) for b in backends}
        assert values - {repr(getattr(defaults, f.name))}, f"field {f.name} is never exercised"


# --- the key=value form -------------------------------------------------------------------------

KV_SAMPLE = (
    "memory-backend-memfd,id=mem,,0,size=1.5G,share=off,prealloc=yes,prealloc-threads=4,"
    "host-nodes=0-2,host-nodes=5,policy=interleave,hugetlb=on,hugetlbsize=2M"
)


def test_keyval_backend() -> None:
    b = only(parse_qemu_argv(q("-m", "2G", "-object", KV_SAMPLE)))
    assert (b.qom_type, b.id, b.size_bytes) == ("memory-backend-memfd", "mem,0", 3 << 29)
    assert (b.share, b.prealloc, b.prealloc_threads, b.policy) == (False, True, 4, "interleave")
    assert b.host_nodes == frozenset({0, 1, 2, 5})
    assert (b.hugetlb, b.hugetlbsize_bytes, b.mem_path) == (True, 2 << 20, None)
    assert (b.form, b.arg_index) == ("keyval", 3)
    assert b.props["host-nodes"] == ["0-2", "5"] and b.props["id"] == "mem,0"


@pytest.mark.parametrize(
    ("text", "share", "prealloc"),
    [
        ("share=on,prealloc=y", True, True),
        ("share=true,prealloc=n", True, False),
        ("share=no,prealloc=false", False, False),
        ("share,noprealloc", True, False),  # deprecated short forms
        ("noshare,prealloc", False, True),
        ("prealloc=on,prealloc=off", None, False),  # a later key wins
    ],
)
def test_keyval_booleans(text: str, share: bool | None, prealloc: bool) -> None:
    b = only(parse_qemu_argv(q("-object", f"memory-backend-ram,id=m,size=1M,{text}")))
    assert (b.share, b.prealloc) == (share, prealloc)


def test_keyval_quirks() -> None:
    # qom-type as a key, anywhere; the first id wins; a trailing comma is allowed.
    b = only(parse_qemu_argv(q("-object", "id=a,qom-type=memory-backend-ram,size=4k,id=b,")))
    assert (b.qom_type, b.id, b.size_bytes) == ("memory-backend-ram", "a", 4096)
    # --object is -object; the argument of another option is not an option.
    argv = q("--object", "memory-backend-ram,id=x,size=1M", "-append", "-object", "-S")
    assert only(parse_qemu_argv(argv)).id == "x"
    # An option without argument does not swallow the next one; a disk image is skipped.
    argv = q("disk.img", "-nodefaults", "-object", "memory-backend-ram,id=y,size=1M")
    assert only(parse_qemu_argv(argv)).arg_index == 3


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [  # measured with qemu-system-x86_64 7.2 (info memdev)
        ("1", 1),
        ("1.0", 1),
        ("1b", 1),
        ("1K", 1024),
        ("1k", 1024),
        ("1.1k", 1126),
        ("1.999k", 2047),
        ("1.k", 1024),
        ("0.5k", 512),
        ("1.5M", 3 << 19),
        ("01M", 1 << 20),
        ("+1M", 1 << 20),
        (" 1M", 1 << 20),
        ("0x1000", 4096),
        ("0x10k", 16384),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
        ("18446744073709551615", (1 << 64) - 1),
    ],
)
def test_qemu_size(text: str, size_bytes: int) -> None:
    assert parse_qemu_size(text) == size_bytes


@pytest.mark.parametrize(
    "text",
    ["", "1.5", "1.5b", "1MiB", "1Mb", "1 M", "1M ", "-1", "1e3", ".5k", "0x1.8k", "16E", "x"],
)
def test_qemu_size_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_qemu_size(text)


# --- the JSON form ------------------------------------------------------------------------------


def test_json_backend() -> None:
    text = obj_json(
        qom_type="memory-backend-file",
        id="ram-node0",
        mem_path="/dev/hugepages",
        share=True,
        size=1 << 30,
        host_nodes=[0],
        policy="bind",
        prealloc=True,
        prealloc_threads=2,
    )
    b = only(parse_qemu_argv(q("-object", text, "-numa", "node,memdev=ram-node0")))
    assert (b.mem_path, b.share, b.size_bytes, b.prealloc_threads) == (
        "/dev/hugepages",
        True,
        1 << 30,
        2,
    )
    assert (b.host_nodes, b.policy, b.form) == (frozenset({0}), "bind", "json")


def test_json_single_quotes() -> None:
    """QEMU's JSON parser takes single-quoted strings too."""
    argv = q("-object", "{'qom-type':'memory-backend-ram','id':'m','size':1048576}")
    assert only(parse_qemu_argv(argv)).id == "m"


# --- -m, -numa, -machine, -mem-path, -mem-prealloc ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "ram_bytes"),
    [
        ((), 128 << 20),
        (("-m", "8G"), 8 << 30),
        (("-m", "4096"), 4 << 30),  # no suffix: MiB
        (("-m", "0x10"), 16 << 20),
        (("-m", "size=1.5G,slots=4,maxmem=8G"), 3 << 29),
        (("-m", "1M", "-m", "2M"), 2 << 20),  # merged: a later value wins
        (("-m", "0"), 128 << 20),
        (("-m", "maxmem=8G"), 128 << 20),
        (("-machine", "none"), 0),
    ],
)
def test_ram_size(args: tuple[str, ...], ram_bytes: int) -> None:
    assert parse_qemu_argv(q(*args)).ram_size_bytes == ram_bytes


@pytest.mark.parametrize(
    ("machine", "ram_id"),
    [((), "pc.ram"), (("-M", "q35"), "pc.ram"), (("-machine", "microvm"), "microvm.ram")],
)
def test_implicit_backend(machine: tuple[str, ...], ram_id: str) -> None:
    config = parse_qemu_argv(
        q(*machine, "-m", "1G", "-mem-path", "/dev/hugepages", "-mem-prealloc")
    )
    (b,) = config.backends
    assert (b.qom_type, b.id, b.size_bytes, b.mem_path) == (
        "memory-backend-file",
        ram_id,
        1 << 30,
        "/dev/hugepages",
    )
    assert (b.form, b.arg_index, b.share_effective, b.prealloc) == ("implicit", None, False, None)
    assert config.prealloc_effective(b) and config.ram_backend_ids == (ram_id,)
    (plain,) = parse_qemu_argv(q(*machine)).backends
    assert (plain.qom_type, plain.id) == ("memory-backend-ram", ram_id)


def test_machine_memory_backend_and_numa() -> None:
    argv = q(
        "-machine", "pc,accel=kvm",
        "-M", "memory-backend=mem",
        "-object", "memory-backend-memfd,id=mem,size=1G",
        "-object", "memory-backend-ram,id=n0,size=1M",
    )  # fmt: skip
    config = parse_qemu_argv(argv)
    assert (config.machine_type, config.machine_memory_backend) == ("pc", "mem")
    assert config.ram_backend_ids == ("mem",) and len(config.backends) == 2
    b = config.backend("mem")
    assert (b.share, b.share_effective, config.prealloc_effective(b)) == (None, True, False)
    numa = parse_qemu_argv(q("-object", "memory-backend-ram,id=n0,size=1M", "-numa",
                             "node,memdev=n0", "-numa", "node,nodeid=3,memdev=n0", "-numa",
                             "dist,src=0,dst=3,val=20"))  # fmt: skip
    assert [(n.node_id, n.memdev, n.arg_index) for n in numa.numa_nodes] == [
        (0, "n0", 3),
        (3, "n0", 5),
    ]


def test_mem_prealloc_is_every_backends_default() -> None:
    argv = q("-mem-prealloc", "-object", "memory-backend-ram,id=a,size=1M",
             "-object", "memory-backend-ram,id=b,size=1M,prealloc=off")  # fmt: skip
    config = parse_qemu_argv(argv)
    assert [config.prealloc_effective(b) for b in config.backends] == [True, False, True]


# --- rewriting ----------------------------------------------------------------------------------

FD_PROPS: dict[str, PropValue] = {"mem-path": "/proc/self/fd/7", "share": True, "prealloc": False}


def test_rewrite_json_memfd() -> None:
    text = read_args(CASES_DIR / "memfd-memory-numa.x86_64-latest.args")
    out = rewrite_backend(text, "ram-node0", new_props=FD_PROPS)
    changed = [i for i, (a, b) in enumerate(zip(text, out, strict=True)) if a != b]
    (index,) = changed
    assert json.loads(out[index]) == {
        "qom-type": "memory-backend-file",
        "id": "ram-node0",
        "share": True,
        "prealloc": False,
        "prealloc-threads": 8,
        "size": 15032385536,
        "host-nodes": [3],
        "policy": "preferred",
        "prealloc-context": "tc-ram-node0",
        "mem-path": "/proc/self/fd/7",
    }
    assert out[index].startswith('{"qom-type":"memory-backend-file","id":"ram-node0",')
    b = parse_qemu_argv(out).backend("ram-node0")
    assert (b.qom_type, b.mem_path, b.share, b.prealloc) == (
        "memory-backend-file", "/proc/self/fd/7", True, False)  # fmt: skip


def test_rewrite_keyval_keeps_the_rest_verbatim() -> None:
    argv = read_args(CASES_DIR / "legacy-kv" / "hugepages-pages.args")
    before = parse_qemu_argv(argv).backend("ram-node0")
    out = rewrite_backend(argv, "ram-node0", new_props=FD_PROPS)
    index = before.arg_index
    assert index is not None
    assert out[: index + 1] == argv[: index + 1] and out[index + 2 :] == argv[index + 2 :]
    assert out[index + 1] == (
        "memory-backend-file,id=ram-node0,prealloc=off,mem-path=/proc/self/fd/7,"
        "discard-data=yes,size=1073741824,host-nodes=0-3,policy=bind,share=on"
    )
    after = parse_qemu_argv(out).backend("ram-node0")
    same = ("id", "size_bytes", "host_nodes", "policy")
    assert [getattr(after, f) for f in same] == [getattr(before, f) for f in same]
    assert rewrite_backend(out, "ram-node0", new_props=FD_PROPS) == out  # idempotent


def test_rewrite_keyval_memfd() -> None:
    argv = q("-object", KV_SAMPLE + ",seal=on,", "-object", "memory-backend-ram,id=r,size=1M")
    out = rewrite_backend(argv, "mem,0", new_props={"mem-path": "/proc/self/fd/3,x"})
    assert out[2] == (
        "memory-backend-file,id=mem,,0,size=1.5G,share=off,prealloc=yes,prealloc-threads=4,"
        "host-nodes=0-2,host-nodes=5,policy=interleave,mem-path=/proc/self/fd/3,,x,"
    )
    assert out[:2] + out[3:] == argv[:2] + argv[3:]
    # A memfd without share=... was shared: the file backend must say so.
    argv = q("-object", "qom-type=memory-backend-memfd,id=m,size=1M")
    out = rewrite_backend(argv, "m", new_props={"mem-path": "/proc/self/fd/3"})
    assert out[2] == "qom-type=memory-backend-file,id=m,size=1M,share=on,mem-path=/proc/self/fd/3"


def test_rewrite_refusals() -> None:
    argv = q("-m", "1G", "-object", "memory-backend-epc,id=epc,size=1M")
    with pytest.raises(UsageError, match="'epc' is a memory-backend-epc, which kvmaccel does not"):
        rewrite_backend(argv, "epc", new_props=FD_PROPS)
    with pytest.raises(UsageError, match="implicit"):
        rewrite_backend(argv, "pc.ram", new_props=FD_PROPS)
    with pytest.raises(UsageError, match="no memory backend 'nope'"):
        rewrite_backend(argv, "nope", new_props=FD_PROPS)
    with pytest.raises(UsageError, match="give it a mem-path"):
        rewrite_backend(q("-object", "memory-backend-ram,id=r,size=1M"), "r", new_props={})
    with pytest.raises(ValueError, match="size"):
        rewrite_backend(argv, "pc.ram", new_props={"size": 1})


def test_set_prealloc_off_and_drop_mem_prealloc() -> None:
    argv = q(
        "-mem-prealloc",
        "-object", obj_json(qom_type="memory-backend-ram", id="a", size=1 << 20),
        "-object", "memory-backend-ram,id=b,size=1M,prealloc",
        "-numa", "node,memdev=a", "-numa", "node,memdev=b",
    )  # fmt: skip
    with pytest.raises(UsageError, match="-mem-prealloc also preallocates a;"):
        drop_mem_prealloc(argv)
    out = set_prealloc_off(argv, ["a", "b"])
    assert out[3] == '{"qom-type":"memory-backend-ram","id":"a","size":1048576,"prealloc":false}'
    assert out[5] == "memory-backend-ram,id=b,size=1M,prealloc=off"
    config = parse_qemu_argv(out)
    assert not any(config.prealloc_effective(b) for b in config.backends)
    assert drop_mem_prealloc(out) == [a for a in out if a != "-mem-prealloc"]
    with pytest.raises(UsageError, match="implicit"):
        set_prealloc_off(q("-mem-prealloc"), ["pc.ram"])


# --- errors -------------------------------------------------------------------------------------

RAM = "memory-backend-ram"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-object", '{"qom-type":'), "invalid JSON"),
        (("-object", '{"qom-type":"x","id":"a","id":"b"}'), "duplicate key 'id'"),
        (("-object", ",id=m,size=1M"), "no qom-type"),
        (("-object", '{"id":"m","size":1}'), "no qom-type"),
        (("-object", f"{RAM},size=1M"), "no id"),
        (("-object", f"{RAM},id=m"), "'m': no size"),
        (("-object", f"{RAM},id=m,size=0"), "size is 0"),
        (("-object", f"{RAM},id=m,size=1MiB"), "'1MiB' is not a size"),
        (("-object", obj_json(qom_type=RAM, id="m", size="1M")), "is not a size"),
        (("-object", obj_json(qom_type=RAM, id="m", size=1.0)), "is not a size"),
        (("-object", obj_json(qom_type=RAM, id="m", size=1, share="on")), "not a boolean"),
        (("-object", obj_json(qom_type=RAM, id="m", size=1, host_nodes="0")), "must be a list"),
        (("-object", f"{RAM},id=m,size=1M,share=ON"), "not a boolean"),
        (("-object", f"{RAM},id=m,size=1M,host-nodes=3-1"), "not a node or range"),
        (("-object", f"{RAM},id=m,size=1M,policy=strict"), "policy 'strict' is unknown"),
        (("-object", f"{RAM},id=m,size=1M,prealloc-threads=x"), "prealloc-threads='x'"),
        (("-object", "memory-backend-file,id=f,size=1M"), "needs mem-path"),
        (
            ("-object", f"{RAM},id=m,size=1M", "-object", "secret,id=m"),
            "two -object have the id 'm'",
        ),
        (
            ("-object", f"{RAM},id=m,size=1M", "-numa", "node,memdev=n"),
            "memdev=n: no memory backend",
        ),
        (("-machine", "memory-backend=n"), "-machine memory-backend=n: no memory backend 'n'"),
        (("-object", "memory-backend-epc,id=e,size=1M", "-numa", "node,memdev=e"), "not support"),
        (("-numa", "node,nodeid=x"), "nodeid='x'"),
        (("-m", "8X"), "-m size '8X' is not a size"),
        (("-m", "8G,slots=x"), "slots='x'"),
        (("-object",), "has no argument"),
    ],
)
def test_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        parse_qemu_argv(q(*args))
    assert "\n" not in str(info.value)


def test_argv_must_start_with_the_program() -> None:
    with pytest.raises(UsageError, match="start with the QEMU program"):
        parse_qemu_argv(["-m", "1G"])


# --- the real QEMU ------------------------------------------------------------------------------


def info_memdev(argv: list[str], pass_fds: tuple[int, ...] = ()) -> dict[str, dict[str, str]]:
    """Run argv (machine none, stopped) and return HMP 'info memdev' per backend id."""
    run = subprocess.run(
        [*argv, "-machine", "none", "-display", "none", "-nodefaults", "-S", "-monitor", "stdio"],
        input="info memdev\nquit\n", capture_output=True, text=True, timeout=30, pass_fds=pass_fds
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out: dict[str, dict[str, str]] = {}
    for block in re.split(r"memory backend: ", run.stdout.replace("\r", ""))[1:]:
        name, *lines = block.splitlines()
        out[name.strip()] = dict(
            (k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)
        )
    return out


def test_agrees_with_real_qemu() -> None:
    need(QEMU is not None, "qemu-system-x86_64 is not installed")
    argv = [
        QEMU or "",
        "-machine", "none",
        "-object", "memory-backend-ram,id=a,size=1.999k,prealloc=y,host-nodes=0,host-nodes=0-0,"
                   "policy=preferred",
        "-object", obj_json(qom_type="memory-backend-memfd", id="b", size=1 << 20),
        "-object", "{'qom-type':'memory-backend-ram','id':'c','size':4096,'share':true}",
        "-object", "id=d,qom-type=memory-backend-ram,size=0x10k,noprealloc,share",
    ]  # fmt: skip
    real = info_memdev(argv)
    for b in parse_qemu_argv(argv).backends:
        assert real[b.id]["size"] == str(b.size_bytes)
        assert real[b.id]["share"] == str(b.share_effective).lower()
        assert real[b.id]["prealloc"] == str(bool(b.prealloc)).lower()
        assert real[b.id]["policy"] == (b.policy or "default")


def test_rewritten_memfd_runs_on_an_inherited_fd() -> None:
    """The rewritten line works: QEMU maps an inherited memfd through /proc/self/fd/N."""
    need(QEMU is not None, "qemu-system-x86_64 is not installed")
    fd = os.memfd_create("kvtest-qemuargs")
    try:
        os.ftruncate(fd, 2 << 20)
        argv = [QEMU or "", "-m", "2M", "-object", "memory-backend-memfd,id=m,size=2M",
                "-machine", "memory-backend=m"]  # fmt: skip
        out = rewrite_backend(argv, "m", new_props={"mem-path": f"/proc/self/fd/{fd}"})
        real = info_memdev(out, pass_fds=(fd,))
        assert real["m"]["share"] == "true" and real["m"]["size"] == str(2 << 20)
    finally:
        os.close(fd)
