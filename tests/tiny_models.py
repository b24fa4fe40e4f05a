"""Tiny seeded models and data for tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv blocks and two linear layers on 1×8×8 inputs: something for every technique."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


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


def seeded(model_cls: type[nn.Module] = TinyCNN, seed: int = 0, **kwargs) -> nn.Module:
    """A model with seeded random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = model_cls(**kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_data(n: int = 64, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 1×8×8 inputs with labels a fixed random linear rule assigns (learnable, not noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    rule = torch.randn(64, classes, generator=torch.Generator().manual_seed(1234))
    y = (x.flatten(1) @ rule).argmax(dim=1)
    return x, y


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
