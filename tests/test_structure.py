"""The package's shape: imports only go down (no cycles), and no module uses another's private names.

Every import counts, deferred ones inside functions too (a cycle through a deferred import still
couples the two modules both ways); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "runner"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, set[str]]:
    """{imported runner module: names taken from it} for one module."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            if base not in modules:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from runner import db`: the submodule itself
                    found.setdefault(sub, set())
                else:
                    found.setdefault(base, set()).add(alias.name)
    found.pop(name, None)
    return found


def _graph() -> dict[str, dict[str, set[str]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_runner() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles (every import counts, deferred ones too): {cycles}"


def test_no_module_uses_another_modules_private_names() -> None:
    graph, modules = _graph(), _modules()
    taken = [(m, dep, n) for m, deps in graph.items() for dep, names in deps.items()
             for n in names if n.startswith("_") and not n.startswith("__")]
    used = []
    for name, path in modules.items():
        aliases = {alias.asname or alias.name.rpartition(".")[2]
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner")
                   for alias in node.names if f"{node.module}.{alias.name}" in modules}
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                used.append((name, f"{node.value.id}.{node.attr}"))
    assert taken == [] and used == [], f"private names used across modules: {taken + used}"


def test_the_checker_sees_a_cycle_and_a_private_import() -> None:
    graph = {"a": {"b": set()}, "b": {"c": {"_x"}}, "c": {"a": set()}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c"]]
