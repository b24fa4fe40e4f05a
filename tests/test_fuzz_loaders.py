"""A fuzzer over everything the project loads from a user: policy documents, search-space files and
checkpoints. Only the project's own errors (UserError and its kinds) may come out, and what a loader accepts
must work: an accepted policy applies to the digits model, an accepted space builds, samples and gives
policies that validate, an accepted checkpoint rebuilds a model that runs."""

from __future__ import annotations

import hashlib
import json
import math

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
SETTINGS = {
    "lowrank": ["rank", "conv_method"],
    "structured_pruning": ["ratio", "importance", "round_to"],
    "unstructured_pruning": ["sparsity", "scope", "criterion"],
    "quantization": ["bits", "group_size", "activation_bits", "kernel"],
    "distillation": ["temperature", "alpha", "epochs", "steps", "lr", "weight_decay", "feature_weight"],
}
ALLOWED = (UserError,)  # PolicyError, SpaceError, CheckpointError… are all UserErrors


def settings_value() -> st.SearchStrategy:
    per_layer = st.dictionaries(st.sampled_from(LAYERS), SCALARS, min_size=1, max_size=3)
    return st.one_of(SCALARS, per_layer, JSON)


@st.composite
def hostile_policies(draw) -> str:
    """Policy text: mostly well-formed documents whose settings take any JSON value, sometimes garbage."""
    if draw(st.integers(0, 9)) == 0:
        return json.dumps(draw(JSON))
    kinds = draw(st.lists(st.sampled_from(ORDER), unique=True, min_size=1, max_size=5))
    if draw(st.booleans()):
        kinds = sorted(kinds, key=ORDER.index)
    steps = []
    for kind in kinds:
        names = draw(st.lists(st.sampled_from(SETTINGS[kind]), unique=True, min_size=1, max_size=3))
        steps.append(step(kind, **{name: draw(settings_value()) for name in names}))
    return json.dumps(policy_doc(*steps, seed=draw(st.one_of(st.integers(0, 2**33), SCALARS))))


def load_or_refuse(load, text):  # noqa: ANN001, ANN201
    """The loader's result, or None when it refused with one of the project's own errors."""
    try:
        return load(text)
    except ALLOWED as exc:
        assert "\n" not in str(exc), "errors are one line"
        return None


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile_policies())
def test_accepted_policies_apply_to_the_digits_model(text, digits, digits_baseline):
    policy = load_or_refuse(Policy.loads, text)
    if policy is None or load_or_refuse(lambda p: validate_for_model(p, DigitsCNN()) or p, policy) is None:
        return
    assert Policy.loads(policy.dumps()) == policy
    if policy.fine_tune_epochs() > 1 or any(getattr(s, "steps", None) for s in policy.steps):
        return  # the bounds of long fine-tunes are checked by the technique tests; here every apply is short
    try:
        result = executor.apply(policy, digits, baseline=digits_baseline)
    except ALLOWED:
        return
    assert math.isfinite(result.metrics["validation"]) and result.metrics["size_bytes"] > 0


@st.composite
def hostile_spaces(draw) -> object:
    """Search-space documents: known keys with any JSON values, unknown keys, and garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    keys = ["families", "grouping", "groups", "choices", "exclude", "distillation", "colour"]
    doc = {}
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=4)):
        doc[key] = draw(
            st.one_of(
                JSON,
                st.lists(st.sampled_from(list(SETTINGS)), max_size=3),
                st.dictionaries(
                    st.sampled_from(["bits", "sparsity", "rank", "ratio", "epochs", "lr", "g"]),
                    st.one_of(st.lists(SCALARS, max_size=3), SCALARS),
                    max_size=3,
                ),
                st.dictionaries(st.sampled_from(["early", "late", "x"]), st.sampled_from(LAYERS + [1, None])),
            )
        )
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
    if draw(st.integers(0, 9)) == 0:
        files.pop(draw(st.sampled_from(sorted(files))))
    return files


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forged_checkpoints_load_or_are_refused_in_one_line(data, saved, digits, tmp_path):
    files = data.draw(forged_checkpoints(saved))
    target = tmp_path / f"ckpt-{hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:12]}"
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    checkpoint = load_or_refuse(lambda source: store.load(source, digits), str(target))
    if checkpoint is not None:
        with torch.no_grad():
            out = checkpoint.model(digits.example_inputs(2))
        assert out.shape == (2, 10)
