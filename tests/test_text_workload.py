"""The built-in `text` workload: corpus, splits, character tokenizer, BERT model and student."""

from __future__ import annotations

import pytest
import torch

from orchestrator.workloads import BUILTIN, resolve_workload
from orchestrator.workloads import text as T
from techniques.tools.inputs import call_model, main_output


@pytest.fixture(scope="module")
def texts() -> dict[str, tuple[list[str], torch.Tensor]]:
    return T.split_corpus(T.load_corpus(), seed=0)


def tiny_bert(vocab_size: int = 20, **sizes):
    torch.manual_seed(0)
    sizes = {"hidden": 32, "heads": 2, "layers": 1, "intermediate": 64, "max_length": 16} | sizes
    return T.build_bert(vocab_size, **sizes).eval()


def test_corpus_has_the_documented_languages_each_with_enough_distinct_lines():
    corpus = T.load_corpus()
    assert tuple(corpus) == T.LANGUAGES
    owner: dict[str, str] = {}
    for language, lines in corpus.items():
        assert len(lines) >= T.MIN_LINES
        assert list(lines) == sorted(set(lines)), "distinct and sorted"
        assert all(line and line == " ".join(line.split()) for line in lines)
        for line in lines:
            assert owner.setdefault(line, language) == language, f"{line!r} is in two languages"


def test_clean_corpus_drops_lines_shared_between_languages_and_repeats():
    cleaned = T.clean_corpus({"a": ["hi", "x", "x", "y"], "b": ["hi", "z"], "c": []})
    assert cleaned == {"a": ["x", "y"], "b": ["z"], "c": []}


def test_splits_are_deterministic_disjoint_stratified_and_large_enough(texts):
    again = T.split_corpus(T.load_corpus(), seed=0)
    for name in ("train", "validation", "test"):
        assert texts[name][0] == again[name][0]
        assert torch.equal(texts[name][1], again[name][1])
    sets = {name: set(lines) for name, (lines, _) in texts.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == sum(len(lines) for lines in T.load_corpus().values())
    for name in ("validation", "test"):
        assert len(texts[name][0]) >= 300
        assert set(texts[name][1].tolist()) == set(range(len(T.LANGUAGES))), "every language in every split"
    english = T.LANGUAGES.index("english")
    assert all(line in T.load_corpus()["english"] for line, y in zip(*texts["test"], strict=True) if y == english)
    other = T.split_corpus(T.load_corpus(), seed=1)
    assert other["test"][0] != texts["test"][0]


def test_vocabulary_keeps_characters_seen_twice_after_the_special_tokens():
    vocab = T.CharVocab.build(["abca", "bd"])
    assert vocab.chars == ("a", "b")
    assert len(vocab) == 5
    assert T.SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]")
    assert T.CharVocab.build(["bd", "abca"]) == vocab, "independent of the order of the texts"


def test_encode_pads_masks_truncates_and_round_trips():
    vocab = T.CharVocab.build(["hello world", "hello there"])
    batch = vocab.encode(["hello", "", "hello hello hello"], max_length=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 8)
    assert (ids[:, 0] == 2).all(), "[CLS] first"
    assert mask.tolist() == [[1] * 6 + [0] * 2, [1] + [0] * 7, [1] * 8]
    assert (ids[mask == 0] == 0).all(), "[PAD] = 0 wherever the mask is 0"
    assert vocab.decode(ids[0]) == "hello"
    assert vocab.decode(ids[1]) == ""
    assert vocab.decode(ids[2]) == "hello h", "truncated to max_length - 1 characters"
    unknown = vocab.encode(["hez"], max_length=8)["input_ids"][0]
    assert unknown[3].item() == 1 and vocab.decode(unknown) == "he[UNK]"


def test_workload_splits_hold_the_encoded_lines(texts):
    splits, vocab = T.load_splits(seed=0)
    length = T.RECIPE["max_length"]
    for name in ("train", "validation", "test"):
        split = splits[name]
        assert set(split.inputs) == {"input_ids", "attention_mask"}
        assert split.inputs["input_ids"].shape == (len(texts[name][0]), length)
        assert torch.equal(split.targets, texts[name][1])
        assert vocab.decode(split.inputs["input_ids"][0]).replace("[UNK]", "?") == "".join(
            c if c in vocab.index else "?" for c in texts[name][0][0][: length - 1]
        )
    assert len(splits["calibration"]) == T.CALIBRATION_SIZE
    assert torch.equal(splits["calibration"].inputs["input_ids"], splits["train"].inputs["input_ids"][:256])
    assert len(vocab) > 1000, "the CJK languages bring many characters"


