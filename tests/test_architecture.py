"""The layout keeps its promises: no import cycles (module- or function-level), no reaching into another
package's private names, techniques never import the orchestrator, short functions, a public face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "techniques")
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, each with the reason in its docstring.
LONG_FUNCTIONS: set[str] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions (TYPE_CHECKING included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(name, path, known) for name, path in known.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: those count as edges too
    for name in list(edges):
        for target in list(edges[name]):
            parts = target.split(".")
            edges[name] |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known}
        edges[name].discard(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring package→own-submodule
    edges: a package's __init__ re-exporting its submodules is not a cycle of concerns."""
    pruned = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in pruned[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in pruned:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package re-exporting its own module


def test_techniques_never_import_the_orchestrator():
    edges = graph()
    assert not [(a, b) for a, bs in edges.items() if a.startswith("techniques") for b in bs if b.startswith("orch")]


def test_no_module_imports_another_packages_private_names():
    known = modules()
    offences = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                owner = node.module if node.module in known else node.module.rpartition(".")[0]
                owner_package = owner if (known.get(owner, Path()).name == "__init__.py") else owner.rpartition(".")[0]
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [node.module] if node.module.rpartition(".")[2].startswith("_") else []
                if private and not package.startswith(owner_package):
                    offences.append(f"{name} imports {node.module}: {private}")
    assert offences == []


def test_the_folders_show_where_things_live():
    folders = {p.name for p in (ROOT / "orchestrator").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {"cli", "search", "artifacts", "workloads", "report"} <= folders
    assert not (ROOT / "search").exists(), "a top-level search package would shadow search.py under ray submit"


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_fit_on_a_screen(package: str):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(ROOT)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS:
                    long.append(f"{where} ({lines} lines)")
    assert long == []


def test_the_public_face_names_what_users_import():
    import orchestrator

    assert orchestrator.__all__
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None, name
