"""The searcher: never runs a sampled configuration that compresses nothing (nor adopts one on resume), keeps
no state outside its journal (it pickles to its recipe, checkpoints to a JSON note) for every sampler."""

from __future__ import annotations

import json
import pickle
import threading

import optuna
import pytest

from orchestrator.errors import UserError
from orchestrator.search.config import SAMPLERS
from orchestrator.search.sampler import SKIPPED_ATTR, journal_storage, sampler_recipe
from orchestrator.search.searcher import JournalSearcher
from orchestrator.search.space import build_space
from orchestrator.search.space_options import SpaceOptions
from orchestrator.workloads.digits import DigitsCNN
from techniques.quantization import FLOAT_BITS

METRICS = ["validation", "size_bytes"]


def searcher(space, journal: str, seed: int, sampler: str = "tpe") -> JournalSearcher:
    return JournalSearcher(
        space=space.define,
        metric=METRICS,
        mode=["max", "min"],
        sampler=sampler_recipe(sampler, num_trials=12),
        seed=seed,
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
    study = optuna.load_study(study_name="study", storage=journal_storage(journal))
    skipped = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert skipped, "seed 0 draws some all-float samples"
    assert all(t.user_attrs[SKIPPED_ATTR] == "compresses nothing" and not space.compresses(t.params) for t in skipped)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 12

    resumed = searcher(space, journal, seed=0)  # a driver restarted from Tune's snapshot of every trial it ran
    for number in range(12):  # Tune asks again for as many trials: it is given the finished ones, in order
        params = resumed.suggest(f"r{number}")
        assert space.compresses(params)
    assert resumed._next_orphan() is None  # the skipped trials stay skipped
    assert [t.state for t in optuna.load_study(study_name="study", storage=journal_storage(journal)).trials] == [
        t.state for t in study.get_trials()
    ]  # nothing was asked anew


class _LockedSampler(optuna.samplers.RandomSampler):
    """A sampler that cannot be pickled (optuna 5.1's samplers hold a lock)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self._lock = threading.Lock()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_searcher_pickles_to_its_recipe_and_checkpoints_as_json(tmp_path, monkeypatch, sampler):
    from orchestrator.search import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "TrialSeededSampler", lambda recipe, seed: _LockedSampler(seed))
    space = build_space(DigitsCNN(), SpaceOptions(families=("quantization",)))
    journal = str(tmp_path / "journal.log")
    first = searcher(space, journal, seed=3, sampler=sampler)
    asked = [first.suggest(f"t{n}") for n in range(3)]
    first.on_trial_complete("t0", {"validation": 0.9, "size_bytes": 10.0})
    first.save(str(tmp_path / "searcher-state.pkl"))  # what Tune calls at each experiment checkpoint
    assert json.loads((tmp_path / "searcher-state.pkl").read_text())["journal"] == journal
    copy = pickle.loads(pickle.dumps(first))  # what Tune does when it writes tuner.pkl
    assert copy.suggest("t0") == asked[0]  # same study, same trials: t1 and t2 are adopted, not re-sampled
    assert [copy.suggest(f"u{n}") for n in (1, 2)] == asked[1:]
    with pytest.raises(UserError, match="resumes from its Optuna journal"):
        first.restore(str(tmp_path / "searcher-state.pkl"))
