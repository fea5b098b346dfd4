"""The emulator front (kvmaccel/hook/front.py) on libvirt's own command lines.

The front is a /bin/sh script; these tests run it for real, with a stand-in "QEMU" that prints
the argv it got, on the 20 ``.args`` files of ``tests/data/libvirt-cases`` (JSON ``-object``, as
libvirt 9.0 writes them), and check that it changes exactly the backends with a prepared file
and nothing else, byte for byte.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import statistics
import subprocess
import time

import pytest

from kvmaccel.errors import KvmaccelError
from kvmaccel.hook import front
from tests.conftest import private_mount

CASES = os.path.join(os.path.dirname(__file__), "data", "libvirt-cases")
ARGS = sorted(glob.glob(os.path.join(CASES, "*.args")))
MOUNT_PREFIXES = ("/dev/hugepages2M", "/dev/hugepages1G")


def libvirt_argv(path: str) -> list[str]:
    """The QEMU argv of a libvirt ``.args`` file (without the environment and the binary)."""
    with open(path, encoding="utf-8") as f:
        words = shlex.split(f.read().replace("\\\n", " "))
    start = next(i for i, w in enumerate(words) if w.startswith("/"))
    return words[start + 1:]


@pytest.fixture
def fake_qemu(tmp_path: str) -> str:
    path = os.path.join(str(tmp_path), "qemu-system-x86_64")
    with open(path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def front_script(fake_qemu: str) -> str:
    path = front.install(fake_qemu).path
    assert path == fake_qemu + "-kvmaccel"
    return path


def run(script: str, argv: list[str], home: str = "/nonexistent") -> list[str]:
    out = subprocess.run([script, *argv], check=True, capture_output=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": home}).stdout
    return out.decode().split("\0")[:-1]


def objects(argv: list[str]) -> list[tuple[int, dict[str, object]]]:
    return [(i + 1, json.loads(argv[i + 1])) for i, a in enumerate(argv)
            if a == "-object" and argv[i + 1].startswith("{")]


@pytest.mark.parametrize("args_file", ARGS, ids=os.path.basename)
def test_without_prepared_files_every_argument_passes_byte_for_byte(
        front_script: str, args_file: str) -> None:
    argv = libvirt_argv(args_file)
    assert run(front_script, argv) == argv


def test_capability_probe_passes_straight_through(front_script: str) -> None:
    probe = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
             "-qmp", "unix:/var/lib/libvirt/qemu/qmp-x/qmp.monitor,server=on,wait=off",
             "-pidfile", "/var/lib/libvirt/qemu/qmp-x/qmp.pid", "-daemonize"]
    assert run(front_script, probe) == probe


def _dir_backends(argv: list[str]) -> list[tuple[int, dict[str, object]]]:
    return [(i, o) for i, o in objects(argv) if o["qom-type"] == "memory-backend-file"
            and str(o["mem-path"]).startswith(MOUNT_PREFIXES)]


DIR_CASES = [a for a in ARGS if _dir_backends(libvirt_argv(a))]


@pytest.mark.parametrize("args_file", DIR_CASES, ids=os.path.basename)
def test_a_prepared_file_replaces_the_directory_and_is_shared(
        front_script: str, args_file: str, tmp_path: str) -> None:
    """Every hugepage-directory backend with a prepared ``kvmaccel-<id>`` gets that file and
    share true; a backend of the same guest without one, and all else, stays as it was."""
    text = " ".join(shlex.quote(a) for a in libvirt_argv(args_file))
    for prefix in MOUNT_PREFIXES:
        text = text.replace(prefix, f"{tmp_path}{prefix}")
    argv = shlex.split(text)
    backends = _dir_backends([a.replace(str(tmp_path), "") for a in argv])
    skipped = backends[-1][1]["id"] if len(backends) > 1 else None  # one left unprepared
    for _, obj in backends:
        directory = f"{tmp_path}{obj['mem-path']}"
        os.makedirs(directory, exist_ok=True)
        if obj["id"] != skipped:
            open(os.path.join(directory, f"kvmaccel-{obj['id']}"), "w").close()
    got = run(front_script, argv)
    changed = {i for i, _ in backends if json.loads(argv[i])["id"] != skipped}
    assert len(got) == len(argv)
    for i, (want, have) in enumerate(zip(argv, got, strict=True)):
        if i not in changed:
            assert have == want
            continue
        expected = json.loads(want)
        expected["mem-path"] = f"{expected['mem-path']}/kvmaccel-{expected['id']}"
        expected["share"] = True
        assert json.loads(have) == expected
        assert list(json.loads(have))[:3] == ["qom-type", "id", "mem-path"]


def test_a_symlink_or_directory_is_not_a_prepared_file(front_script: str, tmp_path: str) -> None:
    """The qemu user owns the guest's directory: whatever it put there that is not a regular
    file is not handed to QEMU as kvmaccel's (it would only fool its own guest, but the
    front never follows a name kvmaccel did not make the way it makes them)."""
    d = os.path.join(str(tmp_path), "d")
    os.mkdir(d)
    os.symlink("/etc/passwd", os.path.join(d, "kvmaccel-ram-node0"))
    os.mkdir(os.path.join(d, "kvmaccel-ram-node1"))
    argv = ["-object", json.dumps({"qom-type": "memory-backend-file", "id": "ram-node0",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":")),
            "-object", json.dumps({"qom-type": "memory-backend-file", "id": "ram-node1",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":"))]
    assert run(front_script, argv) == argv


def test_escaped_values_pass_through(front_script: str, tmp_path: str) -> None:
    d = os.path.join(str(tmp_path), 'a"b')
    os.mkdir(d)
    open(os.path.join(d, "kvmaccel-pc.ram"), "w").close()
    argv = ["-object", json.dumps({"qom-type": "memory-backend-file", "id": "pc.ram",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":"))]
    assert run(front_script, argv) == argv


MEMFD_CASES = [a for a in ARGS if any(o["qom-type"] == "memory-backend-memfd" and o.get("hugetlb")
                                      for _, o in objects(libvirt_argv(a)))]


@pytest.mark.parametrize("args_file", MEMFD_CASES, ids=os.path.basename)
def test_a_hugetlb_memfd_becomes_a_file_on_the_mount_of_its_page_size(
        front_script: str, args_file: str) -> None:
    argv = libvirt_argv(args_file)
    short = "-1-instance-00000092"
    home = f"/var/lib/libvirt/qemu/domain-{short}"
    assert run(front_script, argv, home) == argv  # no file: untouched
    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as mount:
        directory = os.path.join(mount, "libvirt", "qemu", short)
        os.makedirs(directory)
        assert run(front_script, argv, home) == argv  # still no file
        memfds = [(i, o) for i, o in objects(argv) if o["qom-type"] == "memory-backend-memfd"]
        for _, obj in memfds:
            open(os.path.join(directory, f"kvmaccel-{obj['id']}"), "w").close()
        got = run(front_script, argv, home)
        assert run(front_script, argv, "/root") == argv  # not a libvirt guest's HOME
    changed = {i for i, _ in memfds}
    for i, (want, have) in enumerate(zip(argv, got, strict=True)):
        if i not in changed:
            assert have == want
            continue
        expected = {k: v for k, v in json.loads(want).items()
                    if k not in ("hugetlb", "hugetlbsize", "seal")}
        expected.update({"qom-type": "memory-backend-file",
                         "mem-path": f"{directory}/kvmaccel-{expected['id']}", "share": True})
        assert json.loads(have) == expected


def test_a_memfd_of_another_page_size_is_left_alone(front_script: str) -> None:
    short = "-1-g"
    argv = ["-object", '{"qom-type":"memory-backend-memfd","id":"ram-node0","hugetlb":true,'
            '"hugetlbsize":1073741824,"share":true,"prealloc":true,"size":1073741824}']
    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as mount:
        directory = os.path.join(mount, "libvirt", "qemu", short)
        os.makedirs(directory)
        open(os.path.join(directory, "kvmaccel-ram-node0"), "w").close()
        assert run(front_script, argv, f"/x/domain-{short}") == argv


def test_install_status_uninstall_touch_only_what_install_wrote(fake_qemu: str) -> None:
    path = front.front_path(fake_qemu)
    status = front.install(fake_qemu)
    assert (status.installed, status.qemu) == (True, fake_qemu)
    assert os.stat(path).st_mode & 0o7777 == 0o755
    assert front.is_front(path) and not front.is_front(fake_qemu)
    with pytest.raises(front.HookError, match="itself kvmaccel's front"):
        front.install(path)
    assert front.uninstall(path) and not os.path.exists(path)
    assert not front.uninstall(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\nexec something-else\n")
    with pytest.raises(front.HookError, match="did not write"):
        front.install(fake_qemu)
    with pytest.raises(front.HookError, match="not written by kvmaccel"):
        front.uninstall(path)
    assert os.path.exists(path)


def _median_ms(cmd: list[str], runs: int = 41) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def test_the_front_adds_at_most_10_ms_to_a_start_it_does_not_serve(
        front_script: str, fake_qemu: str) -> None:
    """Alternating runs of the stand-in QEMU directly and through the front, on the longest
    libvirt command line here, with memory backends and no prepared file."""
    argv = max((libvirt_argv(a) for a in ARGS), key=len)
    direct, through = [], []
    for _ in range(5):
        direct.append(_median_ms([fake_qemu, *argv], 9))
        through.append(_median_ms([front_script, *argv], 9))
    overhead = statistics.median(through) - statistics.median(direct)
    print(f"front overhead: {overhead:.2f} ms ({len(argv)} arguments; direct "
          f"{statistics.median(direct):.2f} ms, through the front "
          f"{statistics.median(through):.2f} ms)")
    assert overhead <= 10


def test_against_the_real_qemu_the_front_adds_at_most_10_ms(tmp_path: str) -> None:
    """The same, with the real QEMU: libvirt's longest command line here plus ``-version``
    (QEMU parses every option, creates no object, prints its version and exits)."""
    qemu = "/usr/bin/qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        pytest.skip("needs qemu-system-x86")
    script = front.install(qemu, os.path.join(str(tmp_path), "qemu-system-x86_64-kvmaccel"))
    argv = [*max((libvirt_argv(a) for a in ARGS), key=len), "-version"]
    assert subprocess.run([qemu, *argv], capture_output=True, check=False).returncode == 0
    direct, through = [], []
    for _ in range(5):
        direct.append(_median_ms([qemu, *argv], 7))
        through.append(_median_ms([script.path, *argv], 7))
    overhead = statistics.median(through) - statistics.median(direct)
    print(f"front overhead on the real QEMU: {overhead:.2f} ms (direct "
          f"{statistics.median(direct):.2f} ms)")
    assert overhead <= 10


# --- enable and disable: disable(enable(x)) == x byte for byte, and enable's XML is right ---

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN_FILES = sorted(glob.glob(os.path.join(TOP, "vm-fixtures", "*.xml"))
                      + glob.glob(os.path.join(TOP, "tests", "data", "libvirt-cases", "*.xml")))
QEMU = "/usr/bin/qemu-system-x86_64"
BASE = (f"<domain type='kvm'>\n  <name>g</name>\n"
        "  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n"
        f"  <memory unit='MiB'>64</memory>\n  <devices>\n    <emulator>{QEMU}</emulator>\n"
        "  </devices>\n</domain>\n")
EMULATOR = f"<emulator>{QEMU}</emulator>"
NO_EMULATOR = BASE.replace(f"    {EMULATOR}\n", "")


def _with(old: str, new: str, text: str = BASE) -> str:
    assert old in text
    return text.replace(old, new)


# (id, XML, the emulator it has as libvirt reads it; None: none)
ODD_XML: list[tuple[str, str, str | None]] = [
    ("plain", BASE, QEMU),
    ("no-trailing-newline", BASE.rstrip("\n"), QEMU),
    ("crlf", BASE.replace("\n", "\r\n"), QEMU),
    ("crlf-no-emulator", NO_EMULATOR.replace("\n", "\r\n"), None),
    ("tabs", BASE.replace("  ", "\t"), QEMU),
    ("one-line", BASE.replace("\n", "").replace("  ", ""), QEMU),
    ("xml-declaration", "<?xml version='1.0' encoding='UTF-8'?>\n" + BASE, QEMU),
    ("bom", "\ufeff" + BASE, QEMU),
    ("no-uuid", _with("  <uuid>11111111-2222-3333-4444-555555555555</uuid>\n", ""), QEMU),
    ("metadata-self-closed", _with("</uuid>\n", "</uuid>\n  <metadata/>\n"), QEMU),
    ("metadata-self-closed-attrs",
     _with("</uuid>\n", "</uuid>\n  <metadata xmlns:x='urn:x' />\n"), QEMU),
    ("metadata-empty", _with("</uuid>\n", "</uuid>\n  <metadata></metadata>\n"), QEMU),
    ("metadata-other-app",
     _with("</uuid>\n", "</uuid>\n  <metadata>\n    <app:x xmlns:app='urn:a' b='1'/>\n"
                        "  </metadata>\n"), QEMU),
    ("metadata-spaced-tag", _with("</uuid>\n", "</uuid>\n  <metadata >\n  </metadata >\n"),
     QEMU),
    ("emulator-self-closed", _with(EMULATOR, "<emulator/>"), ""),
    ("emulator-empty", _with(EMULATOR, "<emulator></emulator>"), ""),
    ("emulator-attribute", _with(EMULATOR, f"<emulator type='x'>{QEMU}</emulator>"), QEMU),
    ("emulator-spaces", _with(EMULATOR, f"<emulator> {QEMU} </emulator>"), f" {QEMU} "),
    ("emulator-cdata", _with(EMULATOR, f"<emulator><![CDATA[{QEMU}]]></emulator>"), QEMU),
    ("emulator-amp", _with(QEMU, "/opt/q&amp;x"), "/opt/q&x"),
    ("emulator-apos", _with(QEMU, "/opt/q&apos;x"), "/opt/q'x"),
    ("emulator-quot", _with(QEMU, "/opt/q&quot;x"), '/opt/q"x'),
    ("emulator-raw-quote", _with(QEMU, '/opt/q"x'), '/opt/q"x'),
    ("emulator-lt", _with(QEMU, "/opt/q&lt;x"), "/opt/q<x"),
    ("emulator-charref", _with(QEMU, "/usr/bin/qemu&#45;system-x86_64"), QEMU),
    ("emulator-in-comment", _with("<devices>\n", "<devices>\n    <!-- <emulator>/old</emulator>"
                                                 " -->\n"), QEMU),
    ("devices-in-comment", _with("  <devices>", "  <!-- <devices> -->\n  <devices>"), QEMU),
    ("metadata-in-comment", _with("</uuid>\n", "</uuid>\n  <!-- <metadata> -->\n"), QEMU),
    ("emulator-in-cdata", _with("</uuid>\n", "</uuid>\n  <title><![CDATA[<emulator>/a"
                                             "</emulator>]]></title>\n"), QEMU),
    ("metadata-in-cdata", _with("</uuid>\n", "</uuid>\n  <description><![CDATA[<metadata>]]>"
                                             "</description>\n"), QEMU),
    ("emulator-in-metadata", _with("</uuid>\n", "</uuid>\n  <metadata>\n    <a:b xmlns:a="
                                                "'urn:a'><emulator>/x</emulator></a:b>\n"
                                                "  </metadata>\n"), QEMU),
    ("no-emulator", NO_EMULATOR, None),
    ("devices-self-closed", _with("  <devices>\n  </devices>", "  <devices/>", NO_EMULATOR),
     None),
    ("attributes-reordered-note-of-another-ns",
     _with("</uuid>\n", "</uuid>\n  <metadata>\n    <k:front emulator='x' xmlns:k='urn:other'/>"
                        "\n  </metadata>\n"), QEMU),
]


def _check_enabled(xml: str, had: str | None) -> None:
    """What libvirt will read: one <metadata> with one note remembering ``had``, and one
    <emulator> that is the front."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml.lstrip("\ufeff").encode())
    emulators = root.findall("devices/emulator")
    assert len(emulators) == 1 and emulators[0].text == front.front_path(
        (had or "").strip() or front.DEFAULT_QEMU), xml
    metadata = root.findall("metadata")
    assert len(metadata) == 1, xml
    notes = metadata[0].findall(f"{{{front.METADATA_NS}}}front")
    assert len(notes) == 1 and notes[0].get("emulator") == (had or ""), xml


