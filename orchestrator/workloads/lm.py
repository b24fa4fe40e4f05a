"""Built-in `lm` workload: a small Llama-architecture causal language model over the bytes of real dialog lines.

The text is the `text` workload's: the cleaned lines of `chatterbot-corpus` 1.3.3 (18 languages, shipped inside
the wheel, nothing downloaded), split by line with the same seeded, per-language split. The model is
`transformers`' own `LlamaForCausalLM` (RMSNorm, rotary position embeddings, SwiGLU feed-forward, grouped-query
attention with 6 query heads over 2 key/value heads, untied embeddings), trained on first use and cached.

Decisions:
- Tokens are UTF-8 bytes (vocabulary 256, no special tokens; a line ends with "\\n"): no tokenizer file to ship
  or download, every language encodable, and the perplexity is per byte, comparable across runs.
- A split's lines, joined in split order, are one byte stream cut into non-overlapping windows of `WINDOW` + 1
  bytes; a window's first `WINDOW` bytes are the input and its last `WINDOW` the next-byte targets, so every
  byte of the stream after a window's first is predicted exactly once, with at most `WINDOW` - 1 bytes of
  context. The last partial window is dropped. Validation and test keep their first `EVAL_WINDOWS` windows
  (a fixed, stated sample: `info["split_sizes"]`), calibration the first `CALIBRATION_WINDOWS` of train.
- The model's reduced output is the logits as (batch, vocabulary, tokens): class scores on dim 1, the layout
  `cross_entropy` takes with (batch, tokens) targets, so the default task loss, training and distillation's
  KL over classes apply per token unchanged.
- Metric: **perplexity** per byte, exp(mean next-byte cross-entropy over every scored byte), lower is better
  (`metric_direction="minimize"`): the accuracy guard reads as a fraction of the baseline's perplexity
  (`--max-accuracy-drop 0.05` = at most 5% higher). `kl_to_reference` is the cheap fidelity measure: the
  mean KL divergence (nats per byte) of a model's next-byte distribution from the original's, the workload's
  `output_error_fn` (what the sensitivity profile ranks settings by).
- `config.use_cache` is off (the search runs whole windows and does not need a key/value cache on every
  forward), `generation_config.use_cache` on, so `generate` decodes with the cache unless told otherwise.
- `build_student(width)` keeps the depth, the head size and the query/KV grouping and scales the heads (hence
  the hidden size) and the feed-forward width by `width`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orchestrator.files.digest import tensor_digest
from orchestrator.workloads._baseline import cached_baseline, recipe_hash, recipe_trainer
from orchestrator.workloads._workload import Workload
from orchestrator.workloads.data import Split
from orchestrator.workloads.text import CORPUS_PACKAGE, CORPUS_VERSION, LANGUAGES, load_corpus, split_corpus
from techniques.tools.inputs import main_output

WINDOW = 128  # bytes of context a window gives the model (and targets it scores)
EVAL_WINDOWS = 256  # windows kept of the validation and test streams (32,768 scored bytes each)
CALIBRATION_WINDOWS = 64
VOCAB = 256  # byte values

RECIPE: dict[str, Any] = {
    "arch": "llama-bytes",
    "hidden": 192,
    "heads": 6,
    "kv_heads": 2,
    "head_dim": 32,
    "layers": 4,
    "intermediate": 512,
    "window": WINDOW,
    "epochs": 3,
    "lr": 2e-3,
    "batch_size": 32,
    "seed": 0,
}
_SIZES = ("hidden", "heads", "kv_heads", "head_dim", "layers", "intermediate")


# ---------------------------------------------------------------------------------------------- the data


def byte_stream(lines: Sequence[str]) -> torch.Tensor:
    """The lines' UTF-8 bytes, each line ended by a newline, as one LongTensor."""
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(stream: torch.Tensor, limit: int | None = None) -> Split:
    """Non-overlapping (WINDOW inputs, WINDOW next-byte targets) windows of a stream, at most `limit`."""
    count = (len(stream) - 1) // WINDOW
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"a stream of {len(stream)} bytes holds no window of {WINDOW + 1}")
    starts = torch.arange(count) * WINDOW
    rows = stream[starts[:, None] + torch.arange(WINDOW + 1)]
    return Split({"input_ids": rows[:, :-1].contiguous()}, rows[:, 1:].contiguous())


