"""Structural rules of the code base, checked on the source with ``ast`` (nothing under test is imported).

These rules keep the package layered: no import cycles, one family list, one place that reads the
environment, short functions, no test helpers in production code and a CLI that nothing imports.
Every failure names ``file:line`` so the fix is a jump away.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qzoom_swift"
REGISTRY = PKG / "families" / "registry.py"
MAX_FUNCTION_LINES = 80


@cache
def parse(path: Path) -> ast.Module:
    """Each file is parsed once, however many rules read it."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def py_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs if d.is_dir() for p in d.rglob("*.py") if ".venv" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def graph_file(module: str) -> str:
    """The file of a module name, for ``file:line`` messages."""
    path = ROOT / Path(*module.split("."))
    return rel(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))


def module_name(path: Path) -> str:
    """``qzoom_swift/a/b.py`` -> ``qzoom_swift.a.b``; a package's ``__init__`` is the package itself."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            yield from (n for stmt in child.orelse for n in imports_in(stmt))
            continue
        yield from imports_in(child)


def imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from imports(node)


def imported_modules(path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """Absolute names an import refers to: ``from pkg import name`` is ``pkg.name`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module_name(path).split(".")
        package = here if path.name == "__init__.py" else here[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


@cache
def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported package module: line of the first such import}. Built once, read by three rules."""
    files = py_files(PKG)
    known = {module_name(p) for p in files}
    graph: dict[str, dict[str, int]] = {}
    for path in files:
        edges = graph.setdefault(module_name(path), {})
        for node in imports(parse(path)):
            for target in imported_modules(path, node, known):
                if target in known and target != module_name(path):
                    edges.setdefault(target, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm; only components with more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                cycles.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_graph_has_no_cycle():
    graph = import_graph()
    report = []
    for cycle in strongly_connected(graph):
        edges = [f"    {graph_file(a)}:{graph[a][b]} {a} -> {b}" for a in cycle for b in graph[a] if b in cycle]
        report.append(f"cycle {cycle}:\n" + "\n".join(edges))
    assert not report, "import cycles in qzoom_swift:\n" + "\n".join(report)


@cache
def family_names() -> frozenset[str]:
    """The names of the registry's ``FamilySpec(...)`` entries, read from its source (not listed here)."""
    names = frozenset(
        call.args[0].value for call in ast.walk(parse(REGISTRY))
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "FamilySpec"
        and call.args and isinstance(call.args[0], ast.Constant))
    assert names, f"{rel(REGISTRY)}: expected FamilySpec(\"<name>\", ...) entries, found {names}"
    return names


def literal_strings(node: ast.AST) -> set[str]:
    items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [])
    return {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}


def compared_strings(node: ast.expr) -> set[str]:
    """A string operand, or the strings of a literal container (``family in ("llava",)``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    return literal_strings(node)


def test_family_list_is_defined_once():
    bad = []
    for path in py_files(PKG, ROOT / "tests", ROOT / "benchmarks"):
        in_pkg, in_families = path.is_relative_to(PKG), path.is_relative_to(PKG / "families")
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict) and path != REGISTRY:
                names = literal_strings(node) & family_names()
                if names == family_names():  # a subset (e.g. the MRoPE families of a test) is not the list
                    bad.append(f"{rel(path)}:{node.lineno}: literal lists every family {sorted(names)}")
            if isinstance(node, ast.Compare) and in_pkg and not in_families:
                ops = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
                named = set().union(*(compared_strings(o) for o in [node.left, *node.comparators]))
                named &= family_names()
                if named and any(isinstance(op, ops) for op in node.ops):
                    bad.append(f"{rel(path)}:{node.lineno}: compares against family name {sorted(named)}")
    assert not bad, "use qzoom_swift.families.registry instead:\n" + "\n".join(bad)


def test_environment_is_read_only_in_config():
    allowed = (PKG / "config.py", PKG / "testing", PKG / "bench")
    bad = []
    for path in py_files(PKG):
        if any(path == a or path.is_relative_to(a) for a in allowed):
            continue
        for node in ast.walk(parse(path)):
            attr = isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and (
                isinstance(node.value, ast.Name) and node.value.id == "os")
            from_os = isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv") for a in node.names)
            if attr or from_os:
                bad.append(f"{rel(path)}:{node.lineno}: reads the environment")
    assert not bad, "read environment variables through qzoom_swift.config:\n" + "\n".join(bad)


def test_functions_are_short():
    bad = []
    for path in py_files(PKG):
        for node in ast.walk(parse(path)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            excused = any(line.strip().startswith("Long:") for line in doc.splitlines())
            if length > MAX_FUNCTION_LINES and not excused:
                bad.append(f"{rel(path)}:{node.lineno}: {node.name} is {length} lines")
    assert not bad, (f"functions over {MAX_FUNCTION_LINES} lines (split them, or give a 'Long:' reason "
                     "in the docstring):\n" + "\n".join(bad))


def test_production_code_does_not_import_testing():
    graph = import_graph()
    bad = [f"{graph_file(m)}:{line}: imports {t}"
           for m, edges in graph.items() if not m.startswith("qzoom_swift.testing")
           for t, line in edges.items() if t == "qzoom_swift.testing" or t.startswith("qzoom_swift.testing.")]
    assert not bad, "qzoom_swift.testing is for tests only:\n" + "\n".join(bad)


def test_cli_is_a_leaf_with_imports_on_top():
    graph = import_graph()
    bad = [f"{graph_file(m)}:{edges['qzoom_swift.cli']}: imports qzoom_swift.cli"
           for m, edges in graph.items() if "qzoom_swift.cli" in edges]
    body = parse(PKG / "cli.py").body
    first_code = next((s.lineno for s in body if not is_import_or_preamble(s)), None)
    if first_code is not None:
        bad += [f"qzoom_swift/cli.py:{s.lineno}: import after code at line {first_code}"
                for s in body if isinstance(s, ast.Import | ast.ImportFrom) and s.lineno > first_code]
    assert not bad, "qzoom_swift/cli.py must be imported by nothing and keep its imports on top:\n" + "\n".join(bad)


def is_import_or_preamble(stmt: ast.stmt) -> bool:
    """Imports, the module docstring and ``if TYPE_CHECKING:`` blocks may precede the code."""
    docstring = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
    type_only = isinstance(stmt, ast.If) and is_type_checking(stmt.test)
    return isinstance(stmt, ast.Import | ast.ImportFrom) or docstring or type_only
