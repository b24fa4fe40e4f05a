"""Models as the hub ships them (#24 item 3): BERT with its pooler under a module that reads only hidden states
(the pooler is in no exported graph: left alone, said once, never a KeyError), and the sentence-transformers
recipe, mean pooling over the attention mask, as an `output_fn(outputs, batch)` through evaluation,
distillation, ONNX export and ONNX Runtime scoring. Tiny random-initialised BertModels; nothing is downloaded."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from examples.sentence_encoder import make_workload, mean_cosine, mean_pooled, padded_sentences
from orchestrator import executor, workload_from
from orchestrator.errors import UserError
from orchestrator.export import export_model
from orchestrator.measure import measure_reference, onnx_session
from orchestrator.policy import Policy
from orchestrator.workloads._reduction import takes_batch
from orchestrator.workloads._unused import unused_layers
from techniques.packed.finalize import INT_KERNEL, kernel_report

CPU = torch.device("cpu")


def policy(*steps: dict) -> Policy:
    return Policy.from_json({"_type": "policy", "_version": 1, "seed": 0, "steps": list(steps)})


def quantization(**data) -> dict:
    return {"_type": "quantization", "_version": 1, "_data": {"bits": {"_default": 8}, **data}}


class HiddenStates(nn.Module):
    """A sentence encoder as a user wraps `AutoModel.from_pretrained`: the BERT keeps its pooler, the forward
    returns the mean of the last hidden states, so the pooler's output is computed and thrown away."""

    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16)  # fmt: skip
        self.bert = BertModel(config, add_pooling_layer=True)
        self.spare = nn.Linear(32, 32)  # never called at all

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(dim=1)


@pytest.fixture(scope="module")
def pooler_workload():
    torch.manual_seed(0)
    model = HiddenStates().eval()
    batch = padded_sentences(96, length=12, vocab=200)
    with torch.no_grad():
        targets = model(**batch)
    split = lambda a, b: ({k: v[a:b] for k, v in batch.items()}, targets[a:b])  # noqa: E731
    return workload_from(model=model, train=split(0, 64), validation=split(64, 96), metric=mean_cosine,
                         batch_size=16, name="hidden-states")  # fmt: skip


@pytest.fixture(scope="module")
def encoder():
    return make_workload()


def test_output_fns_take_the_batch_only_when_their_signature_asks():
    assert not takes_batch(lambda outputs: outputs)
    assert not takes_batch(lambda outputs, dim=1: outputs)  # an optional second parameter is not the batch
    assert takes_batch(lambda outputs, batch: outputs)
    assert takes_batch(mean_pooled)
    assert not takes_batch(torch.sigmoid)  # a builtin: called with the outputs alone


@pytest.mark.parametrize("bad", [lambda: 0, lambda a, b, c: a, lambda a, *, mask: a, 3])
def test_an_output_fn_of_another_shape_is_one_clear_line(pooler_workload, bad):
    split = pooler_workload.splits["validation"]
    with pytest.raises(UserError, match=r"output_fn .*\(outputs\) or \(outputs, batch\)") as error:
        workload_from(model=nn.Linear(2, 2), train=split, validation=split, output_fn=bad)
    assert "\n" not in str(error.value)


def test_mask_aware_pooling_sees_the_batch_and_leaves_padding_out(encoder):
    inputs = encoder.example_inputs(8)
    mask = inputs["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) < mask.shape[1]).any()  # padded rows
    model = encoder.load_baseline()
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
        pooled = encoder.forward(model, inputs)
    by_hand = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(len(hidden))])
    torch.testing.assert_close(pooled, by_hand)
    assert not torch.allclose(pooled, hidden.mean(dim=1), atol=1e-3)  # plain mean pooling differs on them
    assert encoder.evaluate(model) == pytest.approx(1.0, abs=1e-5)  # the targets are the model's mask-aware means


@pytest.mark.slow
def test_distillation_reduces_with_the_batch(encoder):
    seen: list[tuple[bool, bool]] = []  # (given the batch with its mask, a student's forward being trained)

    def spying(outputs, batch):
        seen.append((isinstance(batch, dict) and "attention_mask" in batch, outputs.last_hidden_state.requires_grad))
        return mean_pooled(outputs, batch)

    workload = dataclasses.replace(encoder, output_fn=spying)
    distill = {"_type": "distillation", "_version": 1, "_data": {"epochs": 0, "steps": 2, "lr": 1e-4}}
    result = executor.apply(policy(quantization(bits={"_default": 4}), distill), workload)
    assert all(with_mask for with_mask, _ in seen)
    assert sum(training for _, training in seen) == 2  # the two distillation steps' student forwards
    assert result.metrics["validation"] > 0.9


def test_onnx_runtime_scores_the_mask_aware_pooling_of_its_own_outputs(encoder):
    model = encoder.load_baseline()
    session = onnx_session(model, encoder)
    inputs = {k: torch.cat([b[0][k] for b in encoder.batches("validation")]) for k in ("input_ids", "attention_mask")}
    targets = torch.cat([b[1] for b in encoder.batches("validation")])
    independent = ort.InferenceSession(session.data, providers=["CPUExecutionProvider"])
    hidden = independent.run(["last_hidden_state"], {k: v.numpy() for k, v in inputs.items()})[0]
    mask = inputs["attention_mask"].numpy()[..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = mean_cosine(torch.from_numpy(pooled), targets)
    assert session.evaluate(encoder) == pytest.approx(expected, abs=1e-6)
    assert session.check_metrics()["export_check_passed"]


def test_unused_layers_are_found_in_float_and_integer_models(pooler_workload):
    model = pooler_workload.load_baseline()
    expected = ["bert.pooler.dense", "spare"]
    assert pooler_workload.unused_layers(model) == expected
    int8 = executor.apply(policy(quantization(activation_bits=8)), pooler_workload).model
    assert INT_KERNEL in kernel_report(int8).values()  # integer GEMMs cut autograd's paths
    assert unused_layers(int8, pooler_workload.example_inputs(2)) == expected


@pytest.mark.slow
def test_a_pooler_the_outputs_never_read_is_left_out_of_the_export_and_said_once(pooler_workload, tmp_path,
                                                                                   capfd, monkeypatch):  # fmt: skip
    monkeypatch.setattr("orchestrator.measure.reference._SAID", set())
    reference = measure_reference(pooler_workload, pooler_workload.load_baseline(), CPU, target="onnxruntime")
    result = executor.apply(
        policy(quantization(bits={"_default": 4})), pooler_workload, reference=reference, target="onnxruntime"
    )  # fmt: skip (was KeyError: 'bert.pooler.dense')
    measure_reference(pooler_workload, pooler_workload.load_baseline(), CPU)
    said = [line for line in capfd.readouterr().err.splitlines() if "bert.pooler.dense" in line]
    assert len(said) == 1 and "spare" in said[0]
    assert not {"bert.pooler.dense", "spare"} & set(result.metrics["kernels"])
    assert result.metrics["export_check_passed"] and result.metrics["validation"] > 0.9
    exported = export_model(result.model, pooler_workload, out=tmp_path / "model.onnx")
    assert exported.passed and exported.report["unused_layers"] == ["bert.pooler.dense", "spare"]
    names = {entry["name"] for entry in exported.report["layers"]}
    assert "bert.encoder.layer.0.output.dense" in names and not names & {"bert.pooler.dense", "spare"}
