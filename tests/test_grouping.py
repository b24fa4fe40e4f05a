"""`auto` grouping: small models one parameter per layer; larger ones by layer role and depth band."""

from __future__ import annotations

import re
import warnings

import optuna
import pytest
from torch import nn

import techniques
from orchestrator.policy import validate_for_model
from orchestrator.search.grouping import AUTO_LAYER_LIMIT, auto_groups, depth_of, group_layers, role_of
from orchestrator.search.space import build_space
from orchestrator.search.space_options import SpaceOptions
from orchestrator.workloads.digits import DigitsCNN
from tests.tiny_models import TinyCNN, TinyResNet, tiny_bert

VALID_NAME = re.compile(r"[A-Za-z0-9_.]+")
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
BANDS = ("early", "middle", "late")


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(num_hidden_layers=12, hidden_size=32)


def names_of(model: nn.Module, *types: type[nn.Module]) -> list[str]:
    return [name for name, _ in techniques.layers_of(model, types)]


def test_roles_of_a_bert_encoder(bert):
    layer = "bert.encoder.layer.5"
    expected = {
        "bert.embeddings.word_embeddings": "embeddings",
        f"{layer}.attention.self": "attention",
        f"{layer}.attention": "attention",
        f"{layer}.attention.self.query": "query",
        f"{layer}.attention.self.key": "key",
        f"{layer}.attention.self.value": "value",
        f"{layer}.attention.output.dense": "attn_out",
        f"{layer}.intermediate.dense": "ffn_in",
        f"{layer}.output.dense": "ffn_out",
        "bert.pooler.dense": "head",
        "classifier": "head",
    }
    assert {name: role_of(bert, name) for name in expected} == expected


def test_depth_bands_split_twelve_blocks_into_thirds(bert):
    bands = [depth_of(bert, f"bert.encoder.layer.{i}.output.dense").label for i in range(12)]
    assert bands == ["early"] * 4 + ["middle"] * 4 + ["late"] * 4
    assert depth_of(bert, "classifier") is None and depth_of(bert, "bert.pooler.dense") is None


@pytest.mark.parametrize("with_embeddings", [True, False])
def test_a_twelve_block_bert_is_grouped_by_role_and_depth(bert, with_embeddings):
    types = (nn.Linear, nn.Embedding) if with_embeddings else (nn.Linear,)
    names = names_of(bert, *types)
    groups = auto_groups(bert, names)
    expected = {f"{role}.{band}" for band in BANDS for role in ROLES} | {"head"}
    assert set(groups) == expected | ({"embeddings"} if with_embeddings else set())
    assert len(groups) <= 40 and sorted(n for layers in groups.values() for n in layers) == sorted(names)
    assert groups["query.early"] == tuple(f"bert.encoder.layer.{i}.attention.self.query" for i in range(4))
    assert groups["ffn_out.late"] == tuple(f"bert.encoder.layer.{i}.output.dense" for i in range(8, 12))
    assert groups["head"] == ("bert.pooler.dense", "classifier")
    if with_embeddings:
        assert len(groups["embeddings"]) == 3
    assert all(VALID_NAME.fullmatch(group) for group in groups)


def test_the_quantization_space_of_a_twelve_block_bert_stays_small_and_describes_its_groups(bert):
    space = build_space(bert, SpaceOptions(families=("quantization",)))
    described = space.describe()
    groups = described["groups"]["quantization"]
    assert 19 <= len(groups) <= 40 and "query.middle" in groups and "head" in groups
    assert groups["attn_out.middle"] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(4, 8)]
    own = [f"quantization.{setting}" for setting in described["ranges"].get("quantization", {})]  # global settings
    assert described["dimensions"] == 1 + len(groups) + len(own)
    per_layer = [name for name in space.parameter_names()[1:] if name not in own]
    assert {name.partition(".")[2] for name in per_layer} == set(groups) and len(per_layer) == len(groups)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space.define(trial)
    policy = space.policy(trial.params)
    validate_for_model(policy, bert)
    if policy.steps:  # one value per group, given to every layer in it
        bits = policy.steps[0].bits.as_dict()
        late_queries = {bits.get(f"bert.encoder.layer.{i}.attention.self.query") for i in range(8, 12)}
        assert len(late_queries) == 1


