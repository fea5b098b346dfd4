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
    """One rule: ``tests/test_<layer>[_<what>].py`` (a top-level module, as ``safefs``,
    counts as a layer), or a ``test_layout*`` file (the whole suite)."""
    names = {layer.split(".")[1] for layer in layers()} | {
        p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    odd = [p.name for p in sorted((TOP / "tests").glob("test_*.py"))
           if not p.name.startswith("test_layout") and p.stem.split("_")[1] not in names]
    assert odd == []


# --- what runs when: the start path, set-up, the libvirt contract --------------------------

SETUP = "kvmaccel.setup"
START_PATH = ("kvmaccel.serve", "kvmaccel.libvirt")
"""Every module of these runs at a guest's start or stop."""
FRONT_NEUTRAL = "kvmaccel.serve"
LIBVIRT_ONLY = ("kvmaccel.libvirt", "kvmaccel.model.domain", "kvmaccel.model.domxml",
                "kvmaccel.model.domedit", "kvmaccel.model.qemuconf", "kvmaccel.plan.libvirt",
                "kvmaccel.plan.forhost", "kvmaccel.plan.planner")
"""What knows libvirt: its hook, its domain XML, its qemu.conf, its naming rules."""
WARM_ENTRY = "kvmaccel.libvirt.entry"
WARM_MODULES = {"kvmaccel", "kvmaccel.errors", "kvmaccel.paths", "kvmaccel.safefs",
                "kvmaccel.libvirt.entry", "kvmaccel.libvirt.warm", "kvmaccel.libvirt.state",
                "kvmaccel.libvirt.started", "kvmaccel.libvirt.cache", "kvmaccel.serve.take",
                "kvmaccel.serve.state",
                "kvmaccel.serve.filler", "kvmaccel.serve.memdir",
                "kvmaccel.pool.files", "kvmaccel.engine.records", "kvmaccel.host.proc"}
"""The warm path: a warm ``prepare``/``start`` and ``started`` import these and no more."""
WARM_STDLIB = {"__future__", "collections", "collections.abc", "contextlib", "errno", "fcntl",
               "grp", "io", "json", "os", "pwd", "re", "signal", "stat", "sys", "time",
               "typing"}
"""What ``json`` loads anyway, or costs nothing more (builtin modules): no logging, tomllib,
dataclasses, hashlib (about 60 ms a hook call between them)."""


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level_imports(path: Path) -> Iterator[tuple[str, int, int]]:
    """(module, level, line) of each import run when ``path`` is imported: at module level,
    outside ``if TYPE_CHECKING``; a function's own imports run only when it is called."""
    def walk(body: list[ast.stmt]) -> Iterator[tuple[str, int, int]]:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, 0, node.lineno
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    yield f"{node.module or ''}\0{alias.name}", node.level, node.lineno
            elif isinstance(node, ast.If) and not _type_checking(node):
                yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                yield from walk(node.body)
    yield from walk(ast.parse(path.read_text(), str(path)).body)


def loaded_at_import(start: str) -> dict[str, str]:
    """Every module importing ``start`` loads (kvmaccel's and the standard library's, by
    name), each with the kvmaccel module that first imports it."""
    found = modules()
    seen: dict[str, str] = {start: start}
    todo = [start]
    while todo:
        name = todo.pop()
        path = found[name]
        is_package = path.name == "__init__.py"
        for raw, level, _ in module_level_imports(path):
            base, _, alias = raw.partition("\0")
            if level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join([*package[:len(package) - level + 1], *filter(None, [base])])
            targets = [base] if not alias else [f"{base}.{alias}", base]
            target = next((t for t in targets if t in found), targets[-1])
            parts = target.split(".")
            chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            for t in chain:
                if t not in seen:
                    seen[t] = name
                    if t in found:
                        todo.append(t)
    return seen


def run_time_imports(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    """The imports of ``path`` that can run: all of them but those under ``TYPE_CHECKING``."""
    lines = {n.lineno for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.If) and _type_checking(node)
             for stmt in node.body for n in ast.walk(stmt)
             if isinstance(n, (ast.Import, ast.ImportFrom))}
    for i in imports(name, path, known):
        if i.line not in lines:
            yield i


def closure(start: str) -> set[str]:
    """Every kvmaccel module ``start`` may import when it runs, lazily (inside a function)
    or not; a type named for the type checker alone does not count."""
    found = modules()
    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        for i in run_time_imports(name, path, set(found)):
            edges.setdefault(i.source, set()).add(i.target)
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            for t in (".".join(nxt.split(".")[:n]) for n in range(2, nxt.count(".") + 2)):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
    return seen


def test_no_start_path_module_imports_set_up() -> None:
    """Host set-up (hook install, front, divert, keeper service, doctor) never runs at a
    guest's start or stop: no start-path module imports it, however lazily."""
    bad = {m: sorted(t for t in closure(m) if t.startswith(SETUP))
           for m in modules() if m.startswith(START_PATH)}
    assert {m: t for m, t in bad.items() if t} == {}


def test_only_the_libvirt_adapter_knows_libvirt() -> None:
    """``kvmaccel.serve`` serves any front: nothing it imports, however lazily, knows
    libvirt's hook, domain XML, qemu.conf or naming rules."""
    bad = {m: sorted(t for t in closure(m) if t.startswith(LIBVIRT_ONLY))
           for m in modules() if m.startswith(FRONT_NEUTRAL)}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_hook_contract_is_read_in_the_libvirt_adapter_only() -> None:
    """The hook's operations (``prepare``/``start``/``started``/``stopped``/``release`` with
    ``begin``/``end``) are named only in :mod:`kvmaccel.libvirt`: a module elsewhere that
    compares against them knows the contract."""
    ops = {"begin", "end"}
    named = []
    for name, path in modules().items():
        if name.startswith("kvmaccel.libvirt"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in ops
                    for c in [node.left, *node.comparators])):
                named.append(f"{name}:{node.lineno}")
    assert named == []


