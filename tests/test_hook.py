"""kvmaccel.libvirt.full, the libvirt hook contract, on real tmpfs files without libvirt.

What libvirt does around the hook is done here by hand: a qemu.conf whose memory_backing_dir
is on /dev/shm, the per-domain directory made before ``start begin`` and deleted before
``stopped end``, the XML on stdin (with ``id`` from prepare on, without it at stop).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmaccel.engine import records
from kvmaccel.engine.backing import created_by_us
from kvmaccel.libvirt import entry, warm
from kvmaccel.libvirt import full as hook
from kvmaccel.plan.config import HookConfig
from kvmaccel.serve import state as serve_state

NAME = "kvtest-hook"
UUID = "0e6c4c39-51b0-4b0e-9d7e-6b1d2a3c4d5e"
SIZE_MIB = 64


def domain_xml(size_mib: int = SIZE_MIB, domain_id: int | None = 7) -> bytes:
    id_attr = f" id='{domain_id}'" if domain_id is not None else ""
    return f"""<domain type='kvm'{id_attr}>
  <name>{NAME}</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>{size_mib}</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>""".encode()


class NoRead(io.BytesIO):
    def read(self, *args: object) -> bytes:
        raise AssertionError("the hook read stdin for an operation it ignores")


@dataclass
class Env:
    config_path: str
    log_file: str
    domain_dir: str
    file_path: str

    def write_config(self, extra: str = "") -> None:
        with open(self.config_path, "w") as f:
            f.write(f'syslog = false\nlog_file = "{self.log_file}"\nlog_level = "debug"\n'
                    f'run_dir = "{os.environ["KVMACCEL_RUN_DIR"]}"\n'
                    f'qemu_conf = "{os.path.dirname(self.config_path)}/qemu.conf"\n{extra}')

    def run(self, op: str, subop: str, xml: bytes | None = None) -> int:
        return entry.main([NAME, op, subop, "-"],
                          io.BytesIO(domain_xml() if xml is None else xml),
                          config_path=self.config_path)

    def log(self) -> str:
        with open(self.log_file) as f:
            return f.read()


@pytest.fixture
def env(tmp_path: object, shm_dir: str, monkeypatch: pytest.MonkeyPatch) -> Env:
    with open(f"{tmp_path}/qemu.conf", "w") as f:
        f.write(f'memory_backing_dir = "{shm_dir}"\n')
    domain_dir = f"{shm_dir}/libvirt/qemu/7-{NAME}"
    e = Env(f"{tmp_path}/kvmaccel.toml", f"{tmp_path}/hook.log", domain_dir,
            f"{domain_dir}/pc.ram")
    e.write_config()
    monkeypatch.setattr(hook, "FALLBACK_CONFIG", HookConfig(syslog=False, log_file=e.log_file))
    return e


def test_wrong_argv_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert hook.main(["a", "b"], NoRead()) == 2
    out = capsys.readouterr()
    assert out.out == "" and "usage:" in out.err


@pytest.mark.parametrize(("op", "subop"), [
    ("stopped", "begin"), ("release", "begin"), ("migrate", "begin"),
    ("restore", "begin"), ("reconnect", "begin"), ("attach", "begin"), ("prepare", "end"),
    ("start", "end"), ("unknown", "-"),
])
def test_other_operations_exit_0_without_reading(op: str, subop: str, env: Env,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert hook.main([NAME, op, subop, "-"], NoRead(), config_path=env.config_path) == 0
    assert capsys.readouterr() == ("", "")
    assert not os.path.exists(env.log_file)


def test_start_populates_and_stop_removes(env: Env, run_dir: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert env.run("prepare", "begin") == 0
    assert "plan: populate" in env.log()
    os.makedirs(env.domain_dir)  # libvirt makes it just before `start begin`
    assert env.run("start", "begin") == 0
    st = os.stat(env.file_path)
    assert st.st_size == SIZE_MIB << 20 and st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 == SIZE_MIB << 20  # every page is there before QEMU runs
    assert (st.st_uid, st.st_gid) == (os.stat(env.domain_dir).st_uid,
                                      os.stat(env.domain_dir).st_gid)
    assert created_by_us(env.file_path)
    with open(f"{run_dir}/domains/{UUID}.json") as f:
        state = json.load(f)
    assert state["files"] == [env.file_path] and state["id"] == 7
    assert state["result"]["bytes"] == SIZE_MIB << 20
    summary = [line for line in env.log().splitlines() if "populated 64M of tmpfs 4K in" in line]
    assert len(summary) == 1 and f"{NAME} start: INFO" in summary[0]
    assert "GiB/s" in summary[0] and "helpers per node" in summary[0]

    # At stop the XML has no id; the file is found through the uuid.
    assert env.run("stopped", "end", domain_xml(domain_id=None)) == 0
    assert not os.path.exists(env.file_path)
    assert not os.path.exists(f"{run_dir}/domains/{UUID}.json")
    assert os.listdir(f"{run_dir}/files") == []
    assert env.run("release", "end", domain_xml(domain_id=None)) == 0
    assert capsys.readouterr().out == ""
    # One record per start and stop (the release after it finds nothing left to stop).
    start, stop = records.read()
    assert (start["event"], start["result"], start["source"]) == ("start", "ok", "fresh")
    assert start["uuid"] == UUID and start["domain"] == NAME
    assert start["bytes"] == SIZE_MIB << 20 and start["memory"] == "tmpfs 4K"
    assert start["seconds"] >= start["populate_seconds"] > 0 and start["helpers_per_node"]
    assert (stop["event"], stop["uuid"], stop["bytes"]) == ("stop", UUID, SIZE_MIB << 20)


def test_stop_after_libvirt_removed_the_directory(env: Env, run_dir: str) -> None:
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    shutil.rmtree(env.domain_dir)  # what libvirt does before `stopped end`
    assert env.run("stopped", "end", domain_xml(domain_id=None)) == 0
    assert os.listdir(f"{run_dir}/files") == [] and os.listdir(f"{run_dir}/domains") == []
    assert "libvirt removed the files" in env.log()


def test_stop_leaves_a_file_kvmaccel_did_not_create(env: Env, run_dir: str) -> None:
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    os.unlink(env.file_path)
    with open(env.file_path, "w") as f:  # someone else's file at the same path now
        f.write("x")
    assert env.run("stopped", "end", domain_xml(domain_id=None)) == 0
    assert os.path.exists(env.file_path)
    assert "left alone" in env.log()


def test_existing_file_fails_open_and_is_untouched(env: Env) -> None:
    os.makedirs(env.domain_dir)
    with open(env.file_path, "w") as f:
        f.write("guest data")
    assert env.run("start", "begin") == 0
    with open(env.file_path) as f:
        assert f.read() == "guest data"
    assert "failing open" in env.log() and "not created by kvmaccel" in env.log()


def test_strict_refuses_with_one_line(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.write_config("strict = true\n")
    assert env.run("start", "begin") == 1  # the per-domain directory does not exist
    err = capsys.readouterr()
    assert err.out == ""
    assert err.err.startswith("kvmaccel: ") and err.err.count("\n") == 1
    assert "should have been made before the start" in err.err
    assert "strict = true: refusing the start" in env.log()


def test_capacity_checked_at_prepare(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    huge = domain_xml(size_mib=64 << 20)  # 64 TiB: more than any test machine has
    assert env.run("prepare", "begin", huge) == 0
    assert "failing open" in env.log() and "is free (MemAvailable)" in env.log()
    env.write_config("strict = true\n")
    assert env.run("prepare", "begin", huge) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvmaccel: guest {NAME} needs 64T") and "free memory" in err


def test_time_budget_cancels_and_removes_the_file(env: Env, run_dir: str) -> None:
    env.write_config("strict = true\npopulate_timeout_s = 0.001\n[limits]\nthreads = 1\n"
                     "min_chunk_mib = 2\n")
    os.makedirs(env.domain_dir)
    big = domain_xml(size_mib=2048)
    assert env.run("start", "begin", big) == 0  # never fatal, even when strict
    assert not os.path.exists(env.file_path)
    assert "populate ran past populate_timeout_s = 0.001 s" in env.log()
    with open(f"{run_dir}/domains/{UUID}.json") as f:
        assert json.load(f)["files"] == []


def test_broken_config_fails_open(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    with open(env.config_path, "w") as f:
        f.write("strict = [\n")
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    assert capsys.readouterr() == ("", "")
    assert not os.path.exists(env.file_path)
    assert "not valid TOML" in env.log() and "failing open" in env.log()


def test_disabled_does_nothing(env: Env) -> None:
    env.write_config("enabled = false\n")
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    assert not os.path.exists(env.file_path)


def test_nothing_to_populate(env: Env) -> None:
    xml = domain_xml().replace(b"<source type='file'/><access mode='shared'/>", b"")
    assert env.run("prepare", "begin", xml) == 0
    assert env.run("start", "begin", xml) == 0
    assert "nothing for kvmaccel to populate" in env.log()
    assert "anonymous memory" in env.log()


def test_state_key_cannot_leave_the_directory() -> None:
    with pytest.raises(Exception, match="cannot name a state file"):
        serve_state.state_path("../x")


# --- the warm pool through the hook -----------------------------------------------------------

def stop(env: Env) -> None:
    shutil.rmtree(env.domain_dir)  # what libvirt does before `stopped end`
    assert env.run("stopped", "end", domain_xml(domain_id=None)) == 0


def pool_states(run_dir: str, shm_dir: str) -> list[str]:
    from kvmaccel.pool.manage import Pool

    return [e.state for e in Pool(os.path.join(shm_dir, ".kvmaccel-pool"),
                                  state_root=os.path.join(run_dir, "pool")).entries()]


def wait_clean(run_dir: str, shm_dir: str) -> None:
    import time

    for _ in range(200):
        if pool_states(run_dir, shm_dir) == ["clean"]:
            return
        time.sleep(0.05)
    pytest.fail(f"pool states {pool_states(run_dir, shm_dir)}")


def test_second_start_takes_the_fast_path_from_the_pool(env: Env, run_dir: str,
                                                        shm_dir: str) -> None:
    # First start: populated fresh, joins the pool in use; no recipe (nothing was clean).
    assert env.run("prepare", "begin") == 0
    assert not os.path.exists(serve_state.recipe_path(UUID))
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    assert os.stat(env.file_path).st_nlink == 2
    stop(env)
    wait_clean(run_dir, shm_dir)  # the detached scrub ran
    assert "scrubbing in the background" in env.log()

    # Second start: prepare finds the clean file and leaves a recipe; start links it
    # without planning (no populate, no import of the planner needed).
    with open(serve_state.cache_path(UUID)) as f:
        assert json.load(f)["shortname_tail"] == NAME
    assert env.run("prepare", "begin") == 0
    assert "plan: as before; the pool serves" in env.log()  # no planning at all
    with open(serve_state.recipe_path(UUID)) as f:
        recipe = json.load(f)
    assert recipe["id"] == 7 and [b["mem_path"] for b in recipe["backends"]] == [env.file_path]
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    assert not os.path.exists(serve_state.recipe_path(UUID))
    with open(serve_state.state_path(UUID)) as f:
        state = json.load(f)
    assert state["files"] == [] and "result" not in state
    [link] = state["pool_links"]
    assert link["link_path"] == env.file_path and os.stat(env.file_path).st_nlink == 2
    assert "started from the pool" in env.log()
    assert pool_states(run_dir, shm_dir) == ["in_use"]
    stop(env)
    wait_clean(run_dir, shm_dir)


def test_a_stale_recipe_is_not_trusted(env: Env, run_dir: str, shm_dir: str) -> None:
    assert env.run("prepare", "begin") == 0
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    stop(env)
    wait_clean(run_dir, shm_dir)
    assert env.run("prepare", "begin") == 0
    # The guest got another id between prepare and start: the recipe's paths are wrong.
    os.makedirs(f"{shm_dir}/libvirt/qemu/8-{NAME}")
    assert env.run("start", "begin", domain_xml(domain_id=8)) == 0
    with open(serve_state.state_path(UUID)) as f:
        state = json.load(f)
    assert state["id"] == 8 and state["files"] == []  # the full path, from the pool too
    assert state["pool_links"][0]["link_path"] == f"{shm_dir}/libvirt/qemu/8-{NAME}/pc.ram"


def test_pool_disabled_in_the_config(env: Env, run_dir: str, shm_dir: str) -> None:
    env.write_config("[pool]\nenabled = false\n")
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    assert os.stat(env.file_path).st_nlink == 1
    assert not os.path.exists(os.path.join(shm_dir, ".kvmaccel-pool"))


def test_a_changed_xml_or_qemu_conf_is_planned_again(env: Env, run_dir: str,
                                                     shm_dir: str) -> None:
    assert env.run("prepare", "begin") == 0
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    stop(env)
    wait_clean(run_dir, shm_dir)
    assert (warm.plan_inputs(domain_xml(), "/q", None)
            == warm.plan_inputs(domain_xml(domain_id=99), "/q", None))
    assert (warm.plan_inputs(domain_xml(), "/q", None)
            != warm.plan_inputs(domain_xml(), "/q", "# another config"))
    # Another size: the cached plan does not hold; planned again, nothing from the pool.
    assert env.run("prepare", "begin", domain_xml(size_mib=32)) == 0
    assert "plan: as before" not in env.log()
    assert not os.path.exists(serve_state.recipe_path(UUID))
    # qemu.conf rewritten as it was: the plan holds.  Edited: planned again (the pool still
    # serves: a recipe is written).
    qemu_conf = os.path.join(os.path.dirname(env.config_path), "qemu.conf")
    with open(qemu_conf) as f:
        text = f.read()
    assert env.run("prepare", "begin") == 0  # the first size again: planned and cached
    with open(qemu_conf, "w") as f:
        f.write(text)
    assert env.run("prepare", "begin") == 0
    assert env.log().count("plan: as before") == 1
    os.unlink(serve_state.recipe_path(UUID))
    with open(qemu_conf, "a") as f:
        f.write("# edited\n")
    assert env.run("prepare", "begin") == 0
    assert env.log().count("plan: as before") == 1 and os.path.exists(serve_state.recipe_path(UUID))
    os.unlink(serve_state.recipe_path(UUID))
    # kvmaccel's config edited: its snapshot no longer holds; the full hook reads and plans.
    env.write_config("# edited\n")
    assert env.run("prepare", "begin") == 0
    assert env.log().count("plan: as before") == 1 and os.path.exists(serve_state.recipe_path(UUID))
    assert env.run("prepare", "begin") == 0
    assert env.log().count("plan: as before") == 2


WARM = """
import io, sys
sys.path.insert(0, {top!r})
from {module} import main
rc = main([{name!r}, {op!r}, "begin", "-"], io.BytesIO({xml!r}), config_path={config!r})
print(rc, sorted({heavy!r} & set(sys.modules)))
"""
HEAVY = {"logging", "tomllib", "dataclasses", "hashlib", "kvmaccel.libvirt.full",
         "kvmaccel.plan.config", "kvmaccel.pool.manage", "kvmaccel.plan.planner",
         "kvmaccel.model.domain"}


def run_hook_without_site(env: Env, op: str, run_dir: str, heavy: set[str],
                          module: str = "kvmaccel.libvirt.entry") -> str:
    """Run the hook as the installed script does (``python -S``); return its exit status
    and which of ``heavy`` it imported."""
    import subprocess
    import sys

    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = WARM.format(top=top, module=module, name=NAME, op=op, xml=domain_xml(),
                       config=env.config_path, heavy=heavy)
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          check=True, env={"KVMACCEL_RUN_DIR": run_dir,
                                           "KVMACCEL_RECORD_FILE": records.record_file()}).stdout


def test_a_warm_start_runs_without_site_logging_or_the_planner(env: Env, run_dir: str,
                                                               shm_dir: str) -> None:
    """What the installed script runs (``python -S``) on a warm prepare and start: none of
    the modules that made each hook call cost ~80 ms is imported, and the work is done."""
    assert env.run("prepare", "begin") == 0
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    stop(env)
    wait_clean(run_dir, shm_dir)
    os.makedirs(env.domain_dir)
    for op in ("prepare", "start"):
        assert run_hook_without_site(env, op, run_dir, HEAVY) == "0 []\n"
    assert os.stat(env.file_path).st_nlink == 2
    assert "started from the pool" in env.log()
    assert pool_states(run_dir, shm_dir) == ["in_use"]
    stop(env)
    wait_clean(run_dir, shm_dir)


@pytest.mark.parametrize("module", ["kvmaccel.hook_fast", "kvmaccel.hook.entry"])
def test_a_hook_installed_before_the_layout_by_layers_still_starts_warm(
        env: Env, run_dir: str, shm_dir: str, module: str) -> None:
    """A script that ``kvmaccel hook install`` wrote before kvmaccel's modules moved into
    packages imports ``kvmaccel.hook_fast``, and one written before the libvirt adapter
    ``kvmaccel.hook.entry``: each still runs, and still warm (the same budget)."""
    assert env.run("prepare", "begin") == 0
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    stop(env)
    wait_clean(run_dir, shm_dir)
    os.makedirs(env.domain_dir)
    for op in ("prepare", "start"):
        assert run_hook_without_site(env, op, run_dir, HEAVY, module) == "0 []\n"
    assert "started from the pool" in env.log()
    assert pool_states(run_dir, shm_dir) == ["in_use"]
    stop(env)
    wait_clean(run_dir, shm_dir)


def test_an_unchanged_guest_is_not_planned_again_without_a_pool(env: Env, run_dir: str
                                                                ) -> None:
    """The second start of the same XML: prepare finds the plan as before, and start
    populates from the cached plan without importing the planner or the XML parser."""
    env.write_config("[pool]\nenabled = false\n")
    for _ in range(2):
        assert run_hook_without_site(env, "prepare", run_dir, set()) == "0 []\n"
        os.makedirs(env.domain_dir)
        # prepare planned and cached the plan
        planner = {"kvmaccel.plan.planner", "kvmaccel.model.domain"}
        assert run_hook_without_site(env, "start", run_dir, planner) == "0 []\n"
        assert os.stat(env.file_path).st_nlink == 1  # populated, no pool
        assert os.stat(env.file_path).st_size == SIZE_MIB << 20
        stop(env)
    assert env.log().count("plan: populate") == 1
    assert env.log().count("populated 64M") == 2
    assert "plan: as before; start populates " + env.file_path in env.log()
    assert not os.path.exists(serve_state.recipe_path(UUID))


def test_a_disabled_config_stops_the_warm_path_too(env: Env, run_dir: str) -> None:
    env.write_config("enabled = false\n")
    assert env.run("prepare", "begin") == 0  # the full hook reads it and saves the snapshot
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0  # the warm path: disabled, nothing done
    assert not os.path.exists(env.file_path) and not os.path.exists(serve_state.state_path(UUID))


def test_pool_gives_back_unused_files_to_make_room(tmp_path: object, run_dir: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool never starves a guest: the clean file of another size that nobody uses is
    given back when the guest's file would not fit otherwise, at prepare and at start."""
    from kvmaccel.host.facts import read_host
    from kvmaccel.plan.limits import Limits
    from kvmaccel.pool.manage import Pool, key_for

    from .conftest import private_mount

    with private_mount("tmpfs", "mode=0755,size=96M") as small:
        with open(f"{tmp_path}/qemu.conf", "w") as f:
            f.write(f'memory_backing_dir = "{small}"\n')
        domain_dir = f"{small}/libvirt/qemu/7-{NAME}"
        env = Env(f"{tmp_path}/kvmaccel.toml", f"{tmp_path}/hook.log", domain_dir,
                  f"{domain_dir}/pc.ram")
        env.write_config("strict = true\n")
        monkeypatch.setattr(hook, "FALLBACK_CONFIG", HookConfig(syslog=False,
                                                                log_file=env.log_file))
        pool = Pool(os.path.join(small, ".kvmaccel-pool"))
        pool.fill(key_for(48 << 20, 4), 1, read_host(), Limits(idle_cpus_only=False))
        assert env.run("prepare", "begin") == 0  # 48M free + 48M the pool would give back
        os.makedirs(env.domain_dir)
        assert env.run("start", "begin") == 0
        assert os.stat(env.file_path).st_blocks * 512 == SIZE_MIB << 20
        assert "gave back" in env.log()
        assert [e.key.size_bytes for e in pool.entries()] == [SIZE_MIB << 20]  # adopted


