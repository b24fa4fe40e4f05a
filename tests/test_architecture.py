"""The layout keeps its promises: no import cycles (module- or function-level, between modules or between
packages), each package imports only the packages beneath it (LAYERS), no reaching into another package's private
names, techniques never import the orchestrator, few top-level modules, short functions, a public face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "techniques")
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 8  # files directly in orchestrator/, __init__ and __main__ included; the rest in packages
# Which orchestrator packages (and top-level modules) each may import, lazy imports included: the layers from the
# bottom (errors, files) up to the command line. `techniques` imports none; every orchestrator package may import
# techniques, and every module imports the root `orchestrator` (Python runs it first), so neither is listed.
LAYERS: dict[str, set[str]] = {
    "techniques": set(),
    "orchestrator": set(),  # the public face names its modules by string and loads them lazily
    "orchestrator.errors": set(),
    "orchestrator.pareto": set(),
    "orchestrator.files": {"errors"},
    "orchestrator.device": {"errors"},
    "orchestrator.policy": {"errors", "files"},
    "orchestrator.workloads": {"errors", "files"},
    "orchestrator.artifacts": {"errors", "files", "policy", "workloads"},
    "orchestrator.export": {"errors", "files", "artifacts", "workloads"},
    "orchestrator.measure": {"errors", "files", "device", "policy", "workloads", "artifacts", "export"},
    "orchestrator.executor": {"errors", "policy", "workloads", "artifacts", "measure"},
    "orchestrator.report": {"errors", "files", "pareto", "artifacts"},
    "orchestrator.search": {
        *("errors", "files", "device", "pareto", "policy", "workloads", "artifacts", "export", "measure"),
        *("executor", "report"),
    },
    "orchestrator.api": {"errors", "files", "policy", "workloads", "artifacts", "measure", "executor", "search"},
    "orchestrator.cli": {
        *("errors", "files", "device", "pareto", "policy", "workloads", "artifacts", "export", "measure"),
        *("executor", "report", "search"),
    },
    "orchestrator.__main__": {"cli"},
    # the shipped contract suite for techniques' tests: it imports what it checks, and nothing imports it
    "orchestrator.testing": {"artifacts", "measure"},
}
TEST_ONLY = {"pytest", "hypothesis"}  # the `test` extra: only orchestrator.testing may import them
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


def package_of(module: str) -> str:
    """The package a module belongs to for layering: `orchestrator.<first part>`, or `techniques`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "orchestrator" else parts[0]


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to packages (self-edges and edges to the root package left out)."""
    collapsed: dict[str, set[str]] = {}
    for name, targets in edges.items():
        found = collapsed.setdefault(package_of(name), set())
        found |= {package_of(t) for t in targets if t != "orchestrator"} - {package_of(name)}
    for package in {t for targets in list(collapsed.values()) for t in targets}:
        collapsed.setdefault(package, set())
    return collapsed


def layering_violations(edges: dict[str, set[str]], layers: dict[str, set[str]]) -> list[str]:
    """Every import of a package its layer does not allow (`techniques` is allowed to orchestrator packages), and
    every package missing from `layers`."""
    found = []
    for package, targets in sorted(package_graph(edges).items()):
        if package not in layers:
            found.append(f"{package} is not in LAYERS: say which packages it may import")
            continue
        allowed = {f"orchestrator.{name}" for name in layers[package]} | ({"techniques"} - {package})
        found += [f"{package} imports {target}" for target in sorted(targets - allowed)]
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_package_cycles():
    assert cycles(package_graph(graph())) == []


def test_each_package_imports_only_the_layers_beneath_it():
    assert layering_violations(graph(), LAYERS) == []


def test_the_layers_themselves_have_no_cycle():
    as_edges = {package: {f"orchestrator.{name}" for name in allowed} for package, allowed in LAYERS.items()}
    assert cycles({name: targets & set(as_edges) for name, targets in as_edges.items()}) == []


def test_the_layering_check_catches_a_violation_and_an_unlisted_package():
    layers = {"techniques": set(), "orchestrator.artifacts": {"files"}, "orchestrator.files": set()}
    layers["orchestrator.search"] = {"artifacts"}
    edges = {
        "orchestrator.artifacts.store": {"orchestrator.files.fs", "orchestrator.search.driver", "techniques"},
        "orchestrator.files.fs": {"orchestrator"},
        "orchestrator.search.driver": {"orchestrator.artifacts.store"},
        "orchestrator.newpart": {"orchestrator.files"},
    }
    assert layering_violations(edges, layers) == [
        "orchestrator.artifacts imports orchestrator.search",
        "orchestrator.newpart is not in LAYERS: say which packages it may import",
    ]
    assert cycles(package_graph(edges)) == [["orchestrator.artifacts", "orchestrator.search"]]


def test_a_lazy_import_inside_a_function_is_an_edge(tmp_path: Path):
    source = tmp_path / "store.py"
    source.write_text("def load():\n    from orchestrator.search import driver\n    return driver\n")
    known = {"orchestrator.search": Path("__init__.py"), "orchestrator.search.driver": Path("driver.py")}
    assert imports("orchestrator.artifacts.store", source, known) == {
        "orchestrator.search",
        "orchestrator.search.driver",
    }


def test_few_top_level_modules():
    top = sorted(path.name for path in (ROOT / "orchestrator").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in orchestrator/: {top}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package re-exporting its own module


def test_techniques_never_import_the_orchestrator():
    edges = graph()
    assert not [(a, b) for a, bs in edges.items() if a.startswith("techniques") for b in bs if b.startswith("orch")]


def test_the_shipped_test_suite_stays_apart():
    """Nothing imports `orchestrator.testing`, and only it imports pytest (a `test` extra, not a dependency)."""
    edges = graph()
    assert not [
        (a, b) for a, bs in edges.items() for b in bs if package_of(b) == "orchestrator.testing" != package_of(a)
    ]
    offences = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            if {m.partition(".")[0] for m in found} & TEST_ONLY and package_of(name) != "orchestrator.testing":
                offences.append(f"{name} imports {found}")
    assert offences == []


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


# Our dependencies' private modules and attributes, which a release may move without notice: none, except these,
# each with the reason there is no public way.
DEPENDENCIES = ("ray", "optuna")
PRIVATE_USES_ALLOWED = {
    # the node types an autoscaler may still start (KubeRay, autoscaler v2): Ray publishes them only there, and Ray
    # Data reads them the same way (ray/data/_internal/cluster_autoscaler/util.py); guarded, [] when it moves
    ("orchestrator.search.preflight", "ray._private"),  # ray._private.state.state.get_cluster_config()
}


def private_uses(name: str, source: str) -> set[tuple[str, str]]:
    """(module, what) for each private name of `DEPENDENCIES` that `source` imports or reaches by attribute, and
    each `_ot_*` attribute (Ray's OptunaSearch internals)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        dotted: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            dotted = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_ot_"):
                found.add((name, node.attr))
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            dotted = [".".join([base.id, *reversed(chain)])] if isinstance(base, ast.Name) else []
        for path in dotted:
            parts = path.split(".")
            if parts[0] in DEPENDENCIES and any(p.startswith("_") for p in parts[1:]):
                cut = next(i for i, p in enumerate(parts) if i and p.startswith("_"))
                found.add((name, ".".join(parts[: cut + 1])))  # up to the first private name
    return found


def test_no_private_names_of_ray_or_optuna_beyond_the_listed_ones():
    used = set().union(*(private_uses(name, path.read_text()) for name, path in modules().items()))
    assert used <= PRIVATE_USES_ALLOWED, sorted(used - PRIVATE_USES_ALLOWED)


def test_the_private_name_check_sees_imports_attributes_and_tunes_optuna_internals():
    source = (
        "import ray\nfrom ray._common.utils import f\nfrom optuna import _x\n"
        "def g(s):\n    ray._private.worker._global_node\n    s._ot_study\n    ray.init()\n"
    )
    assert private_uses("m", source) == {
        ("m", "ray._common"),
        ("m", "optuna._x"),
        ("m", "ray._private"),
        ("m", "_ot_study"),
    }


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
