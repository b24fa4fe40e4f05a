"""Decoder pruning on tiny random-init transformers causal LMs (Llama and Qwen2 with grouped-query attention, GPT-2
with its fused Conv1D attention): whole key/value groups, gated-FFN channels and decoder blocks go; shapes, the kept
weights, the config, greedy generation with and without the KV cache, and checkpoints reloaded in a fresh process."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import techniques
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, CheckpointError, read_artifact, write_artifact
from orchestrator.artifacts.structure import StructureError, describe, rebuild
from orchestrator.search.space import build_space
from orchestrator.testing import TechniqueContract
from techniques.decoder_depth import DepthPruningSpec
from techniques.decoder_ffn import FfnPruningSpec
from techniques.decoder_heads import DecoderHeadPruningSpec
from techniques.decoder_layout import SOURCE_LAYERS, decoder_layout
from techniques.decoder_units import MAX_RATIO, kept_counts
from tests.tiny_models import tiny_bert

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN = 100, 32, 4, 2, 64
HEAD_DIM, REP = HIDDEN // HEADS, HEADS // KV_HEADS
DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS)
DECODER.update(num_key_value_heads=KV_HEADS, max_position_embeddings=64, attention_dropout=0.0)
QWEN_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
ARCHS = ("llama", "qwen2", "gpt2")


def build(arch: str, seed: int = 0, layers: int = 4) -> nn.Module:
    """A tiny seeded causal LM of `arch`, in eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**DECODER, num_hidden_layers=layers)).eval()
    if arch == "qwen2":
        types = QWEN_TYPES[:layers]
        config = Qwen2Config(
            **DECODER, num_hidden_layers=layers, layer_types=types, use_sliding_window=True, sliding_window=4
        )
        return Qwen2ForCausalLM(config).eval()
    dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_layer=3, n_positions=64, **dropout)
    return GPT2LMHeadModel(config).eval()


