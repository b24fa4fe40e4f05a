"""Models as people have them (a Hugging Face BERT with two inputs, torchvision's ResNet-18, a dict-input
model): apply → save → reload in a fresh process (bitwise-equal outputs) → evaluate from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import Policy, apply, load_checkpoint, save_checkpoint
from orchestrator.workloads import resolve_workload
from techniques.tools.inputs import call_model
from tests.waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def _policy(*steps: tuple[str, dict]) -> Policy:
    return Policy.from_json(
        {
            "_type": "policy",
            "_version": 1,
            "seed": 0,
            "steps": [{"_type": name, "_version": 1, "_data": data} for name, data in steps],
        }
    )


DISTIL = ("distillation", {"epochs": 1, "lr": 1e-3, "temperature": 2.0, "alpha": 0.9})
CASES = {
    "bert_workload": _policy(
        ("lowrank", {"rank": {"re:.*attention\\.output\\.dense": 0.5}}),
        ("head_pruning", {"head_ratio": {"_default": 0.5}}),
        ("structured_pruning", {"ratio": {"re:.*intermediate\\.dense": 0.25}}),
        ("unstructured_pruning", {"sparsity": {"re:.*output\\.dense": 0.5}}),
        ("quantization", {"bits": {"_default": 4, "classifier": 8}}),
        DISTIL,
    ),
    "resnet18_workload": _policy(
        ("structured_pruning", {"ratio": {"re:layer[1-3]\\.\\d\\.conv1": 0.25}}),
        ("quantization", {"bits": {"_default": 8, "re:layer4.*": 4}}),
        DISTIL,
    ),
    "dict_workload": _policy(("quantization", {"bits": {"_default": 4}}), DISTIL),
}

RELOAD = """
import sys, torch
from safetensors.torch import save_file
from orchestrator import load_checkpoint
from orchestrator.workloads import resolve_workload
from techniques.tools.inputs import call_model
workload = resolve_workload(sys.argv[1])
model = load_checkpoint(sys.argv[2], workload).model.eval()
with torch.inference_mode():
    save_file({"out": workload.output_fn(call_model(model, workload.example_inputs(4))).contiguous()}, sys.argv[3])
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.slow
@pytest.mark.parametrize("factory", sorted(CASES))
def test_apply_save_reload_in_a_fresh_process_then_evaluate(factory: str, tmp_path: Path) -> None:
    spec = f"tests.model_workloads:{factory}"
    workload = resolve_workload(spec)
    result = apply(CASES[factory], workload)
    assert result.metrics["compression_ratio"] > 1.5
    if factory == "bert_workload":  # half the heads gone in every block, the embedding tables packed
        heads = [m.num_attention_heads for m in result.model.modules() if hasattr(m, "num_attention_heads")]
        assert heads == [2, 2]
        packed = [type(m).__name__ for m in result.model.bert.embeddings.children() if "Embedding" in type(m).__name__]
        assert packed and all(name == "PackedEmbedding" for name in packed)
    saved = save_checkpoint(result.model, result.policy, result.metrics, workload, str(tmp_path / "ckpt"))
    with torch.inference_mode():
        expected = workload.output_fn(call_model(result.model.eval(), workload.example_inputs(4)))

    reloaded = _run("-c", RELOAD, spec, saved, str(tmp_path / "out.safetensors"))
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)

    evaluated = _run("-m", "orchestrator", "evaluate", saved, "--workload", spec, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["validation"] == pytest.approx(result.metrics["validation"], abs=1e-9)
    assert metrics["size_bytes"] == result.metrics["size_bytes"]


def test_the_same_model_reloads_in_process_with_its_dict_inputs(tmp_path: Path) -> None:
    workload = resolve_workload("tests.model_workloads:dict_workload")
    result = apply(_policy(("quantization", {"bits": {"_default": 8}}), DISTIL), workload)
    saved = save_checkpoint(result.model, result.policy, result.metrics, workload, str(tmp_path / "ckpt"))
    inputs = workload.example_inputs(3)
    assert set(inputs) == {"image", "extra"}
    with torch.inference_mode():
        again = load_checkpoint(saved, workload).model.eval()
        assert torch.equal(call_model(again, inputs)["logits"], call_model(result.model.eval(), inputs)["logits"])