def test_a_front_installed_or_removed_at_the_emulators_path_is_planned_again(
        tmp_path: Path) -> None:
    """``front install --divert`` puts the front at QEMU's own path, and uninstall puts QEMU
    back: the XML is the same, the emulator file is not, and neither is the plan."""
    emulator = os.path.join(str(tmp_path), "qemu-system-x86_64")
    with open(emulator, "w") as f:
        f.write("#!/bin/sh\nexec true\n")
    xml = domain_xml().replace(b"</domain>", f"<devices><emulator>{emulator}</emulator>"
                               "</devices></domain>".encode())
    assert b"<emulator>" in xml
    before = warm.plan_inputs(xml, "/q", None)
    assert before["emulator"] is not None
    assert warm.plan_inputs(xml, "/q", None) == before
    with open(emulator + ".new", "w") as f:  # what dpkg-divert and install do: a new file
        f.write("#!/bin/sh\n# kvmaccel-front: {}\n")
    os.replace(emulator + ".new", emulator)
    assert warm.plan_inputs(xml, "/q", None) != before
    os.unlink(emulator)
    assert warm.plan_inputs(xml, "/q", None)["emulator"] is None


def test_plan_says_what_the_hook_will_take_from_the_pool(env: Env, run_dir: str,
                                                        shm_dir: str, tmp_path: Path) -> None:
    """``kvmaccel plan`` decides "pool or fresh" as the start does (one rule,
    :func:`kvmaccel.serve.room.served_by_pool`): a clean file serves the guest, and with the
    pool disabled in the config nothing does (``plan`` once said "pool" there)."""
    import subprocess
    import sys

    assert env.run("prepare", "begin") == 0
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin") == 0
    stop(env)
    wait_clean(run_dir, shm_dir)
    xml = tmp_path / "guest.xml"
    xml.write_bytes(domain_xml())

    def plan_row() -> str:
        proc = subprocess.run([sys.executable, "-m", "kvmaccel", "plan", str(xml), "--config",
                               env.config_path], capture_output=True, text=True, check=True)
        [row] = [line for line in proc.stdout.splitlines() if "pc.ram" in line]
        return row

    assert "yes, pool" in plan_row()
    env.write_config("[pool]\nenabled = false\n")
    assert "yes, fresh" in plan_row()


def test_the_warm_path_says_why_it_declined(env: Env, run_dir: str, shm_dir: str) -> None:
    """Every call the warm path hands to the full hook leaves one debug line saying why (it
    used to swallow even exceptions): a regression there shows in the log, not only as a
    slower start."""
    assert env.run("prepare", "begin") == 0  # the first call: no snapshot of the config yet
    assert "the warm path declined: no snapshot of the config" in env.log()
    assert env.run("prepare", "begin", domain_xml(size_mib=2 * SIZE_MIB)) == 0
    assert ("the warm path declined: the XML, the emulator, qemu.conf or the config changed"
            in env.log())
    os.makedirs(env.domain_dir)
    assert env.run("start", "begin", domain_xml(size_mib=2 * SIZE_MIB)) == 0  # no recipe
    assert "the warm path declined: no recipe from prepare" in env.log()
    shutil.rmtree(env.domain_dir)
    assert env.run("stopped", "end", domain_xml(size_mib=2 * SIZE_MIB, domain_id=None)) == 0