def tokens(n: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def context(seed: int = 0) -> techniques.Context:
    ids = tokens(8, 16, seed)
    return techniques.Context(example_inputs=ids[:2], calibration=lambda: (ids[i : i + 4] for i in range(0, 8, 4)))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def greedy(model: nn.Module, ids: torch.Tensor, cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=cache, pad_token_id=0)


def attention(model: nn.Module, block: int) -> nn.Module:
    return model.transformer.h[block].attn if hasattr(model, "transformer") else model.model.layers[block].self_attn


def mlp(model: nn.Module, block: int) -> nn.Module:
    return model.transformer.h[block].mlp if hasattr(model, "transformer") else model.model.layers[block].mlp


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def kept(ctx: techniques.Context, technique: str) -> dict[str, list[int]]:
    return {n["layer"]: n["kept"] for n in ctx.notes if n["technique"] == technique and "kept" in n}


# --------------------------------------------------------------------------- key/value groups


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_key_value_groups_go_and_the_layout_stays_valid(arch: str) -> None:
    model = techniques.apply_spec(build(arch), DecoderHeadPruningSpec(group_ratio=0.5), context())
    for block in range(len(blocks(model))):
        module = attention(model, block)
        if arch == "gpt2":  # one key/value head per query head: half the heads go
            assert (module.num_heads, module.split_size) == (HEADS // 2, HEADS // 2 * HEAD_DIM)
            assert (module.c_attn.nf, module.c_attn.nx, module.c_proj.nx) == (3 * HEADS // 2 * HEAD_DIM, HIDDEN, 16)
            continue
        q_heads = module.q_proj.out_features // HEAD_DIM
        kv_heads = module.k_proj.out_features // HEAD_DIM
        assert (q_heads, kv_heads) == (HEADS // 2, KV_HEADS // 2)
        assert q_heads == kv_heads * module.num_key_value_groups and module.num_key_value_groups == REP
        assert module.v_proj.out_features == module.k_proj.out_features and module.o_proj.in_features == q_heads * 8
        assert module.o_proj.out_features == HIDDEN
    config = model.config
    if arch == "gpt2":  # GPT-2 derives the head size from n_embd / n_head: the config cannot say it
        assert config.n_head == HEADS
        with pytest.raises(ValueError, match="n_embd / n_head"):
            decoder_layout(model).hf_fields(config)
    else:
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, HEAD_DIM)
        assert decoder_layout(model).hf_fields(config)["num_key_value_heads"] == 1


def _rows(groups: list[int], per: int) -> list[int]:
    return [g * per + i for g in groups for i in range(per)]


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_the_kept_parts_are_the_original_weights(arch: str) -> None:
    base, ctx = build(arch), context()
    model = techniques.apply_spec(build(arch), DecoderHeadPruningSpec(group_ratio=0.5), ctx)
    model = techniques.apply_spec(model, FfnPruningSpec(ffn_ratio=0.25), ctx)
    heads, channels = kept(ctx, "decoder_head_pruning"), kept(ctx, "ffn_pruning")
    for block in range(len(blocks(model))):
        old, new = attention(base, block), attention(model, block)
        groups = heads[f"{blocks_name(arch)}.{block}.{'attn' if arch == 'gpt2' else 'self_attn'}"]
        q_heads = [g * (1 if arch == "gpt2" else REP) + r for g in groups for r in range(1 if arch == "gpt2" else REP)]
        q = _rows(q_heads, HEAD_DIM)
        if arch == "gpt2":
            cols = [part * HIDDEN + c for part in range(3) for c in _rows(groups, HEAD_DIM)]
            assert torch.equal(new.c_attn.weight, old.c_attn.weight[:, cols])
            assert torch.equal(new.c_attn.bias, old.c_attn.bias[cols])
            assert torch.equal(new.c_proj.weight, old.c_proj.weight[q])
        else:
            assert torch.equal(new.q_proj.weight, old.q_proj.weight[q])
            for name in ("k_proj", "v_proj"):
                assert torch.equal(getattr(new, name).weight, getattr(old, name).weight[_rows(groups, HEAD_DIM)])
            assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, q])
        old_mlp, new_mlp = mlp(base, block), mlp(model, block)
        keep = channels[f"{blocks_name(arch)}.{block}.mlp"]
        if arch == "gpt2":
            assert torch.equal(new_mlp.c_fc.weight, old_mlp.c_fc.weight[:, keep])
            assert torch.equal(new_mlp.c_proj.weight, old_mlp.c_proj.weight[keep])
        else:
            for name in ("gate_proj", "up_proj"):
                assert torch.equal(getattr(new_mlp, name).weight, getattr(old_mlp, name).weight[keep])
            assert torch.equal(new_mlp.down_proj.weight, old_mlp.down_proj.weight[:, keep])
            assert new_mlp.intermediate_size == len(keep) == FFN * 3 // 4


def blocks_name(arch: str) -> str:
    return "transformer.h" if arch == "gpt2" else "model.layers"


SPECS = {
    "heads": lambda ratio: DecoderHeadPruningSpec(group_ratio=ratio),
    "ffn": lambda ratio: FfnPruningSpec(ffn_ratio=ratio),
    "depth": lambda ratio: DepthPruningSpec(depth_ratio=ratio),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_pruning_nothing_is_the_identity(arch: str, kind: str) -> None:
    ids = tokens(3, 10, seed=5)
    for ratio in (0.0, 0.005):  # floor(0.005 × at most 128 units) removes none
        ctx = context()
        model = techniques.apply_spec(build(arch), SPECS[kind](ratio), ctx)
        assert torch.equal(logits(model, ids), logits(build(arch), ids))
        assert describe(model, build(arch, seed=1)) == []
        assert any("nothing pruned" in n["message"] for n in ctx.notes)


def _silence(model: nn.Module, arch: str) -> None:
    """Zero what key/value group 1 of every attention, the odd FFN channels and block 1 add to the residual stream."""
    with torch.no_grad():
        for block in range(len(blocks(model))):
            out = attention(model, block).c_proj.weight if arch == "gpt2" else attention(model, block).o_proj.weight
            q = _rows(range(REP, 2 * REP) if arch != "gpt2" else [1], HEAD_DIM)
            if arch == "gpt2":
                out[q] = 0
            else:
                out[:, q] = 0
            down = mlp(model, block).c_proj.weight if arch == "gpt2" else mlp(model, block).down_proj.weight
            if arch == "gpt2":
                down[1::2] = 0
            else:
                down[:, 1::2] = 0
        if arch != "gpt2":
            layer = blocks(model)[1]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("arch", ("llama", "qwen2", "gpt2"))
def test_calibrated_importance_removes_what_adds_nothing(arch: str) -> None:
    """Units whose output weights are zero contribute nothing: activation importance must pick exactly those, and
    removing them leaves the logits as they were (Qwen2's biases sit on q/k/v, whose rows go with the group)."""
    ids, ctx = tokens(3, 10, seed=7), context()
    base = build(arch)
    _silence(base, arch)
    model = build(arch)
    _silence(model, arch)
    ratio = 0.25 if arch == "gpt2" else 0.5  # GPT-2: 1 of 4 heads; Llama/Qwen2: 1 of 2 groups
    model = techniques.apply_spec(model, DecoderHeadPruningSpec(group_ratio=ratio, uniform=False), ctx)
    model = techniques.apply_spec(model, FfnPruningSpec(ffn_ratio=0.5), ctx)
    silent = "" if arch == "gpt2" else ".1."  # block 1 adds nothing at all: every unit ties there
    heads = {tuple(k) for name, k in kept(ctx, "decoder_head_pruning").items() if silent not in name or not silent}
    assert heads == ({(0, 2, 3)} if arch == "gpt2" else {(0,)})
    width = 4 * HIDDEN if arch == "gpt2" else FFN
    channels = [k for name, k in kept(ctx, "ffn_pruning").items() if silent not in name or not silent]
    assert len(channels) == len(blocks(model)) - (0 if arch == "gpt2" else 1)
    assert all(k == list(range(0, width, 2)) for k in channels)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-5)
    if arch != "gpt2":  # block 1 is now the identity: Block Influence 0, the first to go
        model = techniques.apply_spec(model, DepthPruningSpec(depth_ratio=0.25), ctx)
        assert getattr(blocks(model), SOURCE_LAYERS) == (0, 2, 3)
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- uniform or per layer


def test_per_layer_shapes_leave_the_config_and_uniform_gives_one_width() -> None:
    ctx = context()
    model = techniques.apply_spec(
        build("llama"), FfnPruningSpec(ffn_ratio={"model.layers.0.mlp": 0.5}, uniform=False), ctx
    )
    assert [mlp(model, b).up_proj.out_features for b in range(4)] == [32, 64, 64, 64]
    layout = decoder_layout(model)
    assert not layout.uniform() and model.config.intermediate_size == FFN
    with pytest.raises(ValueError, match="different feed-forward widths"):
        layout.hf_fields(model.config)
    model = techniques.apply_spec(build("llama"), FfnPruningSpec(ffn_ratio={"model.layers.0.mlp": 0.5}), ctx)
    assert [mlp(model, b).up_proj.out_features for b in range(4)] == [56] * 4  # 256 - 32 channels over 4 layers
    assert (
        model.config.intermediate_size == 56
        and decoder_layout(model).hf_fields(model.config)["intermediate_size"] == 56
    )


@pytest.mark.parametrize(
    ("sizes", "removals", "expected"),
    [
        ({"a": 8, "b": 8}, {"a": 4}, {"a": 6, "b": 6}),
        ({"a": 8, "b": 8, "c": 8}, {"a": 1}, {"a": 8, "b": 8, "c": 8}),  # 23/3 rounds up: nothing removed
        ({"a": 4, "b": 8}, {}, {"a": 4, "b": 4}),  # at most the smallest
    ],
)
def test_uniform_counts_never_remove_more_in_total_than_asked(sizes, removals, expected) -> None:
    assert kept_counts(sizes, removals, uniform=True) == expected
    equal = len(set(sizes.values())) == 1
    if equal:
        assert sum(sizes.values()) - sum(expected.values()) <= sum(removals.values())
    assert kept_counts(sizes, removals, uniform=False) == {n: s - removals.get(n, 0) for n, s in sizes.items()}


# --------------------------------------------------------------------------- depth


def test_block_influence_is_one_minus_the_cosine_of_each_block() -> None:
    ctx = context()
    base = build("llama")
    model = techniques.apply_spec(build("llama"), DepthPruningSpec(depth_ratio=0.25), ctx)
    influence = next(n["influence"] for n in ctx.notes if "influence" in n)
    hidden = [[], [], []]
    for batch in ctx.calibration():
        with torch.no_grad():
            states = base(batch, output_hidden_states=True).hidden_states  # the last one is after the final norm
        for i in range(3):
            hidden[i].append(1 - nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1))
    expected = [torch.cat([h.flatten() for h in hidden[i]]).mean().item() for i in range(3)]
    assert influence[:3] == pytest.approx(expected, abs=1e-6)
    lowest = min(range(4), key=lambda i: influence[i])
    assert getattr(blocks(model), SOURCE_LAYERS) == tuple(i for i in range(4) if i != lowest)