def test_every_technique_of_a_twelve_block_bert_has_a_sampler_sized_space(bert):
    space = build_space(bert)
    for technique, groups in space.groups.items():
        assert len(groups) <= 40, technique
        assert all(VALID_NAME.fullmatch(group) for group in groups)


def test_attention_modules_are_grouped_too():
    deep = tiny_bert(num_hidden_layers=24, hidden_size=32)
    attention = [f"bert.encoder.layer.{i}.attention.self" for i in range(24)]
    groups = auto_groups(deep, attention)
    assert list(groups) == ["attention.early", "attention.middle", "attention.late"]
    assert all(len(layers) == 8 for layers in groups.values())
    assert auto_groups(deep, attention[:12]) == {name: (name,) for name in attention[:12]}  # small: per layer


def test_resnet18_is_grouped_by_stage_and_role():
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    names = names_of(model, nn.Conv2d, nn.Linear)
    groups = auto_groups(model, names)
    assert len(names) == 21 and len(groups) == 9
    assert groups["conv1"] == ("conv1",)  # the stem, outside the stages, keeps its own group
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert groups[f"conv.{stage}"] == tuple(f"{stage}.{b}.conv{c}" for b in (0, 1) for c in (1, 2))
    for stage in ("layer2", "layer3", "layer4"):
        assert groups[f"downsample.{stage}"] == (f"{stage}.0.downsample.0",)
    assert groups["head"] == ("fc",) and "downsample.layer1" not in groups


def test_an_encoder_decoder_keeps_its_stacks_apart():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor advice from nn.Transformer
        model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=32)
    groups = auto_groups(model, names_of(model, nn.Linear))
    assert set(groups) == {f"{stack}.{role}.{band}" for stack in ("encoder", "decoder") for role in (
        "ffn_in", "ffn_out") for band in BANDS}  # fmt: skip
    assert groups["decoder.ffn_in.late"] == ("decoder.layers.4.linear1", "decoder.layers.5.linear1")
    attention = auto_groups(model, names_of(model, nn.MultiheadAttention))
    assert len(attention["decoder.attention.early"]) == 4  # self- and cross-attention of two blocks


def test_a_long_sequential_is_banded_and_an_unindexed_cnn_keeps_its_block_keys():
    sequential = nn.Sequential(*(nn.Linear(4, 4) for _ in range(15)))
    groups = auto_groups(sequential, [str(i) for i in range(15)])
    assert {g: len(v) for g, v in groups.items()} == {"linear.early": 5, "linear.middle": 5, "linear.late": 5}
    flat = nn.Module()
    for i in range(AUTO_LAYER_LIMIT + 3):
        flat.add_module(f"conv{i}", nn.Conv2d(2, 2, 1))
    names = [f"conv{i}" for i in range(AUTO_LAYER_LIMIT + 3)]
    assert auto_groups(flat, names) == {name: (name,) for name in names}


@pytest.mark.parametrize("model_cls", [TinyCNN, TinyResNet, DigitsCNN])
def test_small_models_keep_one_parameter_per_layer(model_cls):
    model = model_cls()
    names = names_of(model, nn.Conv2d, nn.Linear)
    assert len(names) <= AUTO_LAYER_LIMIT
    assert group_layers(model, names) == {name: (name,) for name in names}
    space = build_space(model)
    for technique, groups in space.groups.items():
        assert all(groups[name] == (name,) for name in groups), technique


def test_the_other_groupings_are_unchanged(bert):
    names = names_of(bert, nn.Linear)
    assert list(group_layers(bert, names, "block")) == ["bert", "classifier"]
    assert group_layers(bert, names, "type") == {"Linear": tuple(names)}
    assert group_layers(bert, names, "layer") == {name: (name,) for name in names}
    by_regex = group_layers(bert, names, "auto", (("attn", r"re:.*\.attention\..*"), ("rest", "re:.*")))
    assert len(by_regex["attn"]) == 48 and len(by_regex["rest"]) == len(names) - 48
