"""The in-guest two-node tests, reported one by one on the host.

One host test per test function in ``guest/test_*.py`` (found by reading those files, so a
function that never ran in the guest fails here instead of going unnoticed); every case of it,
each parameter, must have passed in the guest, except the placement tests' ``wrong`` cases: run
with a wrong ``mbind`` (``guest/test_placement.py``'s ``misbind``), each must have failed on an
assertion (a strict xfail).  That is what shows the placement tests can tell a wrong node from
the right one.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable

import pytest

from .vm import Case, GuestRun

RecordProperty = Callable[[str, object], None]

GUEST_DIR = os.path.join(os.path.dirname(__file__), "guest")


def guest_tests() -> list[tuple[str, str]]:
    """(module, function) of every test function in guest/test_*.py."""
    found = []
    for name in sorted(os.listdir(GUEST_DIR)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(GUEST_DIR, name)) as f:
                tree = ast.parse(f.read())
            found += [(name[:-3], node.name) for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return found


def cases_of(cases: list[Case], module: str, function: str) -> list[Case]:
    return [c for c in cases if c.module == module
            and (c.name == function or c.name.startswith(function + "["))]


def test_the_guest_ran(guest_run: GuestRun, record_property: RecordProperty) -> None:
    record_property("guest_seconds", round(guest_run.seconds, 1))
    assert not guest_run.problems, "\n".join(
        [*guest_run.problems, guest_run.log("guest.log")[-3000:],
         guest_run.log("console.log")[-3000:]])


@pytest.mark.parametrize(("module", "function"), guest_tests(),
                         ids=[f"{m}::{f}" for m, f in guest_tests()])
def test_in_guest(module: str, function: str, guest_run: GuestRun,
                  record_property: RecordProperty) -> None:
    cases = cases_of(guest_run.cases, module, function)
    assert cases, f"{module}::{function} did not run in the guest\n" \
                  f"{guest_run.log('guest.log')[-3000:]}"
    for c in cases:
        for key, value in c.properties.items():
            record_property(f"{c.name}:{key}", value)
            print(f"{c.name}: {key} = {value}")
    failed = [c for c in cases if c.outcome != expected(c)]
    assert not failed, "\n\n".join(f"{c.name}: {c.outcome}, not {expected(c)}\n{c.message}"
                                     for c in failed)


def params(case: Case) -> list[str]:
    """The parameter ids of a case: ``["wrong", "2M"]`` for ``test_x[wrong-2M]``."""
    return case.name[case.name.index("[") + 1:-1].split("-") if "[" in case.name else []


def expected(case: Case) -> str:
    return "xfailed" if "wrong" in params(case) else "passed"


def test_a_wrong_binding_fails_every_placement_test(guest_run: GuestRun) -> None:
    """Every placement case ran with the right binding and with the wrong one."""
    placement = [c for c in guest_run.cases if c.module == "test_placement"]

    def others(c: Case) -> tuple[str, ...]:
        return (c.name.split("[")[0], *(p for p in params(c) if p not in ("right", "wrong")))

    right = sorted(others(c) for c in placement if "right" in params(c))
    wrong = sorted(others(c) for c in placement if "wrong" in params(c))
    assert right and right == wrong, f"placement cases: {[c.name for c in placement]}"
    assert len(right) == len(placement) // 2
