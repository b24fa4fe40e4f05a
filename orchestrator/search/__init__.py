"""The search: Ray Tune trials driven by an Optuna sampler over a space built from the technique registry.

`run(SearchConfig(...))` runs or resumes one search and returns a `SearchOutcome`; a SearchConfig is the workload
and four parts (`SearchStrategy`, `Resources`, `RunSettings`, `MeasureSettings`). The names load lazily, so
importing a light module of this package (`orchestrator.search.config`) does not start torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MeasureSettings": "orchestrator.search.config",
    "Resources": "orchestrator.search.config",
    "RunSettings": "orchestrator.search.config",
    "SearchConfig": "orchestrator.search.config",
    "SearchStrategy": "orchestrator.search.config",
    "SearchOutcome": "orchestrator.search.config",
    "SpaceOptions": "orchestrator.search.space_options",
    "load_space_file": "orchestrator.search.space_options",
    "run": "orchestrator.search.driver",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