def load_splits(seed: int = 0) -> dict[str, Split]:
    """Train / calibration / validation / test windows of the corpus's byte streams."""
    texts = split_corpus(load_corpus(), seed)
    splits = {
        "train": windows(byte_stream(texts["train"][0])),
        "validation": windows(byte_stream(texts["validation"][0]), EVAL_WINDOWS),
        "test": windows(byte_stream(texts["test"][0]), EVAL_WINDOWS),
    }
    splits["calibration"] = splits["train"].subset(CALIBRATION_WINDOWS)
    return splits


# ---------------------------------------------------------------------------------------------- the model


def build_llama(**sizes: Any) -> nn.Module:
    """A `LlamaForCausalLM` over bytes, sized by `RECIPE` unless `sizes` overrides one of `_SIZES`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = set(sizes) - set(_SIZES)
    if unknown:
        raise TypeError(f"unknown Llama size(s) {sorted(unknown)}; known: {', '.join(_SIZES)}")
    size = {key: RECIPE[key] for key in _SIZES} | sizes
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        head_dim=size["head_dim"],
        max_position_embeddings=WINDOW,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.use_cache = True
    return model


def student_llama(width: float) -> nn.Module:
    """The baseline's depth, head size and query/KV grouping with `width` × its heads and feed-forward width."""
    if not 0 < width <= 1:
        raise ValueError(f"student width must be in (0, 1], got {width}")
    group = RECIPE["heads"] // RECIPE["kv_heads"]
    kv_heads = max(1, round(RECIPE["kv_heads"] * width))
    heads = kv_heads * group
    return build_llama(
        hidden=heads * RECIPE["head_dim"],
        heads=heads,
        kv_heads=kv_heads,
        intermediate=max(1, round(RECIPE["intermediate"] * width)),
    )


def token_logits(outputs: Any) -> torch.Tensor:
    """A causal LM's logits as (batch, vocabulary, tokens): class scores on dim 1."""
    return main_output(outputs).transpose(1, 2)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of (batch, vocabulary, tokens) logits against (batch, tokens) ids."""
    return float(torch.exp(nn.functional.cross_entropy(logits.float(), targets)))


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference ‖ model) of the next-token distributions, nats per token ((batch, vocab, tokens))."""
    log_p = torch.log_softmax(reference.float(), dim=1)
    log_q = torch.log_softmax(logits.float(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


# ------------------------------------------------------------------------------------------- the workload


def make_lm() -> Workload:
    """Next-byte prediction over real dialog lines with a small Llama (trained on first use)."""
    splits = load_splits(RECIPE["seed"])
    recipe = {
        **RECIPE,
        "corpus": f"{CORPUS_PACKAGE}=={CORPUS_VERSION}",
        "data": tensor_digest(*splits["train"].digest_tensors()),
    }
    train = recipe_trainer(RECIPE, splits["train"], "lm", output_fn=token_logits)
    parameters = sum(p.numel() for p in build_llama().parameters())
    return Workload(
        name="lm",
        build_model=build_llama,
        load_baseline=functools.partial(cached_baseline, "lm", recipe, build_llama, train),
        splits=splits,
        fingerprint=f"lm-{recipe_hash(recipe)}",
        metric_name="perplexity",
        metric_fn=perplexity,
        metric_direction="minimize",
        output_error_fn=kl_to_reference,
        batch_size=32,
        build_student=student_llama,
        output_fn=token_logits,
        info={
            "description": (
                f"next-byte prediction of real dialog lines from {CORPUS_PACKAGE} {CORPUS_VERSION} "
                f"({len(LANGUAGES)} languages), Llama (grouped-query attention, RMSNorm, rotary, SwiGLU) with "
                f"{parameters / 1e6:.2f} M parameters; perplexity per byte over non-overlapping {WINDOW}-byte "
                f"windows (the first {EVAL_WINDOWS} of the validation and test streams)"
            ),
            "dataset": f"{CORPUS_PACKAGE}=={CORPUS_VERSION}",
            "split_sizes": {name: len(split) for name, split in splits.items()},
            "window": WINDOW,
            "parameters": parameters,
            "recipe": recipe,
        },
    )