def test_depth_renumbers_the_cache_index_and_keeps_layer_types_in_step() -> None:
    ctx = context()
    model = techniques.apply_spec(build("qwen2"), DepthPruningSpec(depth_ratio=0.5), ctx)
    sources = getattr(blocks(model), SOURCE_LAYERS)
    assert len(sources) == 2 and [layer.self_attn.layer_idx for layer in blocks(model)] == [0, 1]
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == [QWEN_TYPES[i] for i in sources]
    assert [layer.self_attn.sliding_window for layer in blocks(model)] == [
        4 if QWEN_TYPES[i] == "sliding_attention" else None for i in sources
    ]
    ids = tokens(2, 6, seed=2)
    assert torch.equal(greedy(model, ids, cache=True), greedy(model, ids, cache=False))


def test_gpt2_scaled_by_its_original_depth_cannot_be_described_after_depth_pruning() -> None:
    model = build("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True  # read by the attention's init only: build it again
    torch.manual_seed(0)
    model = GPT2LMHeadModel(model.config).eval()
    with torch.no_grad():  # block 0 adds nothing: it goes, and the kept blocks move up
        for layer in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            layer.weight.zero_()
            layer.bias.zero_()
    model = techniques.apply_spec(model, DepthPruningSpec(depth_ratio=0.34), context())
    assert getattr(blocks(model), SOURCE_LAYERS) == (1, 2)
    with pytest.raises(ValueError, match="original position"):
        decoder_layout(model).hf_fields(model.config)
    ids = tokens(2, 5, seed=3)
    assert torch.equal(greedy(model, ids, cache=True), greedy(model, ids, cache=False))


# --------------------------------------------------------------------------- generation and checkpoints


def _pruned(arch: str) -> nn.Module:
    ctx = context()
    model = techniques.apply_spec(build(arch), DecoderHeadPruningSpec(group_ratio={"re:.*\\.[01]\\..*": 0.5}), ctx)
    model = techniques.apply_spec(model, FfnPruningSpec(ffn_ratio=0.25, importance="magnitude", uniform=False), ctx)
    return techniques.apply_spec(model, DepthPruningSpec(depth_ratio=0.34), ctx)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_the_cache_equals_generation_without(arch: str) -> None:
    ids = tokens(2, 5, seed=3)
    model = _pruned(arch)
    assert torch.equal(greedy(model, ids, cache=True), greedy(model, ids, cache=False))
    assert len(blocks(model)) == (2 if arch == "gpt2" else 3)


CHILD = """
import sys, torch
from safetensors.torch import save_file
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, read_artifact
from tests.test_decoder_pruning import ARCHS, build, greedy, tokens
from pathlib import Path
out = {}
for arch in ARCHS:
    d = Path(sys.argv[1]) / arch
    model = read_artifact((d / STRUCTURE).read_bytes(), (d / WEIGHTS).read_bytes(), build(arch, seed=9))
    ids = tokens(2, 5, seed=3)
    out.update({f"{arch}/{k}": v.clone().contiguous() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out[f"{arch}//logits"] = model(ids).logits
    out[f"{arch}//cached"], out[f"{arch}//uncached"] = greedy(model, ids, True), greedy(model, ids, False)
    out[f"{arch}//blocks"] = torch.tensor([model.config.num_hidden_layers])
save_file(out, sys.argv[2])
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: 15-60 s on a busy 2-core machine
def test_a_pruned_decoder_reloads_bitwise_in_a_fresh_process(tmp_path: Path) -> None:
    ids, models = tokens(2, 5, seed=3), {}
    for arch in ARCHS:
        models[arch] = _pruned(arch)
        (tmp_path / arch).mkdir()
        write_artifact(models[arch], build(arch, seed=1), tmp_path / arch)
    result = tmp_path / "reloaded.safetensors"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(result)], cwd=root, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    got = load_file(str(result))
    for arch, model in models.items():
        state = {k: v for k, v in model.state_dict().items()}
        mine = {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(f"{arch}/") and "//" not in k}
        assert mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)
        assert torch.equal(got[f"{arch}//logits"], logits(model, ids))
        assert torch.equal(got[f"{arch}//cached"], got[f"{arch}//uncached"])
        assert torch.equal(got[f"{arch}//cached"], greedy(model, ids, cache=True))
        assert int(got[f"{arch}//blocks"]) == len(blocks(model))
        record = json.loads((tmp_path / arch / STRUCTURE).read_text())["modules"]
        assert record[0]["type"] == "blocks" and record[-1]["type"] == "config"


@functools.cache
def _record_text(arch: str = "qwen2") -> str:
    return json.dumps(describe(_pruned(arch), build(arch)))


HOSTILE = {
    "kept-out-of-range": ("blocks", lambda c: c.update(kept=[0, 9]), "block indices"),
    "kept-unsorted": ("blocks", lambda c: c.update(kept=[2, 0]), "increasing order"),
    "kept-empty": ("blocks", lambda c: c.update(kept=[]), "block indices"),
    "kept-bools": ("blocks", lambda c: c.update(kept=[True, 2]), "block indices"),
    "of-wrong": ("blocks", lambda c: c.update(of=7), "the stack has 4"),
    "blocks-extra-key": ("blocks", lambda c: c.update(drop=[1]), "exactly 'kept' and 'of'"),
    "config-unknown": ("config", lambda c: c.update(vocab_size=10**9), "not one a structure record may set"),
    "config-negative": ("config", lambda c: c.update(num_hidden_layers=-1), "positive integer"),
    "config-layer-type": ("config", lambda c: c.update(layer_types=["python"] * 3), "layer types the base config"),
    "config-layer-count": ("config", lambda c: c.update(layer_types=["full_attention"]), "1 layer types for 3 blocks"),
    "layer-idx": ("attributes", lambda c: c.update(layer_idx=5), "layer_idx 5"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_decoder_records_are_refused(case: str) -> None:
    kind, edit, words = HOSTILE[case]
    record = json.loads(_record_text())
    edit(
        next(e["config"] for e in record if e["type"] == kind and (kind != "attributes" or "layer_idx" in e["config"]))
    )
    with pytest.raises(StructureError, match=words):
        rebuild(build("qwen2"), record)


def test_a_hostile_blocks_entry_in_a_checkpoint_is_one_checkpoint_error(tmp_path: Path) -> None:
    write_artifact(_pruned("llama"), build("llama"), tmp_path)
    doc = json.loads((tmp_path / STRUCTURE).read_text())
    doc["modules"][0]["config"]["kept"] = [-1, 0, 1]
    with pytest.raises(CheckpointError, match="checkpoint does not rebuild: bad structure entry 'model.layers'"):
        read_artifact(json.dumps(doc).encode(), (tmp_path / WEIGHTS).read_bytes(), build("llama"))


# --------------------------------------------------------------------------- settings, registry, search


BAD = {
    DecoderHeadPruningSpec: [{}, {"group_ratio": 1.0}, {"group_ratio": -0.1}, {"group_ratio": True}],
    FfnPruningSpec: [{"ffn_ratio": float("nan")}, {"ffn_ratio": 0.5, "importance": "taylor"}],
    DepthPruningSpec: [{"depth_ratio": "half"}, {"depth_ratio": 0.95}, {"depth_ratio": 0.5, "importance": "bi"}],
}
BAD[FfnPruningSpec] += [{"ffn_ratio": 0.5, "uniform": "yes"}, {"ffn_ratio": {"x": None}}]


def test_bad_settings_are_one_spec_error_line() -> None:
    for spec_type, cases in BAD.items():
        for data in cases:
            with pytest.raises(techniques.SpecError) as error:
                spec_type.from_data(data)
            assert "\n" not in str(error.value)
    no_data = techniques.Context(example_inputs=tokens(1, 4))
    with pytest.raises(techniques.SpecError, match="needs calibration data"):
        techniques.apply_spec(build("llama"), DecoderHeadPruningSpec(group_ratio=0.5), no_data)
    with pytest.raises(techniques.SpecError, match="match no DecoderAttention"):
        techniques.apply_spec(
            build("llama"), DecoderHeadPruningSpec(group_ratio={"model.layers.0.mlp": 0.5}), context()
        )


def test_registered_in_order_and_offered_only_where_a_decoder_is() -> None:
    order = list(techniques.registry())
    assert order.index("decoder_head_pruning") < order.index("ffn_pruning") < order.index("depth_pruning")
    assert order.index("depth_pruning") < order.index("unstructured_pruning")
    space = build_space(build("llama"))
    attention_names = sorted(layer for group in space.groups["decoder_head_pruning"].values() for layer in group)
    assert attention_names == [f"model.layers.{i}.self_attn" for i in range(4)]
    assert sorted(layer for g in space.groups["depth_pruning"].values() for layer in g) == ["model.layers"]
    assert "head_pruning" not in space.groups  # BERT's head pruning leaves grouped-query attention alone
    bert = build_space(tiny_bert())
    assert not {"decoder_head_pruning", "ffn_pruning", "depth_pruning"} & set(bert.groups)


# --------------------------------------------------------------------------- the shared contract


class TinyDecoder(nn.Module):
    """A tiny Llama with grouped-query attention returning its logits (the contract compares output tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = LlamaForCausalLM(LlamaConfig(**DECODER, num_hidden_layers=3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


class DecoderContract(TechniqueContract):
    """The contract on a tiny Llama fed token ids; each decoder technique subclasses it."""

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return TinyDecoder().eval()

    def build_context(self, seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
        return context(seed)


class TestDecoderHeadsContract(DecoderContract):
    bad_spec_data = BAD[DecoderHeadPruningSpec]
    edge_spec_data = [
        {"group_ratio": MAX_RATIO},
        {"group_ratio": 0.0},
        {"group_ratio": {"lm.model.layers.2.self_attn": MAX_RATIO}, "importance": "magnitude", "uniform": False},
    ]

    def make_spec(self) -> techniques.TechniqueSpec:
        return DecoderHeadPruningSpec(group_ratio={"lm.model.layers.0.self_attn": 0.5, "_default": 0.0}, uniform=False)


class TestFfnContract(DecoderContract):
    bad_spec_data = BAD[FfnPruningSpec]
    edge_spec_data = [
        {"ffn_ratio": MAX_RATIO},
        {"ffn_ratio": 0.0},
        {"ffn_ratio": {"re:.*layers.0.mlp": MAX_RATIO}, "importance": "magnitude", "uniform": False},
    ]

    def make_spec(self) -> techniques.TechniqueSpec:
        return FfnPruningSpec(ffn_ratio={"re:.*mlp": 0.5})


class TestDepthContract(DecoderContract):
    bad_spec_data = BAD[DepthPruningSpec]
    edge_spec_data = [{"depth_ratio": MAX_RATIO}, {"depth_ratio": 0.0}]

    def make_spec(self) -> techniques.TechniqueSpec:
        return DepthPruningSpec(depth_ratio={"lm.model.layers": 0.34})
