"""`export --format hf` (#26 item 5) and generation after compression (#26 item 3), on tiny random-initialised
transformers decoders built here (tests.lm_workloads: Llama with GQA, tied and untied; Qwen2; GPT-2 with its fused
Conv1D c_attn). Each is compressed, checkpointed, exported as a Hugging Face directory, loaded back with
`AutoModelForCausalLM.from_pretrained` and decoded greedily; nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.export import export_checkpoint, export_model
from orchestrator.policy import Policy
from techniques.packed.finalize import finalize
from techniques.packed.layers import PackedLinear
from tests import lm_workloads
from tests.test_cli import run_cli

PROMPT = torch.tensor([[5, 17, 42, 8, 63], [90, 3, 3, 71, 26]])
NEW_TOKENS = 10
HEADS_8BIT = {"re:.*(lm_head|embed_tokens|wte|wpe)$": 8}


def policy(*steps: dict) -> Policy:
    return Policy.from_json({"_type": "policy", "_version": 1, "seed": 0, "steps": list(steps)})


def quantization(bits: int, group_size: int | None = None) -> dict:
    data = {"bits": {"_default": bits, **HEADS_8BIT}, "group_size": group_size}
    return {"_type": "quantization", "_version": 1, "_data": data}


W4_G16 = policy(quantization(4, 16))
W8 = policy(quantization(8))


def compressed(workload, chosen: Policy) -> nn.Module:
    """The policy's techniques and finalize, as `executor.apply` runs them (without its measurements)."""
    teacher = workload.load_baseline()
    ctx = executor.make_context(workload, teacher, chosen.seed, torch.device("cpu"), None)
    model = teacher
    for step in chosen.steps:
        model = techniques.apply_spec(model, step, ctx)
    return finalize(model).eval()


def checkpoint(workload, model: nn.Module, chosen: Policy, path) -> str:
    store.save(model, chosen, {"validation": workload.evaluate(model)}, workload, str(path))
    return str(path)


def greedy(model: nn.Module, *, use_cache: bool = True) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)  # fmt: skip
    return out[:, PROMPT.shape[1] :].tolist()


def loaded(directory) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


CASES = [("llama", W4_G16), ("llama_tied", W8), ("qwen2", W4_G16), ("gpt2", W4_G16)]


@pytest.mark.parametrize(("name", "chosen"), CASES, ids=[name for name, _ in CASES])
def test_a_compressed_checkpoint_exports_a_directory_transformers_generates_the_same_tokens_from(
    name, chosen, tmp_path
):
    workload = getattr(lm_workloads, name)()
    model = compressed(workload, chosen)
    original = greedy(workload.load_baseline())
    assert len({token for row in original for token in row}) > 3  # the random model's decodes are not constant
    source = checkpoint(workload, model, chosen, tmp_path / "ckpt")
    result = export_checkpoint(source, out=tmp_path / "hf", format="hf", workload=workload)
    assert result.passed and result.report["check"]["generation"]["same"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # fmt: skip
    assert json.loads((tmp_path / "hf.json").read_text()) == json.loads(json.dumps(result.report))

    written, reference = loaded(tmp_path / "hf"), store.load(source, workload).model
    assert type(written) is type(workload.load_baseline())
    assert greedy(written) == greedy(reference) == greedy(written, use_cache=False)
    with torch.no_grad():
        torch.testing.assert_close(written(PROMPT).logits, reference(PROMPT).logits, rtol=0, atol=1e-4)
    head, table = written.get_output_embeddings().weight, written.get_input_embeddings().weight
    assert written.config.tie_word_embeddings == (head is table)  # the config says what the weights are
    packed = [n for n, m in reference.named_modules() if isinstance(m, PackedLinear)]
    assert {e["name"] for e in result.report["dequantized"]} >= set(packed) and result.report["notes"]


def test_tied_embeddings_are_untied_when_the_compressed_head_differs_from_the_table(tmp_path):
    workload = lm_workloads.llama_tied()
    bits = {"_default": None, "lm_head": 8, "model.embed_tokens": 4}  # one tied tensor, two bit-widths
    chosen = policy({"_type": "quantization", "_version": 1, "_data": {"bits": bits, "group_size": 16}})
    model = compressed(workload, chosen)
    result = export_model(model, workload, out=tmp_path / "hf", format="hf")
    assert result.passed and result.report["config_changes"]["tie_word_embeddings"] == [True, False]
    written = loaded(tmp_path / "hf")
    assert not written.config.tie_word_embeddings
    assert not torch.equal(written.lm_head.weight, written.model.embed_tokens.weight)
    assert greedy(written) == greedy(model)


def _keep_rows(layer: nn.Linear, rows: slice) -> nn.Linear:
    new = nn.Linear(layer.in_features, len(range(*rows.indices(layer.out_features))), bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[rows])
    return new


def _keep_columns(layer: nn.Linear, columns: slice) -> nn.Linear:
    new = nn.Linear(len(range(*columns.indices(layer.in_features))), layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, columns])
    return new