def test_model_is_a_transformers_bert_called_with_the_batch_as_keywords():
    model = tiny_bert()
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "sdpa"
    assert model.config.hidden_act == "gelu"
    ids = torch.tensor([[2, 5, 6, 7, 0, 0], [2, 8, 0, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    logits = main_output(call_model(model, batch))
    assert logits.shape == (2, len(T.LANGUAGES))
    # padding is masked: extra [PAD] columns do not change the logits
    longer = {key: torch.nn.functional.pad(value, (0, 4)) for key, value in batch.items()}
    assert torch.allclose(main_output(model(**longer)), logits, atol=1e-5)


def test_build_bert_rejects_unknown_sizes():
    with pytest.raises(TypeError, match="unknown BERT size"):
        T.build_bert(10, hiden=3)


def test_students_are_smaller_with_the_same_vocabulary_and_head_size():
    teacher = T.build_bert(500)
    for width in (0.25, 0.5, 0.75):
        student = T.student_bert(500, width)
        assert T.parameter_counts(student)["total"] < T.parameter_counts(teacher)["total"]
        assert student.config.vocab_size == 500
        assert student.config.num_hidden_layers == teacher.config.num_hidden_layers
        assert (
            student.config.hidden_size // student.config.num_attention_heads == T.RECIPE["hidden"] // T.RECIPE["heads"]
        )
        ids = torch.tensor([[2, 3, 4, 0]])
        assert student(input_ids=ids, attention_mask=(ids != 0).long()).logits.shape == (1, len(T.LANGUAGES))
    with pytest.raises(ValueError, match="width"):
        T.student_bert(500, 0)


def test_parameter_counts_split_embeddings_from_the_encoder():
    model = tiny_bert(vocab_size=100)
    counts = T.parameter_counts(model)
    word, position = 100 * 32, 16 * 32
    assert counts["embeddings"] == word + position + 32 + 2 * 32  # + one token type + LayerNorm
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_text_is_a_builtin_workload():
    assert "text" in BUILTIN
    workload = resolve_workload("text")
    assert workload.name == "text" and workload.metric_name == "accuracy"
    assert workload.fingerprint.startswith("text-")
    assert set(workload.info["languages"]) == set(T.LANGUAGES)
    assert "chatterbot" in workload.info["description"]
    model = workload.build_model().eval()
    batch, targets = next(workload.batches("validation"))
    assert main_output(call_model(model, batch)).shape == (len(targets), len(T.LANGUAGES))
    student = workload.build_student(0.5)
    assert T.parameter_counts(student)["total"] < workload.info["parameters"]["total"]
    assert student.config.vocab_size == model.config.vocab_size


@pytest.fixture
def one_thread():
    """A model this small trains faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_tiny_text_baseline_trains_end_to_end_deterministically_and_is_cached(monkeypatch, tmp_path, one_thread):
    tiny = {"hidden": 32, "heads": 1, "layers": 1, "intermediate": 64, "max_length": 16}
    tiny |= {"epochs": 1, "lr": 5e-3, "batch_size": 128}
    monkeypatch.setattr(T, "RECIPE", T.RECIPE | tiny)
    trained = []
    for cache in ("first", "second"):
        monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / cache))
        workload = T.make_text()
        trained.append(workload.load_baseline())
        assert list((tmp_path / cache).glob("baselines/text-*.safetensors"))
    assert workload.evaluate(trained[0], "validation") > 3 / len(T.LANGUAGES), "well above chance"
    reloaded = T.make_text().load_baseline()  # from the second cache
    for name, weights in trained[0].state_dict().items():
        assert torch.equal(weights, trained[1].state_dict()[name]), f"{name}: training is not deterministic"
        assert torch.equal(weights, reloaded.state_dict()[name]), f"{name}: the cache changed it"
