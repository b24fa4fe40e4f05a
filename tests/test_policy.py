"""Policy documents: parsing, validation before work, and a property test over random documents."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.errors import UserError
from orchestrator.policy import Policy, PolicyError, validate_for_model
from tests.tiny_models import TinyCNN

ORDER = ["lowrank", "structured_pruning", "unstructured_pruning", "quantization", "distillation"]


def step(kind: str, **data) -> dict:
    return {"_type": kind, "_version": 1, "_data": data}


def policy_doc(*steps: dict, seed: int = 0) -> dict:
    return {"_type": "policy", "_version": 1, "seed": seed, "steps": list(steps)}


FULL = policy_doc(
    step("lowrank", rank={"fc1": 0.5}),
    step("structured_pruning", ratio={"re:conv.*": 0.25}),
    step("unstructured_pruning", sparsity={"_default": 0.5, "fc2": 0.0}),
    step("quantization", bits={"_default": 4, "fc2": 8}),
    step("distillation", temperature=3.0, alpha=0.5, epochs=1),
)


def test_a_full_policy_round_trips_through_json():
    policy = Policy.from_json(FULL)
    assert policy.techniques() == ORDER
    again = Policy.loads(policy.dumps())
    assert again == policy and again.dumps() == policy.dumps()
    validate_for_model(policy, TinyCNN())


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (json.dumps({**FULL, "_version": 99}), "unsupported policy version 99"),
        (json.dumps({**FULL, "_type": "recipe"}), '"_type": "policy"'),
        (json.dumps({**FULL, "extra": 1}), "unknown policy field"),
        (json.dumps({**FULL, "seed": -1}), "seed must be"),
        (json.dumps(policy_doc(step("magic", x=1))), "unknown technique 'magic'"),
        (json.dumps(policy_doc({**step("lowrank", rank=0.5), "_version": 7})), "unsupported version 7"),
        (json.dumps(policy_doc(step("unstructured_pruning", sparsity=1.5))), r"step 1: .*sparsity"),
        (json.dumps(policy_doc(step("quantization", bits=1))), "step 1: .*bits"),
        (json.dumps(policy_doc(step("lowrank", rank=0))), "step 1: .*rank"),
        (json.dumps(policy_doc(step("distillation", temperature=-1.0))), "temperature"),
        (json.dumps(policy_doc(step("lowrank", rank=0.5, colour="red"))), "unknown setting"),
        (
            json.dumps(policy_doc(step("quantization", bits=4), step("structured_pruning", ratio=0.5))),
            "step 2: structured_pruning cannot follow quantization",
        ),
        (json.dumps(policy_doc(step("quantization", bits=4), step("quantization", bits=8))), "already appears"),
    ],
)
def test_malformed_policies_raise_one_line_policy_errors(text, message):
    with pytest.raises(PolicyError, match=message) as info:
        Policy.loads(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "doc, message",
    [
        (policy_doc(step("unstructured_pruning", sparsity={"fc9": 0.5})), "no layer 'fc9'"),
        (policy_doc(step("quantization", bits={"re:attention.*": 4})), "matches no Linear/Conv2d/Embedding layer"),
        (policy_doc(step("structured_pruning", ratio={"bn1": 0.5})), "'bn1' is a BatchNorm2d"),
    ],
)
def test_policies_that_do_not_fit_the_model_are_rejected_before_work(doc, message):
    with pytest.raises(PolicyError, match=message):
        validate_for_model(Policy.from_json(doc), TinyCNN())


def test_missing_policy_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read policy"):
        Policy.load(tmp_path / "absent.json")


# ----------------------------------------------------------------------------- property test

LAYERS = ["conv1", "conv2", "fc1", "fc2", "re:fc.*", "re:conv[12]", "_default"]


def layer_map(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(LAYERS), values, min_size=1, max_size=4)


VALID_STEPS = {
    "lowrank": st.builds(
        lambda rank, method: step("lowrank", rank=rank, conv_method=method),
        layer_map(st.one_of(st.integers(1, 64), st.floats(0.05, 0.95), st.sampled_from(["energy:0.9", "energy:0.5"]))),
        st.sampled_from(["tucker", "cp"]),
    ),
    "structured_pruning": st.builds(
        lambda ratio, imp: step("structured_pruning", ratio=ratio, importance=imp),
        layer_map(st.floats(0.0, 0.9)),
        st.sampled_from(["l1", "l2"]),
    ),
    "unstructured_pruning": st.builds(
        lambda sparsity, scope: step("unstructured_pruning", sparsity=sparsity, scope=scope),
        layer_map(st.floats(0.0, 0.99)),
        st.sampled_from(["layer", "global"]),
    ),
    "quantization": st.builds(
        lambda bits, act: step("quantization", bits=bits, activation_bits=act),
        layer_map(st.sampled_from([2, 3, 4, 5, 6, 8, 16])),
        st.sampled_from([None, 8]),
    ),
    "distillation": st.builds(
        lambda t, a, e: step("distillation", temperature=t, alpha=a, epochs=e),
        st.floats(0.5, 10.0),
        st.floats(0.0, 1.0),
        st.integers(1, 5),
    ),
}


@st.composite
def valid_docs(draw) -> dict:
    kinds = draw(st.lists(st.sampled_from(ORDER), unique=True, max_size=5))
    steps = [draw(VALID_STEPS[kind]) for kind in sorted(kinds, key=ORDER.index)]
    return policy_doc(*steps, seed=draw(st.integers(0, 2**31)))


# values each setting must reject (None is valid in some per-layer maps: "leave this layer alone")
BAD_VALUES = {
    "rank": [0, -1, 1.5, "x", "energy:2", [], {}, True],
    "ratio": [-0.1, 1.5, "x", [], True],
    "sparsity": [-0.5, 1.5, "x", [], True],
    "bits": [1, 7, 1.5, "x", [], True],
    "activation_bits": [4, 16, "x"],
    "temperature": [0, -1.0, "x", None, True],
    "alpha": [-0.5, 1.5, "x", None],
    "epochs": [-1, 1.5, "x", True],
}


@st.composite
def invalid_docs(draw) -> object:
    doc = copy.deepcopy(draw(valid_docs()))
    mutation = draw(st.sampled_from(["type", "version", "field", "seed", "steps", "step", "value", "order", "junk"]))
    if mutation == "type":
        doc["_type"] = draw(st.sampled_from(["Policy", "", 3, None]))
    elif mutation == "version":
        doc["_version"] = draw(st.sampled_from([0, 2, "1", None]))
    elif mutation == "field":
        doc[draw(st.sampled_from(["steps_", "seeds", "x"]))] = 1
    elif mutation == "seed":
        doc["seed"] = draw(st.sampled_from([-3, "0", 1.5, None]))
    elif mutation == "steps":
        doc["steps"] = draw(st.sampled_from([None, {}, "lowrank", 3]))
    elif mutation == "junk":
        return draw(st.sampled_from([[], "policy", 3, None]))
    elif not doc["steps"]:
        doc["steps"] = [draw(st.sampled_from([{}, [], "lowrank", {"_type": "x", "_version": 1, "_data": {}}]))]
    elif mutation == "step":
        index = draw(st.integers(0, len(doc["steps"]) - 1))
        doc["steps"][index] = draw(
            st.sampled_from(
                [
                    {**doc["steps"][index], "_type": "nope"},
                    {**doc["steps"][index], "_version": 9},
                    {**doc["steps"][index], "_data": {"unknown_setting": 1}},
                    {"_type": doc["steps"][index]["_type"]},
                ]
            )
        )
    elif mutation == "value":
        index = draw(st.integers(0, len(doc["steps"]) - 1))
        data = doc["steps"][index]["_data"]
        key = draw(st.sampled_from(sorted(k for k in data if k not in ("conv_method", "importance", "scope"))))
        bad = draw(st.sampled_from(BAD_VALUES[key]))
        data[key] = {"_default": bad} if isinstance(data[key], dict) else bad
    elif mutation == "order":
        if len(doc["steps"]) < 2:
            doc["steps"] = doc["steps"] * 2
        else:
            doc["steps"].reverse()
    return doc


@settings(max_examples=150, deadline=None)
@given(valid_docs())
def test_valid_documents_load_and_reserialise_to_the_same_json(doc):
    policy = Policy.from_json(doc)
    text = policy.dumps()
    assert Policy.loads(text).dumps() == text
    reloaded = json.loads(text)
    for original, saved in zip(doc["steps"], reloaded["steps"], strict=True):
        for key, value in original["_data"].items():
            assert saved["_data"][key] == value


@settings(max_examples=300, deadline=None)
@given(invalid_docs())
def test_invalid_documents_raise_only_policy_errors(doc):
    with pytest.raises(PolicyError):
        Policy.from_json(doc)
