"""kvmaccel's layout: one package per layer, imports one way, no module over 500 lines.

The rules are read from the code itself: every layer's ``__init__.py`` docstring has a line
``May import: ...`` and a line ``Must not import: ...``, and ``kvmaccel/__init__.py`` has one
``<module> may import: ...`` line per top-level module.  The imports are read with :mod:`ast`,
all of them: at module level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
PACKAGE = TOP / "kvmaccel"
MAX_LINES = 500
MAX_TOP_MODULES = 6
RULE = re.compile(r"^(?:(kvmaccel[\w.]*) )?(may|must not) import: (.*?)\.\s*$",
                  re.IGNORECASE | re.MULTILINE | re.DOTALL)
"""A rule: ``[<module>] may|must not import: <modules, comma-separated>.``, possibly wrapped
over several lines; ``nothing`` for none."""


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported module (or package), dotted
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(TOP).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every import of a kvmaccel module in ``path``, resolved to the module imported."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kvmaccel":
                    yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "kvmaccel":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(name, sub if sub in known else base, node.lineno)


def all_imports() -> list[Import]:
    found = modules()
    return [i for name, path in found.items() for i in imports(name, path, set(found))]


def unit(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def layers() -> list[str]:
    return sorted(f"kvmaccel.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py"))


def rules() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(may import, must not import) per unit, from the docstrings."""
    may: dict[str, set[str]] = {}
    must_not: dict[str, set[str]] = {}
    for path in [PACKAGE / "__init__.py", *sorted(PACKAGE.glob("*/__init__.py"))]:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for m in RULE.finditer(doc):
            owner = m.group(1) or module_name(path)
            names = {n.strip().rstrip(".") for n in m.group(3).split(",")} - {"nothing", ""}
            table = may if m.group(2).lower() == "may" else must_not
            assert owner not in table, f"{path}: two '{m.group(2)} import' lines for {owner}"
            table[owner] = names
    return may, must_not


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_imports_resolve_to_modules_that_exist() -> None:
    known = set(modules())
    missing = [f"{i.source}:{i.line} imports {i.target}" for i in all_imports()
               if i.target not in known]
    assert missing == []


def test_no_import_circle() -> None:
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        if i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_every_layer_writes_its_rules() -> None:
    may, must_not = rules()
    everything = set(layers())
    for layer in layers():
        assert layer in may and layer in must_not, f"{layer}/__init__.py states no rules"
        assert not may[layer] & must_not[layer], layer
        stated = may[layer] | must_not[layer] | {layer}
        assert everything <= stated, f"{layer} says nothing about {sorted(everything - stated)}"
    top = {unit(m) for m in modules() if unit(m) not in everything}
    assert top <= set(may), f"no rule for {sorted(top - set(may))} in kvmaccel/__init__.py"


def test_no_import_breaks_a_layer_rule() -> None:
    may, must_not = rules()
    broken = []
    for i in all_imports():
        source, target = unit(i.source), unit(i.target)
        if source == target:
            continue
        if target not in may.get(source, set()) or target in must_not.get(source, set()):
            broken.append(f"{i.source}:{i.line} imports {i.target} ({source} may import "
                          f"{', '.join(sorted(may.get(source, ()))) or 'nothing'})")
    assert broken == []


def test_package_inits_import_nothing() -> None:
    """A layer's ``__init__`` is its docstring: importing one module of a layer (the hook's
    warm path imports kvmaccel.hook and kvmaccel.pool) costs nothing more."""
    heavy = [f"{i.source}:{i.line}" for i in all_imports()
             if modules()[i.source].name == "__init__.py"]
    assert heavy == []


def test_no_module_over_500_lines() -> None:
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_top_level_holds_at_most_six_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_the_tests_mirror_the_layers() -> None:
    """One rule: ``tests/test_<layer>[_<what>].py``, or a ``test_layout*`` file (the whole
    suite)."""
    names = {layer.split(".")[1] for layer in layers()}
    odd = [p.name for p in sorted((TOP / "tests").glob("test_*.py"))
           if not p.name.startswith("test_layout") and p.stem.split("_")[1] not in names]
    assert odd == []
