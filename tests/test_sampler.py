"""The searcher never runs a sampled configuration that compresses nothing, and never adopts one on resume."""

from __future__ import annotations

import optuna
import pytest

from orchestrator.search.sampler import SKIPPED_ATTR, ConstrainedOptunaSearch, make_sampler
from orchestrator.search.space import build_space
from orchestrator.search.space_options import SpaceOptions
from orchestrator.workloads.digits import DigitsCNN
from techniques.quantization import FLOAT_BITS

METRICS = ["validation", "size_bytes"]


def searcher(space, journal: str, seed: int) -> ConstrainedOptunaSearch:
    return ConstrainedOptunaSearch(
        space=space.define,
        metric=METRICS,
        mode=["max", "min"],
        sampler=make_sampler("tpe", seed=seed, num_trials=12),
        journal=journal,
        study_name="study",
        compresses=space.compresses,
    )


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
def test_samples_that_compress_nothing_are_pruned_and_never_run_or_adopted(tmp_path):
    # TPE (4 random start-up trials, then its model, which must take PRUNED trials without values); two groups
    # (convolutions, linears), each 8-bit or left in float: a quarter of the samples change nothing
    options = SpaceOptions(families=("quantization",), grouping="type", choices={"bits": (8, FLOAT_BITS)})
    space = build_space(DigitsCNN(), options)
    journal = str(tmp_path / "journal.log")
    first = searcher(space, journal, seed=0)
    for number in range(12):
        params = first.suggest(f"t{number}")
        assert space.compresses(params), params
        first.on_trial_complete(f"t{number}", {"validation": 0.9, "size_bytes": 1000.0 + number})
    study = optuna.load_study(study_name="study", storage=first._ot_study._storage)
    skipped = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert skipped, "seed 0 draws some all-float samples"
    assert all(t.user_attrs[SKIPPED_ATTR] == "compresses nothing" and not space.compresses(t.params) for t in skipped)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 12

    resumed = searcher(space, journal, seed=0)  # a driver restarted from Tune's snapshot of every trial it ran
    resumed._ot_trials = dict(first._ot_trials)
    assert resumed._next_orphan() is None  # the skipped trials stay skipped
