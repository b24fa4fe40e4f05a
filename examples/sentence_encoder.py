"""A sentence encoder as Hugging Face ships it: a `transformers` BertModel with its pooler, two inputs
(`input_ids`, `attention_mask`) given as a dict over padded sentences, the sentence-transformers recipe of mean
pooling over the attention mask as the output reduction, and its own distillation loss (cosine).

    python -m orchestrator apply --policy POLICY --workload examples.sentence_encoder:make_workload --out ckpt

The encoder is a small random-initialised BertModel (nothing is downloaded); its reference embeddings are the
targets, so the metric is how close (cosine) a compressed model stays to the original. The reduction takes the
batch as well as the outputs (`mean_pooled(outputs, batch)`), so padding tokens do not count in the mean.
"""

import torch
from transformers import BertConfig, BertModel

from orchestrator import workload_from


def mean_pooled(outputs, batch):  # output reduction: token embeddings → one vector per sentence, padding left out
    mask = batch["attention_mask"].unsqueeze(-1).to(outputs.last_hidden_state.dtype)
    return (outputs.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def cosine_loss(student, teacher, inputs):  # distillation-loss hook: (student_out, teacher_out, batch)
    return 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean()


def mean_cosine(outputs, targets):  # metric, higher is better
    return float(torch.nn.functional.cosine_similarity(outputs, targets, dim=-1).mean())


def padded_sentences(count: int, length: int = 16, vocab: int = 500) -> dict[str, torch.Tensor]:
    """Token ids of sentences of 4 to `length` tokens, padded with id 0 to `length`, and their attention mask."""
    lengths = torch.randint(4, length + 1, (count, 1))
    mask = (torch.arange(length) < lengths).long()
    return {"input_ids": torch.randint(1, vocab, (count, length)) * mask, "attention_mask": mask}


def make_workload():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    encoder = BertModel(config).eval()  # with its pooler, as AutoModel.from_pretrained loads it
    batch = padded_sentences(384)  # a multi-input batch: a dict
    with torch.no_grad():
        targets = mean_pooled(encoder(**batch), batch)
    split = lambda a, b: ({k: v[a:b] for k, v in batch.items()}, targets[a:b])  # noqa: E731
    return workload_from(
        model=encoder, train=split(0, 256), validation=split(256, 320), test=split(320, 384),
        metric=mean_cosine, loss=lambda out, target: cosine_loss(out, target, None),
        output_fn=mean_pooled, distill_loss=cosine_loss, batch_size=32, name="sentence-encoder",
    )  # fmt: skip
