"""The built-in `lm` workload's data, metric and model, without training it (its baseline trains on first use)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.workloads import resolve_workload
from orchestrator.workloads.lm import (
    RECIPE,
    WINDOW,
    build_llama,
    byte_stream,
    kl_to_reference,
    perplexity,
    student_llama,
    token_logits,
    windows,
)


def test_windows_predict_every_byte_after_the_first_once():
    stream = byte_stream(["héllo wörld", "second line"] * 40)
    split = windows(stream)
    inputs, targets = split.inputs["input_ids"], split.targets
    assert inputs.shape == targets.shape == ((len(stream) - 1) // WINDOW, WINDOW)
    # targets are the inputs shifted by one byte, and the windows tile the stream without overlap
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets.flatten(), stream[1 : 1 + targets.numel()])
    assert bytes(stream.tolist()).decode("utf-8").splitlines()[:2] == ["héllo wörld", "second line"]
    assert len(windows(stream, limit=2)) == 2
    with pytest.raises(ValueError, match="no window"):
        windows(stream[:WINDOW])


def test_perplexity_is_the_exponential_of_the_mean_next_byte_cross_entropy():
    assert perplexity(torch.zeros(2, 256, 5), torch.randint(0, 256, (2, 5))) == pytest.approx(256.0)
    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 256, 7, generator=generator), torch.randint(0, 256, (3, 7), generator=generator)
    log_probs = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    assert perplexity(logits, targets) == pytest.approx(math.exp(-float(log_probs.mean())), rel=1e-5)


def test_kl_to_reference_is_zero_for_the_same_model_and_matches_torch():
    generator = torch.Generator().manual_seed(1)
    reference, other = torch.randn(2, 256, 4, generator=generator), torch.randn(2, 256, 4, generator=generator)
    assert kl_to_reference(reference, reference) == pytest.approx(0.0, abs=1e-6)
    expected = F.kl_div(
        torch.log_softmax(other.transpose(1, 2), -1), torch.log_softmax(reference.transpose(1, 2), -1),
        log_target=True, reduction="none",
    ).sum(-1).mean()  # fmt: skip
    assert kl_to_reference(other, reference) == pytest.approx(float(expected), rel=1e-5)


def test_the_model_is_a_grouped_query_llama_and_generates_alike_with_and_without_its_cache():
    torch.manual_seed(0)
    model = build_llama(layers=2).eval()
    attention = model.model.layers[0].self_attn
    assert attention.num_key_value_groups == RECIPE["heads"] // RECIPE["kv_heads"] > 1
    prompt = byte_stream(["hello"])[None, :5]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == 17
    logits = token_logits(model(input_ids=prompt))
    assert logits.shape == (1, 256, 5)


def test_a_student_keeps_the_grouping_and_scales_the_width():
    student = student_llama(0.5)
    attention = student.model.layers[0].self_attn
    assert attention.num_key_value_groups == RECIPE["heads"] // RECIPE["kv_heads"]
    assert student.config.hidden_size == RECIPE["hidden"] // 2
    assert student.config.intermediate_size == RECIPE["intermediate"] // 2
    with pytest.raises(ValueError, match="width"):
        student_llama(0)


def test_the_workload_is_built_in_and_minimises_perplexity():
    workload = resolve_workload("lm")
    assert workload.metric_name == "perplexity" and workload.metric_direction == "minimize"
    assert len(workload.splits["validation"]) == len(workload.splits["test"]) == 256
    x, y = next(workload.batches("validation"))
    assert x["input_ids"].shape == y.shape == (workload.batch_size, WINDOW)


def test_the_sensitivity_profile_ranks_an_lm_by_its_kl_to_the_original():
    from orchestrator.search.cells import output_error

    generator = torch.Generator().manual_seed(2)
    reference = [torch.randn(2, 256, 3, generator=generator), torch.randn(1, 256, 3, generator=generator)]
    found = [r + 0.5 * torch.randn(r.shape, generator=generator) for r in reference]
    assert resolve_workload("lm").output_error_fn is kl_to_reference
    assert output_error(found, reference, kl_to_reference) == pytest.approx(
        kl_to_reference(torch.cat(found), torch.cat(reference))
    )
    assert output_error(reference, reference, kl_to_reference) == pytest.approx(0.0, abs=1e-6)
    squared = sum(float((f - r).pow(2).sum()) for f, r in zip(found, reference, strict=True))
    assert output_error(found, reference) == pytest.approx(squared / sum(float(r.pow(2).sum()) for r in reference))
