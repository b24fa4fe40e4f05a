"""Search combinations of per-layer compression techniques for PyTorch models (Ray Tune + Optuna).

The names in `__all__` are the Python API; everything else is internal and may move. They load lazily,
so `import orchestrator` (which every submodule import runs first) stays light:

    import orchestrator
    outcome = orchestrator.compress(model=model, train=train_loader, validation=val_loader, num_trials=16)
    compressed = orchestrator.apply("policy.json", model=model, train=train_loader, validation=val_loader)
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → the module that defines it
_EXPORTS = {
    "Workload": "orchestrator.workloads",
    "Split": "orchestrator.workloads",
    "resolve_workload": "orchestrator.workloads",
    "Policy": "orchestrator.policy",
    "PolicyError": "orchestrator.policy",
    "apply": "orchestrator.api",
    "compress": "orchestrator.api",
    "workload_from": "orchestrator.api",
    "LoaderSplit": "orchestrator.workloads",
    "CompressedModel": "orchestrator.executor",
    "SearchConfig": "orchestrator.search",
    "SearchOutcome": "orchestrator.search",
    "SpaceOptions": "orchestrator.search",
    "run_search": "orchestrator.search",
    "Checkpoint": "orchestrator.artifacts.store",
    "load_checkpoint": "orchestrator.artifacts.store",
    "save_checkpoint": "orchestrator.artifacts.store",
    "evaluate_checkpoint": "orchestrator.measure",
    "export_checkpoint": "orchestrator.export",
    "write_report": "orchestrator.report",
    "UserError": "orchestrator.errors",
}
_RENAMED = {"run_search": "run", "load_checkpoint": "load", "save_checkpoint": "save"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
