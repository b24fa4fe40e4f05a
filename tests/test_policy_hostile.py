"""Policies as a hostile user writes them: saving never changes what applies, and every document that
validates can be applied (or is refused with one PolicyError line)."""

from __future__ import annotations

import json

import pytest

from orchestrator.policy import MAX_SEED, Policy, PolicyError
from tests.tiny_models import TinyCNN


def _quant(bits: dict) -> dict:
    return {"_type": "quantization", "_version": 1, "_data": {"bits": bits}}


def _policy(*steps: dict, seed=0) -> str:  # noqa: ANN001
    return json.dumps({"_type": "policy", "_version": 1, "seed": seed, "steps": list(steps)})


def test_saving_keeps_rule_order_so_the_same_layer_gets_the_same_bits():
    # the first matching re: rule wins; sorting the keys would give fc1 4 bits instead of 8
    policy = Policy.loads(_policy(_quant({"re:fc.*": 8, "re:conv.*|fc1": 4})))
    again = Policy.loads(policy.dumps())
    assert policy.steps[0].bits.resolve("fc1") == again.steps[0].bits.resolve("fc1") == 8
    assert again == policy and again.dumps() == policy.dumps()
    assert list(json.loads(policy.dumps())["steps"][0]["_data"]["bits"]) == ["re:fc.*", "re:conv.*|fc1"]


@pytest.mark.parametrize("seed", [10**30, -1, 2**32, 1.5, True, "0"])
def test_seed_outside_what_the_generators_take_is_refused(seed):
    with pytest.raises(PolicyError, match="seed must be an integer"):
        Policy.loads(_policy(seed=seed))


def test_largest_seed_applies():
    import techniques
    from orchestrator.testing import make_context

    policy = Policy.loads(_policy(_quant({"_default": 4}), seed=MAX_SEED))
    ctx = make_context(seed=policy.seed)
    model = techniques.apply_spec(TinyCNN(), policy.steps[0], ctx)
    assert model(ctx.example_inputs).isfinite().all()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_that_are_not_numbers_are_refused(constant):
    text = _policy().replace('"seed": 0', f'"seed": {constant}')
    with pytest.raises(PolicyError, match=f"{constant} is not a number"):
        Policy.loads(text)


def test_deeply_nested_documents_are_one_error_not_a_recursion_crash():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(PolicyError, match="nested too deeply"):
        Policy.loads(deep)
