"""kvmaccel.plan.config: the hook's TOML file, every key, and the errors for bad ones."""

from __future__ import annotations

import pytest

from kvmaccel.errors import ConfigError
from kvmaccel.plan.config import DEFAULT_LOG_FILE, HookConfig, parse_config, read_config
from kvmaccel.plan.limits import Limits
from tests.conftest import use_environment

FULL = """
strict = true
enabled = false
populate_timeout_s = 2.5
syslog = false
log_file = "/var/log/x.log"
log_level = "debug"
run_dir = "/run/x"
record_file = "/var/log/x/records.jsonl"
qemu_conf = "/etc/x/qemu.conf"

[limits]
threads = 4
nice = 10
max_helpers_per_node = 2
max_helpers = 3
min_chunk_mib = 64
"""


def test_missing_file_gives_the_documented_defaults(tmp_path: object) -> None:
    cfg = read_config(f"{tmp_path}/absent.toml")
    assert cfg == HookConfig()
    assert (cfg.strict, cfg.enabled, cfg.populate_timeout_s) == (False, True, 0.0)
    assert cfg.log_file == DEFAULT_LOG_FILE and cfg.run_dir == "/run/kvmaccel"
    assert cfg.record_file == "/var/log/kvmaccel/records.jsonl"
    assert cfg.limits == Limits()


def test_every_key_is_read(tmp_path: object) -> None:
    path = f"{tmp_path}/k.toml"
    with open(path, "w") as f:
        f.write(FULL)
    cfg = read_config(path)
    assert cfg.strict and not cfg.enabled and cfg.populate_timeout_s == 2.5
    assert not cfg.syslog and cfg.log_file == "/var/log/x.log" and cfg.log_file_set
    assert cfg.log_level == "debug" and cfg.run_dir == "/run/x"
    assert cfg.record_file == "/var/log/x/records.jsonl"
    assert cfg.qemu_conf == "/etc/x/qemu.conf" and cfg.path == path
    assert cfg.limits == Limits(threads=4, nice=10, max_helpers_per_node=2,
                                max_helpers_host=3, min_chunk_bytes=64 << 20)


def test_env_names_the_file(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"{tmp_path}/k.toml"
    with open(path, "w") as f:
        f.write("strict = true\n")
    use_environment(monkeypatch, KVMACCEL_CONFIG=path)
    assert read_config().strict


def test_zero_and_minus_one_mean_the_default_rule() -> None:
    cfg = parse_config("[limits]\nthreads = 0\nmax_helpers = -1\nmax_helpers_per_node = -1\n")
    assert cfg.limits == Limits()


@pytest.mark.parametrize(("text", "words"), [
    ("strict = tru", "not valid TOML"),
    ("stric = true", "unknown key 'stric'"),
    ("[limits]\nthread = 2", "unknown key limits.'thread'"),
    ('strict = "yes"', "strict must be a bool"),
    ('overlap = "no"', "overlap must be a bool"),
    ("[limits]\nthreads = true", "limits.threads must be a int"),
    ("populate_timeout_s = true", "populate_timeout_s must be a number"),
    ("populate_timeout_s = -1", "populate_timeout_s must be 0"),
    ('log_level = "loud"', "log_level must be one of"),
    ('run_dir = "run"', "run_dir must be an absolute path"),
    ('record_file = "r.jsonl"', "record_file must be an absolute path"),
    ("[limits]\nnice = 40", "[limits]: nice must be between -20 and 19"),
    ("limits = 3", "limits must be a dict"),
])
def test_bad_files_name_the_key(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "/etc/kvmaccel/kvmaccel.toml")
    assert words in str(e.value)
    assert str(e.value).startswith("/etc/kvmaccel/kvmaccel.toml")
    assert "\n" not in str(e.value).strip() or "TOML" in str(e.value)


def test_unreadable_and_binary_files(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(str(tmp_path))  # a directory
    path = f"{tmp_path}/bin.toml"
    with open(path, "wb") as f:
        f.write(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config(path)