@pytest.mark.parametrize("path", DOMAIN_FILES, ids=os.path.basename)
def test_every_domain_file_round_trips_byte_for_byte(path: str) -> None:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    enabled = front.enable_xml(text)
    assert enabled.changed
    _check_enabled(enabled.xml, enabled.old)
    assert front.disable_xml(enabled.xml).xml == text


@pytest.mark.parametrize(("text", "had"), [c[1:] for c in ODD_XML], ids=[c[0] for c in ODD_XML])
def test_odd_xml_round_trips_byte_for_byte(text: str, had: str | None) -> None:
    enabled = front.enable_xml(text)
    assert enabled.changed and enabled.old == (had.strip() if had is not None else None)
    _check_enabled(enabled.xml, had)
    assert front.remembered_emulator(enabled.xml) == (had or "")
    assert not front.enable_xml(enabled.xml).changed
    disabled = front.disable_xml(enabled.xml)
    assert disabled.changed and disabled.xml == text
    assert not front.disable_xml(text).changed


def test_a_note_written_before_is_undone() -> None:
    """enable before this change wrote only emulator, none and meta (``"`` as &quot;)."""
    note = (f'<kvmaccel:front xmlns:kvmaccel="{front.METADATA_NS}" emulator="/opt/q&quot;x&amp;y"'
            ' meta="1"/>')
    enabled = _with("</uuid>\n", f"</uuid>\n  <metadata>\n    {note}\n  </metadata>\n",
                    _with(QEMU, "/opt/q&quot;x&amp;y-kvmaccel"))
    assert front.disable_xml(enabled).xml == _with(QEMU, '/opt/q"x&amp;y')


@pytest.mark.parametrize("text", ["not xml", "", "<html/>", "<domain><name>g</name></domain>",
                                  "<!DOCTYPE domain><domain/>"])
def test_enable_refuses_what_is_no_domain_in_one_line(text: str) -> None:
    with pytest.raises(KvmaccelError) as e:
        front.enable_xml(text)
    assert "\n" not in str(e.value)
