"""The test command fails a run that skipped anything (tests/conftest.py), whichever way the
skip came: a green CI run cannot hide a test that did not run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent

SUITE = '''
import pytest
from tests.conftest import need

def test_runs():
    pass

{body}
'''

BODIES = {
    "pytest.skip": "def test_skips():\n    pytest.skip('no reason')\n",
    "skipif": "@pytest.mark.skipif(True, reason='r')\ndef test_skipif():\n    pass\n",
    "importorskip": "def test_imp():\n    pytest.importorskip('kvmaccel_no_such_module')\n",
    "module importorskip": "pytest.importorskip('kvmaccel_no_such_module')\n",
}


def run_suite(tmp_path: Path, body: str, require: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(SUITE.format(body=body))
    # The inner run loads the real conftest's hooks as a plugin.
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n"
                                          "from tests.conftest import pytest_sessionfinish, "
                                          "pytest_runtest_logreport, pytest_collectreport\n")
    env = {k: v for k, v in os.environ.items() if k != "KVMACCEL_REQUIRE_ENV"}
    if require is not None:
        env["KVMACCEL_REQUIRE_ENV"] = require
    env["PYTHONPATH"] = str(TOP)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_a_skip_fails_the_test_command(tmp_path: Path, kind: str) -> None:
    proc = run_suite(tmp_path, BODIES[kind], "1")
    assert proc.returncode == 1, proc.stdout
    assert "skipped under KVMACCEL_REQUIRE_ENV=1" in proc.stdout


def test_by_hand_a_skip_is_only_a_skip(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, BODIES["pytest.skip"], None)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout


def test_nothing_skipped_passes(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, "", "1")
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout
