"""Tiny seeded models and data for tests (no downloads); the contract's own (TinyCNN, seeded, tiny_data) ship in
`orchestrator.testing.models` and are re-exported here."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.testing.models import TinyCNN, seeded, tiny_data

__all__ = [
    "TINY_BERT",
    "DictInputNet",
    "TinyCNN",
    "TinyResNet",
    "dict_data",
    "seeded",
    "text_data",
    "tiny_bert",
    "tiny_data",
]


class TinyResNet(nn.Module):
    """A residual block, so structured pruning must keep the two branches' channels consistent."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(x + self.bn_b(self.conv_b(y)))
        return self.fc(x.mean(dim=(2, 3)))


class DictInputNet(nn.Module):
    """Two named inputs (`image`, `extra`), called as `model(**batch)`; returns a dict with `logits`."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.extra = nn.Linear(4, 8)
        self.head = nn.Linear(8 * 64 + 8, classes)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.conv(image)).flatten(1)
        return {"logits": self.head(torch.cat([features, torch.relu(self.extra(extra))], dim=1))}


def dict_data(n: int = 64, seed: int = 0, classes: int = 10) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`tiny_data` images with a 4-feature side input, as a dict batch."""
    image, targets = tiny_data(n, seed, classes)
    extra = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed + 1))
    return {"image": image, "extra": extra}, targets


TINY_BERT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "num_labels": 3,
}


def tiny_bert(seed: int = 0, **overrides) -> nn.Module:
    """A random-initialised Hugging Face BERT classifier: 2 layers, 4 heads, hidden 32 (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(**{**TINY_BERT, **overrides}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def text_data(n: int = 32, seq: int = 12, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random token ids with a padded tail and labels from a fixed rule on the first token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_BERT["vocab_size"], (n, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, ids[:, 0] % TINY_BERT["num_labels"]
