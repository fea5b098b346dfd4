"""The emulator front (kvmaccel/setup/front.py) on libvirt's own command lines.

The front is a /bin/sh script; these tests run it for real, with a stand-in "QEMU" that prints
the argv it got, on the 20 ``.args`` files of ``tests/data/libvirt-cases`` (JSON ``-object``, as
libvirt 9.0 writes them), and check that it changes exactly the backends with a prepared file
and nothing else, byte for byte.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from kvmaccel.errors import KvmaccelError
from kvmaccel.serve import memdir
from kvmaccel.setup import front
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


QEMU_USER = "libvirt-qemu"  # Debian's qemu.conf user: whom libvirt runs the front as


def qemu_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"needs the {QEMU_USER} user (libvirt-daemon-system)")
    return pw.pw_uid, pw.pw_gid


def drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


@contextlib.contextmanager
def reachable_dir() -> Iterator[str]:
    """A directory every user can read: the fronts and stand-in QEMUs go there (pytest's
    tmp_path is root's, mode 0700), so that they run as the qemu user too."""
    path = tempfile.mkdtemp(prefix="kvtest-front-", dir="/run")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def write_fake_qemu(directory: str) -> str:
    """A stand-in QEMU that prints its argv, then (after a \\1) the descriptors 3 to 9 it
    inherited and what they are."""
    path = os.path.join(directory, "qemu-system-x86_64")
    with open(path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\nprintf '%s\\0' \"$@\"\nprintf '\\1\\0'\n"
                "for n in 3 4 5 6 7 8 9; do [ -h /proc/self/fd/$n ] && "
                "printf '%s=%s\\0' $n \"$(readlink /proc/self/fd/$n)\"; done; exit 0\n")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def bin_dir() -> Iterator[str]:
    with reachable_dir() as path:
        yield path


@pytest.fixture
def fake_qemu(bin_dir: str) -> str:
    return write_fake_qemu(bin_dir)


@pytest.fixture
def front_script(fake_qemu: str) -> str:
    path = front.install(fake_qemu).path
    assert path == fake_qemu + "-kvmaccel"
    return path


def run_front(script: str, argv: list[str], home: str = "/nonexistent",
              as_qemu: bool = False) -> tuple[list[str], dict[int, str]]:
    """The argv the stand-in QEMU got through ``script`` (run as the qemu user when
    ``as_qemu``), and the descriptors it inherited (number -> what it is)."""
    drop = None
    if as_qemu:
        uid, gid = qemu_ids()
        drop = lambda: drop_to(uid, gid)  # noqa: E731
    out = subprocess.run([script, *argv], check=True, capture_output=True, preexec_fn=drop,
                         env={"PATH": "/usr/bin:/bin", "HOME": home}).stdout
    words = out.decode().split("\0")[:-1]
    if "\1" not in words:
        return words, {}
    at = words.index("\1")
    fds = dict(w.split("=", 1) for w in words[at + 1:])
    return words[:at], {int(n): target for n, target in fds.items()}


def run(script: str, argv: list[str], home: str = "/nonexistent",
        as_qemu: bool = False) -> list[str]:
    return run_front(script, argv, home, as_qemu)[0]


def home_of(short: str) -> str:
    """The HOME libvirt gives a guest's QEMU: its per-domain directory."""
    return f"/var/lib/libvirt/qemu/domain-{short}"


def libvirt_dir(mount: str, short: str) -> str:
    """``<mount>/libvirt/qemu/<short>`` as libvirt makes it: the parent root's (0755), the
    guest's directory the qemu user's (0700)."""
    parent = os.path.join(mount, "libvirt", "qemu")
    os.makedirs(parent, exist_ok=True)
    for p in (os.path.join(mount, "libvirt"), parent):
        os.chmod(p, 0o755)
    d = os.path.join(parent, short)
    os.mkdir(d, 0o700)
    os.chown(d, *qemu_ids())
    return d


def hook_files(d: str, ids: list[str], size: int = 0) -> memdir.ProofDir:
    """What kvmaccel's hook leaves at ``start begin``: this start's proof directory (made by
    the hook's own code) with a file ``kvmaccel-<id>`` of the qemu user for each id."""
    proof = memdir.make_proof_dir(d)
    for backend_id in ids:
        path = os.path.join(proof.path, f"kvmaccel-{backend_id}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.ftruncate(fd, size)
        os.fchown(fd, proof.uid, proof.gid)
        os.close(fd)
    return proof


def as_qemu_user(code: str, *args: str) -> None:
    """Run ``code`` (Python) as the qemu user, as a compromised QEMU or anything else running
    as that user would."""
    uid, gid = qemu_ids()
    subprocess.run(["/usr/bin/python3", "-c", code, *args], check=True, cwd="/",
                   preexec_fn=lambda: drop_to(uid, gid))


def as_nobody(code: str, *args: str) -> None:
    subprocess.run(["/usr/bin/python3", "-c", code, *args], check=True, cwd="/",
                   preexec_fn=lambda: drop_to(65534, 65534))


def served(path: str, backend_id: str, fds: dict[int, str], proof_dir: str) -> bool:
    """``path`` is the hook's file as the front hands it: through a descriptor the stand-in
    QEMU inherited, held on the proof directory."""
    head, sep, name = path.rpartition("/")
    if name != f"kvmaccel-{backend_id}" or not head.startswith("/proc/self/fd/"):
        return False
    return fds.get(int(head.rsplit("/", 1)[1])) == proof_dir


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
@pytest.mark.parametrize("as_qemu", [True, False], ids=["qemu-user", "root"])
def test_a_prepared_file_replaces_the_directory_and_is_shared(
        front_script: str, args_file: str, bin_dir: str, as_qemu: bool) -> None:
    """Every hugepage-directory backend with a file the hook prepared gets that file (through
    the descriptor the front holds on the proof directory) and share true; a backend of the
    same guest without one, and all else, stays as it was.  As the qemu user (libvirt's) and
    as root (a root QEMU under ``--divert``: then the guest's directory is root's)."""
    base = os.path.join(bin_dir, "m")
    text = " ".join(shlex.quote(a) for a in libvirt_argv(args_file))
    for prefix in MOUNT_PREFIXES:
        text = text.replace(prefix, f"{base}{prefix}")
    argv = shlex.split(text)
    backends = _dir_backends([a.replace(base, "") for a in argv])
    skipped = backends[-1][1]["id"] if len(backends) > 1 else None  # one left unprepared
    short = os.path.basename(str(backends[0][1]["mem-path"]))
    dirs: dict[str, list[str]] = {}
    for _, obj in backends:
        dirs.setdefault(f"{base}{obj['mem-path']}", []).extend(
            [] if obj["id"] == skipped else [str(obj["id"])])
    proofs = {}
    for d, ids in dirs.items():
        mount = d[:-len(f"/libvirt/qemu/{short}")]
        os.makedirs(mount, exist_ok=True)
        libvirt_dir(mount, short)
        if not as_qemu:
            os.chown(d, 0, 0)
        proofs[d] = hook_files(d, ids).path
    got, fds = run_front(front_script, argv, home_of(short), as_qemu)
    changed = {i for i, _ in backends if json.loads(argv[i])["id"] != skipped}
    assert len(got) == len(argv)
    for i, (want, have) in enumerate(zip(argv, got, strict=True)):
        if i not in changed:
            assert have == want
            continue
        expected = json.loads(want)
        path = json.loads(have)["mem-path"]
        assert served(path, expected["id"], fds, proofs[expected["mem-path"]]), (path, fds)
        expected["mem-path"] = path
        expected["share"] = True
        assert json.loads(have) == expected
        assert list(json.loads(have))[:3] == ["qom-type", "id", "mem-path"]
    assert len(fds) == len(dirs)  # one descriptor per guest directory


def test_a_symlink_or_directory_is_not_a_prepared_file(front_script: str, bin_dir: str) -> None:
    """Inside the hook's proof directory too, only a regular file is a prepared file."""
    d = libvirt_dir(bin_dir, "5-g")
    proof = hook_files(d, [])
    os.symlink("/etc/passwd", os.path.join(proof.path, "kvmaccel-ram-node0"))
    os.mkdir(os.path.join(proof.path, "kvmaccel-ram-node1"))
    argv = ["-object", json.dumps({"qom-type": "memory-backend-file", "id": "ram-node0",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":")),
            "-object", json.dumps({"qom-type": "memory-backend-file", "id": "ram-node1",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":"))]
    assert run(front_script, argv, home_of("5-g"), as_qemu=True) == argv


def test_escaped_values_pass_through(front_script: str, bin_dir: str) -> None:
    d = libvirt_dir(os.path.join(bin_dir, 'a"b'), "5-g")
    hook_files(d, ["pc.ram"])
    argv = ["-object", json.dumps({"qom-type": "memory-backend-file", "id": "pc.ram",
                                   "mem-path": d, "size": 2097152}, separators=(",", ":"))]
    assert run(front_script, argv, home_of("5-g"), as_qemu=True) == argv


MEMFD_CASES = [a for a in ARGS if any(o["qom-type"] == "memory-backend-memfd" and o.get("hugetlb")
                                      for _, o in objects(libvirt_argv(a)))]


@pytest.mark.parametrize("args_file", MEMFD_CASES, ids=os.path.basename)
def test_a_hugetlb_memfd_becomes_a_file_on_the_mount_of_its_page_size(
        front_script: str, args_file: str) -> None:
    argv = libvirt_argv(args_file)
    short = "-1-instance-00000092"
    home = home_of(short)
    assert run(front_script, argv, home, as_qemu=True) == argv  # no file: untouched
    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as mount:
        directory = libvirt_dir(mount, short)
        assert run(front_script, argv, home, as_qemu=True) == argv  # still no file
        memfds = [(i, o) for i, o in objects(argv) if o["qom-type"] == "memory-backend-memfd"]
        proof = hook_files(directory, [str(o["id"]) for _, o in memfds])
        got, fds = run_front(front_script, argv, home, as_qemu=True)
        assert run(front_script, argv, "/root", as_qemu=True) == argv  # not a guest's HOME
    changed = {i for i, _ in memfds}
    for i, (want, have) in enumerate(zip(argv, got, strict=True)):
        if i not in changed:
            assert have == want
            continue
        expected = {k: v for k, v in json.loads(want).items()
                    if k not in ("hugetlb", "hugetlbsize", "seal")}
        path = json.loads(have)["mem-path"]
        assert served(path, str(expected["id"]), fds, proof.path), (path, fds)
        expected.update({"qom-type": "memory-backend-file", "mem-path": path, "share": True})
        assert json.loads(have) == expected


def test_a_memfd_of_another_page_size_is_left_alone(front_script: str) -> None:
    short = "-1-g"
    argv = ["-object", '{"qom-type":"memory-backend-memfd","id":"ram-node0","hugetlb":true,'
            '"hugetlbsize":1073741824,"share":true,"prealloc":true,"size":1073741824}']
    with private_mount("hugetlbfs", "pagesize=2M,mode=0755") as mount:
        hook_files(libvirt_dir(mount, short), ["ram-node0"])
        assert run(front_script, argv, home_of(short), as_qemu=True) == argv


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


def test_install_refuses_a_directory_others_can_write(bin_dir: str) -> None:
    """libvirt runs the front as the qemu user: in a directory another user can write, a
    name swapped there would run instead.  The directory was opened and never checked."""
    qemu = write_fake_qemu(bin_dir)
    os.chmod(bin_dir, 0o777)
    with pytest.raises(KvmaccelError, match="others can write it"):
        front.install(qemu)
    assert os.listdir(bin_dir) == ["qemu-system-x86_64"]


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


def test_the_proof_directory_has_one_name_everywhere() -> None:
    """The planner places the front's files in it, the hook makes it, the front checks it."""
    from kvmaccel.plan import planner

    assert memdir.PROOF_DIR == planner.FRONT_DIR == front.PROOF_DIR == ".kvmaccel"
    assert '"$d/.kvmaccel"' in front.SCRIPT
    assert planner.FRONT_PREFIX == front.FILE_PREFIX and "kvmaccel-$id" in front.SCRIPT


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