def test_the_warm_path_imports_only_json_level_modules() -> None:
    """A warm ``prepare``/``start`` and ``started`` import (at module level) only the warm
    modules and what ``json`` loads anyway: a heavier import on that path costs every guest's
    start.  (``tests/test_hook.py`` runs the warm path and checks what it loaded.)"""
    loaded = loaded_at_import(WARM_ENTRY)
    inits = {m for m, path in modules().items() if path.name == "__init__.py"}  # import nothing
    ours = {m: by for m, by in loaded.items() if m.split(".")[0] == "kvmaccel" and m not in inits}
    theirs = {m: by for m, by in loaded.items() if m.split(".")[0] != "kvmaccel"}
    assert {m: by for m, by in ours.items() if m not in WARM_MODULES} == {}
    assert {m: by for m, by in theirs.items() if m not in WARM_STDLIB} == {}


# --- kvmaccel's own places: resolved by the entry points only -------------------------------

PLACES_ENTRY_POINTS = {
    "kvmaccel.libvirt.entry",  # the hook: the warm path
    "kvmaccel.libvirt.full",  # the hook: the full path
    "kvmaccel.cli.main",  # the kvmaccel command (a detached scrub runs as one)
    "kvmaccel.cli.pool",  # `kvmaccel pool keep`: the keeper takes its config's run dir
}
"""The modules that resolve kvmaccel's places (:func:`kvmaccel.paths.resolve`) from the
environment; every other module gets them from :func:`kvmaccel.paths.places`."""
ENVIRON_METHODS = {"get", "setdefault", "pop", "__getitem__", "__contains__"}


def _kvmaccel_names(tree: ast.Module) -> set[str]:
    """Module-level names bound to a ``"KVMACCEL_..."`` string (``RUN_DIR_ENV = ...``)."""
    return {t.id for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and node.value.value.startswith("KVMACCEL_")
            for t in node.targets if isinstance(t, ast.Name)}


def environment_reads(path: Path) -> list[int]:
    """The lines of ``path`` that read a ``KVMACCEL_`` variable from the process's
    environment: ``os.environ[NAME]``, ``os.environ.get(NAME)`` (``setdefault``, ``pop``),
    ``NAME in os.environ``, ``os.getenv(NAME)``, where NAME is a ``"KVMACCEL_..."`` string or
    a constant bound to one (here or in :mod:`kvmaccel.paths`); and ``os.environ`` handed to a
    function (``paths.resolve(os.environ)``).  A copy for a child, ``{**os.environ, ...}``,
    reads nothing."""
    tree = ast.parse(path.read_text(), str(path))
    names = _kvmaccel_names(tree) | _kvmaccel_names(ast.parse((PACKAGE / "paths.py").read_text()))
    from_os = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level
               for alias in node.names}  # from os import environ

    def of_os(node: ast.AST, attrs: tuple[str, ...]) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr in attrs
                 and isinstance(node.value, ast.Name) and node.value.id == "os")
                or (isinstance(node, ast.Name) and node.id in attrs and node.id in from_os))

    def is_env(node: ast.AST) -> bool:
        return of_os(node, ("environ", "environb"))

    def is_getenv(node: ast.AST) -> bool:
        return of_os(node, ("getenv", "getenvb"))

    def is_name(node: ast.AST | None) -> bool:
        return ((isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and node.value.startswith("KVMACCEL_"))
                or (isinstance(node, ast.Name) and node.id in names)
                or (isinstance(node, ast.Attribute) and node.attr in names))

    def reads(node: ast.AST) -> bool:
        if isinstance(node, ast.Subscript):
            return is_env(node.value) and is_name(node.slice)
        if isinstance(node, ast.Compare):
            return (is_name(node.left) and any(isinstance(op, ast.In | ast.NotIn)
                                               for op in node.ops)
                    and any(is_env(c) for c in node.comparators))
        if isinstance(node, ast.Call):
            func, first = node.func, node.args[0] if node.args else None
            return ((isinstance(func, ast.Attribute) and func.attr in ENVIRON_METHODS
                     and is_env(func.value) and is_name(first))
                    or (is_getenv(func) and is_name(first))
                    or any(is_env(a) for a in node.args))
        return False

    found = [node.lineno for node in ast.walk(tree) if reads(node)]
    return sorted(found)


def test_only_the_entry_points_read_kvmaccels_variables() -> None:
    """kvmaccel's own places (run dir, record file, state dir, filler dir, config file) are
    resolved once per entry point and handed down (:mod:`kvmaccel.paths`): a module deeper
    down that reads a ``KVMACCEL_`` variable finds them its own way."""
    found = {name: lines for name, path in modules().items()
             if name not in PLACES_ENTRY_POINTS and (lines := environment_reads(path))}
    assert found == {}
    assert set(modules()) >= PLACES_ENTRY_POINTS
