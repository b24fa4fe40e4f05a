"""Every registered technique passes the shipped contract: at least one concrete `TechniqueContract` subclass that
pytest collects has a `make_spec()` of that technique (issue #23: `head_pruning` had none)."""

from __future__ import annotations

import ast
import functools
import importlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from torch import nn

import techniques
from orchestrator.testing import TechniqueContract

TESTS = Path(__file__).resolve().parent
CONTRACT_PACKAGE = "orchestrator.testing"
MADE_UP = "made_up_for_the_coverage_test"


def _source_facts(path: Path) -> tuple[set[str], set[str]]:
    """(the modules a test file imports, at any depth, with `module.name` for each name taken from one; the
    identifiers it mentions). Absolute imports only: the tests use no others."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return modules, names


def contract_modules(folder: Path = TESTS) -> list[str]:
    """The test modules (`tests.test_*`) that may define contract subclasses: those naming `TechniqueContract`,
    and those importing a test module that does (for a subclass of another file's subclass)."""
    facts = {f"tests.{path.stem}": _source_facts(path) for path in sorted(folder.glob("*.py"))}
    reaching = {module for module, (_, names) in facts.items() if TechniqueContract.__name__ in names}
    while True:
        more = {
            module
            for module, (imported, _) in facts.items()
            if any(".".join(m.split(".")[:2]) in reaching - {module} for m in imported)
        }
        if more <= reaching:
            return sorted(module for module in reaching if module.startswith("tests.test_"))
        reaching |= more


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def collected(cls: type) -> bool:
    """Whether pytest collects `cls` as a test class: named Test…, defined at a test module's top level, not
    switched off with `__test__ = False`, and with a `make_spec` of its own or inherited (not the contract's)."""
    module = sys.modules.get(cls.__module__)
    return (
        cls.__name__.startswith("Test")
        and cls.__module__.rpartition(".")[2].startswith("test_")
        and getattr(module, cls.__name__, None) is cls
        and getattr(cls, "__test__", True)
        and cls.make_spec is not TechniqueContract.make_spec
    )


def contracts_by_technique(modules: Iterable[str]) -> dict[str, list[str]]:
    """technique name -> the collected contract classes (`module.Class`) whose spec is of that technique."""
    for name in modules:
        importlib.import_module(name)
    found: dict[str, list[str]] = {}
    for cls in sorted(set(_subclasses(TechniqueContract)), key=lambda c: (c.__module__, c.__qualname__)):
        if collected(cls):
            found.setdefault(cls().make_spec().technique, []).append(f"{cls.__module__}.{cls.__qualname__}")
    return found


def uncovered(registered: Iterable[str], covered: Mapping[str, list[str]]) -> list[str]:
    return sorted(set(registered) - set(covered))


@functools.cache
def _covered() -> dict[str, list[str]]:
    return contracts_by_technique(contract_modules())


@pytest.mark.parametrize("name", sorted(techniques.registry()))
def test_every_registered_technique_has_a_contract_subclass(name: str) -> None:
    assert name in _covered(), f"no collected TechniqueContract subclass makes a {name!r} spec"


def test_the_check_sees_a_technique_without_a_contract_and_skips_what_pytest_would_not_collect() -> None:
    @dataclass(frozen=True)
    class MadeUpSpec(techniques.TechniqueSpec):  # a technique no contract covers
        technique: ClassVar[str] = MADE_UP

    techniques.register(techniques.Technique(MADE_UP, MadeUpSpec, lambda model, *_: model, (nn.Linear,), stage=99))
    try:
        assert uncovered(techniques.registry(), _covered()) == [MADE_UP]
    finally:
        techniques.unregister(MADE_UP)
    every = {name for classes in _covered().values() for name in classes}
    assert "tests.test_decoder_pruning.DecoderContract" not in every  # a shared base, not a test class
    assert "tests.test_lowrank.TestLowRankCP" in every  # a subclass of a subclass counts
    assert {"tests.test_head_pruning", "tests.test_decoder_pruning"} <= set(contract_modules())


def test_contract_modules_follow_subclasses_across_files(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(
        "from orchestrator.testing import TechniqueContract\n\nclass TestA(TechniqueContract): ...\n"
    )
    (tmp_path / "test_b.py").write_text("from tests.test_a import TestA\n\nclass TestB(TestA): ...\n")
    (tmp_path / "test_c.py").write_text("from orchestrator.testing import make_context\n")
    (tmp_path / "helpers.py").write_text("import orchestrator.testing as t\n\nclass Base(t.TechniqueContract): ...\n")
    assert contract_modules(tmp_path) == ["tests.test_a", "tests.test_b"]
