"""The search: Ray Tune trials driven by an Optuna sampler over a space built from the technique registry.

`run(SearchConfig(...))` runs or resumes one search and returns a `SearchOutcome`.
"""

from orchestrator.search.config import SearchConfig, SearchOutcome
from orchestrator.search.driver import run
from orchestrator.search.space_options import SpaceOptions, load_space_file

__all__ = ["SearchConfig", "SearchOutcome", "SpaceOptions", "load_space_file", "run"]