def prune_first_kv_group(layer: nn.Module) -> None:
    """Keep KV head 0 and its two query heads (head_dim 8) of a tiny Llama/Qwen2 layer, as GQA pruning would."""
    attn = layer.self_attn
    attn.q_proj, attn.o_proj = _keep_rows(attn.q_proj, slice(0, 16)), _keep_columns(attn.o_proj, slice(0, 16))
    attn.k_proj, attn.v_proj = _keep_rows(attn.k_proj, slice(0, 8)), _keep_rows(attn.v_proj, slice(0, 8))


def narrow_ffn(layer: nn.Module, width: int) -> None:
    mlp = layer.mlp
    mlp.gate_proj, mlp.up_proj = _keep_rows(mlp.gate_proj, slice(0, width)), _keep_rows(mlp.up_proj, slice(0, width))
    mlp.down_proj = _keep_columns(mlp.down_proj, slice(0, width))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_pruned_heads_kv_groups_ffn_and_depth_are_written_into_the_config(name, tmp_path):
    workload = getattr(lm_workloads, name)()
    model = workload.load_baseline()
    for layer in model.model.layers:
        prune_first_kv_group(layer)
        narrow_ffn(layer, 40)
    model.model.layers = nn.ModuleList([model.model.layers[0]])  # depth pruning: the last block dropped
    result = export_model(model, workload, out=tmp_path / "hf", format="hf")
    assert result.report["config_changes"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1],
                                               "intermediate_size": [64, 40], "num_hidden_layers": [2, 1]}  # fmt: skip
    written = loaded(tmp_path / "hf")
    config = written.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert written.model.layers[0].self_attn.q_proj.out_features == 16 and len(written.model.layers) == 1
    assert greedy(written) == greedy(model) == greedy(written, use_cache=False)
    assert result.passed


def test_low_rank_factors_are_multiplied_out_into_the_layer_transformers_expects(tmp_path):
    workload = lm_workloads.llama()
    lowrank = {"_type": "lowrank", "_version": 1, "_data": {"rank": {"_default": None, "re:.*mlp\\.up_proj$": 8}}}
    model = compressed(workload, policy(lowrank, quantization(8)))
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Sequential)
    result = export_model(model, workload, out=tmp_path / "hf", format="hf")
    factored = [e["name"] for e in result.report["dequantized"] if e["type"] == "low-rank factors"]
    assert result.passed and factored == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    written = loaded(tmp_path / "hf")
    assert written.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert greedy(written) == greedy(model)


def _nonuniform_checkpoint(tmp_path) -> str:
    workload = lm_workloads.llama()
    model = workload.load_baseline()
    narrow_ffn(model.model.layers[1], 32)  # one layer's gated FFN pruned, the other not
    return checkpoint(workload, model, policy(), tmp_path / "ckpt")


