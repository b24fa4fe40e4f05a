"""Reusable tests for techniques, shipped so a technique registered outside this project passes the same
contract as the built-in ones (as Optuna ships `optuna.testing`). It imports pytest: install the `test` extra.
Nothing in `orchestrator` imports this package.

    from orchestrator.testing import TechniqueContract

    class TestRoundingContract(TechniqueContract):
        bad_spec_data = [{"step": -0.1}, {"step": 1.5}]
        edge_spec_data = [{"step": 0.0}, {"step": 1.0}]

        def make_spec(self):
            return RoundingSpec(step={"fc1": 0.1})
"""

from __future__ import annotations

from orchestrator.testing.contract import TechniqueContract, make_context, search_values
from orchestrator.testing.models import TinyCNN, seeded, tiny_data

__all__ = ["TechniqueContract", "TinyCNN", "make_context", "search_values", "seeded", "tiny_data"]
