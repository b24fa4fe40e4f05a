"""A fuzzer over everything the project loads from a user: policy documents, search-space files, checkpoints,
finished trial records and run.json. Only the project's own errors (UserError and its kinds) may come out,
and what a loader accepts must work: an accepted policy applies to the digits model, an accepted space builds,
samples and gives policies that validate, an accepted checkpoint rebuilds a model that runs, an accepted finished
record carries its checkpoint's numbers."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.errors import UserError
from orchestrator.policy import Policy, validate_for_model
from orchestrator.search.space import build_space
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads.digits import DigitsCNN
from tests.test_policy import ORDER, policy_doc, step

LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2", "bn1", "pool", "re:fc.*", "re:conv[12]", "re:(", "_default", ""]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 10**30, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.5, 0.99, 1.0, 1e-300, 1e308, -0.0, 8.0]),
    st.sampled_from(["", "x", "none", "energy:0.9", "energy:2", "tucker", "cp", "l1", "global", "auto"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
PER_LAYER = ("rank", "ratio", "sparsity", "bits")  # the setting each compressing step must have
VALID_LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2", "re:fc.*", "re:conv[12]", "_default"]


def per_layer(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(values, st.dictionaries(st.sampled_from(VALID_LAYERS), values, min_size=1, max_size=3))


def unit(low: float, high: float) -> st.SearchStrategy:
    """Floats in [low, high], the bounds themselves often."""
    return st.one_of(st.sampled_from([low, high]), st.floats(low, high))


# setting → values the technique should accept (bounds included); the fuzzer mixes in hostile ones
SETTINGS = {
    "lowrank": {
        "rank": per_layer(st.one_of(st.integers(1, 64), unit(0.05, 0.95), st.sampled_from(["energy:0.9", None]))),
        "conv_method": st.sampled_from(["tucker", "cp"]),
    },
    "structured_pruning": {
        "ratio": per_layer(unit(0.0, 0.9)),
        "importance": st.sampled_from(["l1", "l2"]),
        "round_to": st.one_of(st.none(), st.integers(1, 16)),
    },
    "unstructured_pruning": {
        "sparsity": per_layer(unit(0.0, 0.99)),
        "scope": st.sampled_from(["layer", "global"]),
        "criterion": st.sampled_from(["magnitude", "random"]),
    },
    "quantization": {
        "bits": per_layer(st.sampled_from([2, 3, 4, 5, 6, 8, 16, None])),
        "group_size": st.sampled_from([None, 4, 8, 16]),
        "activation_bits": st.sampled_from([None, 8]),
        "kernel": st.sampled_from(["auto", "dequantize"]),
    },
    "distillation": {
        "temperature": unit(0.05, 100.0),
        "alpha": unit(0.0, 1.0),
        "epochs": st.integers(0, 1),
        "steps": st.one_of(st.none(), st.integers(1, 3)),
        "lr": unit(1e-6, 1.0),
        "weight_decay": unit(0.0, 1.0),
        "feature_weight": unit(0.0, 10.0),
    },
}
ALLOWED = (UserError,)  # PolicyError, SpaceError, CheckpointError… are all UserErrors


def hostile_value() -> st.SearchStrategy:
    per_layer_map = st.dictionaries(st.sampled_from(LAYERS), SCALARS, min_size=1, max_size=3)
    return st.one_of(SCALARS, per_layer_map, JSON)


@st.composite
def hostile_policies(draw) -> str:
    """Policy text: documents whose settings are mostly in range and now and then anything at all (out of
    range, wrong type, garbage), their steps sometimes out of order; one in ten is any JSON at all."""
    # hypothesis favours 0 when it draws integers, so the rare (hostile) branch is the largest value
    if draw(st.integers(0, 9)) == 9:
        return json.dumps(draw(JSON))
    kinds = draw(st.lists(st.sampled_from(ORDER), unique=True, min_size=1, max_size=5))
    if draw(st.integers(0, 4)) < 4:
        kinds = sorted(kinds, key=ORDER.index)
    steps = []
    for kind in kinds:
        required = [name for name in SETTINGS[kind] if name in PER_LAYER] if draw(st.integers(0, 9)) < 9 else []
        names = required + draw(st.lists(st.sampled_from(sorted(SETTINGS[kind])), unique=True, max_size=4))
        names = list(dict.fromkeys(names))
        hostile = {name: draw(st.integers(0, 7)) == 7 for name in names}
        data = {n: draw(hostile_value() if hostile[n] else SETTINGS[kind][n]) for n in names}
        steps.append(step(kind, **data))
    seed = draw(st.one_of(st.integers(0, 2**32 - 1), SCALARS) if draw(st.integers(0, 9)) == 9 else st.integers(0, 99))
    return json.dumps(policy_doc(*steps, seed=seed))


def load_or_refuse(load, text):  # noqa: ANN001, ANN201
    """The loader's result, or None when it refused with one of the project's own errors."""
    try:
        return load(text)
    except ALLOWED as exc:
        assert "\n" not in str(exc), "errors are one line"
        return None


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile_policies())
def test_accepted_policies_apply_to_the_digits_model(text, digits, digits_baseline):
    policy = load_or_refuse(Policy.loads, text)
    if policy is None or load_or_refuse(lambda p: validate_for_model(p, DigitsCNN()) or p, policy) is None:
        return
    assert Policy.loads(policy.dumps()) == policy
    try:
        result = executor.apply(policy, digits, baseline=digits_baseline)
    except ALLOWED:
        return
    assert math.isfinite(result.metrics["validation"]) and result.metrics["size_bytes"] > 0


FAMILIES = list(SETTINGS)
PATTERNS = ["re:conv.*", "re:fc.*", "conv1", "fc2", "re:.*", "re:conv[23]"]
SPACE_KEYS = {
    "families": st.lists(st.sampled_from(FAMILIES), min_size=1, max_size=5, unique=True),
    "grouping": st.sampled_from(["auto", "layer", "block", "type"]),
    "groups": st.dictionaries(st.sampled_from(["early", "late", "head"]), st.sampled_from(PATTERNS), min_size=1),
    "choices": st.fixed_dictionaries(
        {},
        optional={
            "bits": st.lists(st.sampled_from([2, 3, 4, 8, 32]), min_size=1, max_size=3),
            "sparsity": st.lists(st.sampled_from([0.0, 0.5, 0.9, 0.95]), min_size=1, max_size=3),
            "rank": st.lists(st.sampled_from(["none", 0.5, 0.25]), min_size=1, max_size=2),
            "ratio": st.lists(st.sampled_from([0.0, 0.25, 0.5]), min_size=1, max_size=2),
        },
    ),
    "exclude": st.dictionaries(st.sampled_from(FAMILIES[:4]), st.lists(st.sampled_from(PATTERNS), max_size=2)),
    "distillation": st.fixed_dictionaries(
        {},
        optional={
            "epochs": st.lists(st.integers(0, 3), min_size=1, max_size=3),
            "temperature": st.sampled_from([[1.0, 4.0], [0.05, 100.0], [2.0, 2.0]]),
            "alpha": st.sampled_from([[0.0, 1.0], [0.5, 0.7]]),
            "lr": st.sampled_from([[1e-5, 1e-3], [1e-3, 1.0]]),
        },
    ),
}


@st.composite
def hostile_spaces(draw) -> object:
    """Search-space documents: known keys with sensible values and, now and then, any JSON value or an
    unknown key; one in ten is any JSON at all."""
    if draw(st.integers(0, 9)) == 9:
        return draw(JSON)
    doc = {}
    for key in draw(st.lists(st.sampled_from([*SPACE_KEYS, "colour"]), unique=True, max_size=5)):
        hostile = key not in SPACE_KEYS or draw(st.integers(0, 7)) == 7
        doc[key] = draw(JSON if hostile else SPACE_KEYS[key])
    return doc


@settings(max_examples=400, deadline=None)
@given(doc=hostile_spaces(), seed=st.integers(0, 3))
def test_accepted_search_spaces_build_and_give_valid_policies(doc, seed):
    options = load_or_refuse(options_from_json, doc)
    if options is None:
        return
    model = DigitsCNN()
    space = load_or_refuse(lambda o: build_space(model, o), options)
    if space is None:
        return
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    space.define(trial)
    policy = space.policy(trial.params)
    validate_for_model(policy, model)
    assert Policy.loads(policy.dumps()) == policy


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved(digits, digits_baseline, tmp_path_factory):
    doc = policy_doc(step("unstructured_pruning", sparsity=0.5), step("quantization", bits={"_default": 4}))
    policy = Policy.from_json(doc)
    result = executor.apply(policy, digits, baseline=digits_baseline)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    store.save(result.model, policy, result.metrics, digits, str(path))
    return {p.name: p.read_bytes() for p in path.iterdir()}


def rewrite(files: dict[str, bytes], name: str, data: bytes) -> dict[str, bytes]:
    """Replace one file and update its checksum and size in the manifest, as a careful forger would."""
    files = {**files, name: data}
    if name != store.MANIFEST:
        manifest = json.loads(files[store.MANIFEST])
        if isinstance(manifest.get("files"), dict) and isinstance(manifest["files"].get(name), dict):
            manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        files[store.MANIFEST] = json.dumps(manifest).encode()
    return files


@st.composite
def forged_checkpoints(draw, originals: dict[str, bytes]) -> dict[str, bytes]:
    name = draw(st.sampled_from(sorted(originals)))
    original = originals[name]
    if name.endswith(".json") and draw(st.booleans()):
        doc = json.loads(original)
        if isinstance(doc, dict) and doc and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(doc)))
            doc[key] = draw(JSON)
        else:
            doc = draw(JSON)
        data = json.dumps(doc).encode()
    else:
        cut = draw(st.integers(0, len(original)))
        data = original[:cut] + draw(st.binary(max_size=16)) + original[cut + draw(st.integers(0, 32)) :]
    files = rewrite(originals, name, data)
    if draw(st.integers(0, 9)) == 9:
        files.pop(draw(st.sampled_from(sorted(files))))
    return files


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forged_checkpoints_load_or_are_refused_in_one_line(data, saved, digits, tmp_path):
    files = data.draw(forged_checkpoints(saved))
    target = Path(tempfile.mkdtemp(prefix="ckpt-", dir=tmp_path))
    for name, content in files.items():
        (target / name).write_bytes(content)
    checkpoint = load_or_refuse(lambda source: store.load(source, digits), str(target))
    if checkpoint is not None:
        with torch.no_grad():
            out = checkpoint.model(digits.example_inputs(2))
        assert out.shape == (2, 10)


# ----------------------------------------------------------------------------- finished records

# JSON text json.dumps never writes, and numbers past what a float or Python's parser takes
RAW_NUMBERS = [b"NaN", b"-Infinity", b"1e400", b"-1e400", b"9" * 400, b"9" * 5000, b"[" * 1000 + b"]" * 1000]


def with_raw(doc: object, raw: bytes) -> bytes:
    """`doc` as JSON with the string "@raw@" (if it holds one) written as the text `raw`."""
    return json.dumps(doc).encode().replace(b'"@raw@"', raw)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """(record directory, its true result, the trial's policy and workload) of a finished int8 trial."""
    from orchestrator.search import trial
    from tests.test_finished_records import finished, int8_config, outside_ray, trial_setup

    with pytest.MonkeyPatch.context() as patch:
        setup = trial_setup(str(tmp_path_factory.mktemp("run")))
        directory, result = finished(setup, outside_ray(patch))
    return directory, result, setup.space.policy(int8_config(setup)), setup.workload, trial


@st.composite
def forged_results(draw, true: dict) -> bytes:
    """A finished result with a few fields removed or replaced by anything (raw numbers included); one in ten
    is any JSON, one in ten any bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return draw(st.binary(max_size=64))
    if kind == 8:
        return json.dumps(draw(JSON)).encode()
    doc = dict(true)
    for key in draw(st.lists(st.sampled_from([*sorted(true), "pareto"]), unique=True, max_size=3)):
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(st.one_of(SCALARS, JSON, st.just("@raw@"), st.sampled_from(list(true.values()))))
    return with_raw(doc, draw(st.sampled_from(RAW_NUMBERS)))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_an_accepted_finished_record_carries_its_checkpoints_numbers(data, record):
    directory, true, policy, workload, trial = record
    forged = data.draw(forged_results(true))
    result = load_or_refuse(lambda d: trial.restored_result(str(directory), d, policy, workload), forged)
    if result is None:
        return
    free = {"node_id", "device", "wall_s", "checkpoint_path"}
    assert set(result) == set(true)
    assert {k: v for k, v in result.items() if k not in free} == {k: v for k, v in true.items() if k not in free}
    assert math.isfinite(result["wall_s"]) and isinstance(result["device"], str)


@st.composite
def run_records(draw) -> bytes:
    """run.json documents: the right fields with values of any kind, any JSON, raw numbers, or random bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return draw(st.binary(max_size=64))
    if kind == 8:
        return with_raw(draw(JSON), draw(st.sampled_from(RAW_NUMBERS)))
    value = st.one_of(SCALARS, st.just("@raw@"), st.text(max_size=8), JSON)
    fields = st.sampled_from(["run_dir", "num_trials", "target", "workload", "extra"])
    return with_raw(draw(st.dictionaries(fields, value, max_size=5)), draw(st.sampled_from(RAW_NUMBERS)))


@settings(max_examples=300, deadline=None)
@given(data=run_records())
def test_a_run_json_reads_as_typed_fields_or_is_refused_in_one_line(data):
    from orchestrator.search.prepare import RUN_FILE, read_run_record

    with tempfile.TemporaryDirectory() as run_dir:
        (Path(run_dir) / RUN_FILE).write_bytes(data)
        try:
            record = read_run_record(run_dir)
        except UserError as exc:
            assert "\n" not in str(exc) and RUN_FILE in str(exc)
            return
    kinds = {"run_dir": str, "num_trials": int, "target": str, "workload": str}
    assert set(record) <= set(kinds) and all(type(record[k]) is kinds[k] for k in record)
    assert record.get("num_trials", 1) >= 1


@pytest.fixture(scope="module")
def whole_journal(tmp_path_factory) -> bytes:
    """A journal of a study with a few trials, as Optuna writes it."""
    from orchestrator.search.sampler import journal_storage

    path = tmp_path_factory.mktemp("journal") / "journal.log"
    study = optuna.create_study(study_name="run", storage=journal_storage(path), directions=["maximize", "minimize"])
    for value in range(3):
        trial = study.ask()
        trial.suggest_categorical("bits", [4, 8])
        trial.set_user_attr("note", "x" * value)
        study.tell(trial, [value / 3, 10.0 - value])
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), tail=st.one_of(st.just(b""), st.binary(max_size=40)), newline=st.booleans())
def test_a_journal_cut_anywhere_or_with_bytes_appended_resumes_or_is_refused(whole_journal, cut, tail, newline):
    """A crash cuts the journal at any byte (the torn last line is dropped); bytes appended are refused, and
    the journal is left as it was; what is kept loads in Optuna as a prefix of the study's history."""
    from orchestrator.search.sampler import journal_storage, repair_journal

    cut %= len(whole_journal) + 1
    damaged = whole_journal[:cut] + tail + (b"\n" if newline and tail else b"")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "journal.log"
        path.write_bytes(damaged)
        try:
            dropped = repair_journal(path)
        except UserError as exc:
            assert "\n" not in str(exc) and path.read_bytes() == damaged
            return
        kept = path.read_bytes()
        assert kept == damaged[: len(damaged) - dropped] and (not kept or kept.endswith(b"\n"))
        assert whole_journal.startswith(kept) or tail  # a torn line of ours, or whole lines someone appended
        if kept.startswith(b'{"op_code":0'):  # the study was created before the cut
            study = optuna.load_study(study_name="run", storage=journal_storage(path))
            assert len(study.trials) <= 3