@pytest.mark.slow
def test_the_cli_writes_the_directory_and_refuses_an_existing_out_with_exit_2(tmp_path):
    workload = lm_workloads.llama()
    source = checkpoint(workload, compressed(workload, W4_G16), W4_G16, tmp_path / "ckpt")
    args = ["export", source, "--format", "hf", "--workload", "tests.lm_workloads:llama"]
    done = run_cli(*args, "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert "greedy 8 tokens from 2 prompts the same: pass" in done.stdout and "dequantized" in done.stdout
    assert loaded(tmp_path / "hf").config.num_key_value_heads == 2

    again = run_cli(*args, "--out", str(tmp_path / "hf"))  # --out exists
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def refused(capsys, *args: str) -> str:
    """The one `error:` line `python -m orchestrator ARGS` prints when it exits with 2 (run in this process)."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_non_uniform_decoder_layers_are_refused_naming_the_first_that_differs(tmp_path, capsys):
    uneven = _nonuniform_checkpoint(tmp_path)
    err = refused(capsys, "export", uneven, "--format", "hf", "--workload", "tests.lm_workloads:llama",
                  "--out", str(tmp_path / "hf"))  # fmt: skip
    assert "decoder layer 1 has intermediate_size=32 where layer 0 has 64" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.json").exists()


def test_a_model_transformers_cannot_load_as_a_causal_lm_is_one_line(tmp_path, capsys):
    from tests.model_workloads import dict_workload

    workload = dict_workload()  # a plain nn.Module taking a dict, not a transformers model
    source = checkpoint(workload, workload.load_baseline(), policy(), tmp_path / "ckpt")
    err = refused(capsys, "export", source, "--format", "hf", "--workload", "tests.model_workloads:dict_workload",
                  "--out", str(tmp_path / "hf"))  # fmt: skip
    assert "--format hf needs a transformers model" in err and "--format onnx" in err
    with pytest.raises(UserError, match="causal language models"):
        export_model(_bert(), workload, out=tmp_path / "bert", format="hf")


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))  # fmt: skip


def test_activation_quantisation_is_refused_rather_than_written_as_another_model(tmp_path):
    workload = lm_workloads.llama()
    chosen = policy({"_type": "quantization", "_version": 1, "_data": {"bits": {"_default": "w8a8-dynamic"}}})
    with pytest.raises(UserError, match=r"quantise activations .*W8A8.*--format onnx"):
        export_model(compressed(workload, chosen), workload, out=tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


# Generation keeps working (#26 item 3).

RELOAD = """
import hashlib, json, sys, torch
from orchestrator.artifacts import store
from orchestrator.cli import main
from tests import lm_workloads
from tests.test_export_hf import PROMPT, greedy
model = store.load(sys.argv[1], lm_workloads.llama()).model.eval()
with torch.no_grad():
    logits = model(PROMPT).logits
print(json.dumps({"cached": greedy(model), "uncached": greedy(model, use_cache=False),
                  "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def test_greedy_decoding_with_the_kv_cache_equals_decoding_without_it_before_and_after_a_reload(tmp_path):
    import hashlib

    workload = lm_workloads.llama()
    model = compressed(workload, W4_G16)
    cached = greedy(model)
    assert cached == greedy(model, use_cache=False)
    assert cached != greedy(workload.load_baseline())  # 4 bits changed the model enough to change its tokens
    source = checkpoint(workload, model, W4_G16, tmp_path / "ckpt")
    fresh = subprocess.run([sys.executable, "-c", RELOAD, source], capture_output=True, text=True, check=True)
    reloaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        logits = hashlib.sha256(model(PROMPT).logits.numpy().tobytes()).hexdigest()
    assert reloaded == {"cached": cached, "uncached": cached, "logits": logits}  # bitwise in a fresh process


@pytest.mark.slow
def test_an_uncompressed_policy_generates_exactly_the_original_tokens():
    workload = lm_workloads.qwen2()
    result = executor.apply(policy(), workload)
    original = workload.load_baseline()
    assert greedy(result.model) == greedy(original) == greedy(result.model, use_cache=False)


# compressed-tensors' pack-quantized format (optional: transformers loads it only with that package installed).


def test_compressed_tensors_keeps_low_bit_linear_weights_packed_and_loads_back_the_same(tmp_path):
    pytest.importorskip("compressed_tensors")
    workload = lm_workloads.llama()
    model = compressed(workload, W4_G16)
    dense = export_model(model, workload, out=tmp_path / "dense", format="hf")
    packed = export_model(model, workload, out=tmp_path / "packed", format="hf", compressed_tensors=True)
    assert packed.passed and packed.bytes < dense.bytes / 2
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    linears = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert {e["name"] for e in packed.report["packed"]} == linears  # every 4- and 8-bit Linear, lm_head included
    assert [e["name"] for e in packed.report["dequantized"]] == ["model.embed_tokens"]
    assert greedy(loaded(tmp_path / "packed")) == greedy(model)
    with torch.no_grad():
        assert torch.equal(loaded(tmp_path / "packed")(PROMPT).logits, model(PROMPT).logits)


def test_compressed_tensors_without_the_package_or_off_hf_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    workload = lm_workloads.llama()
    with pytest.raises(UserError, match="use --format hf"):
        export_model(workload.load_baseline(), workload, out=tmp_path / "m.onnx", compressed_tensors=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else
                        real(name, *a))  # fmt: skip
    with pytest.raises(UserError, match="pip install compressed-tensors"):
        export_model(workload.load_baseline(), workload, out=tmp_path / "hf", format="hf", compressed_tensors=True)
    assert not (tmp_path / "hf").exists()
