"""A sentence encoder as Hugging Face ships it: two inputs (`input_ids`, `attention_mask`) given as a dict,
a `ModelOutput` reduced to one embedding per sentence, and its own distillation loss (cosine).

    python -m orchestrator apply --policy POLICY --workload examples.sentence_encoder:make_workload --out ckpt

The encoder is a small random-initialised `transformers` BertModel (nothing is downloaded); its reference
embeddings are the targets, so the metric is how close (cosine) a compressed model stays to the original.
"""

import torch
from transformers import BertConfig, BertModel

from orchestrator import workload_from


def mean_pooled(outputs):  # output reduction: BaseModelOutput → one vector per sentence
    return outputs.last_hidden_state.mean(dim=1)


def cosine_loss(student, teacher, inputs):  # distillation-loss hook: (student_out, teacher_out, batch)
    return 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean()


def mean_cosine(outputs, targets):  # metric, higher is better
    return float(torch.nn.functional.cosine_similarity(outputs, targets, dim=-1).mean())


def make_workload():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    encoder = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 500, (384, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # a multi-input batch: a dict
    with torch.no_grad():
        targets = mean_pooled(encoder(**batch))
    split = lambda a, b: ({k: v[a:b] for k, v in batch.items()}, targets[a:b])  # noqa: E731
    return workload_from(
        model=encoder, train=split(0, 256), validation=split(256, 320), test=split(320, 384),
        metric=mean_cosine, loss=lambda out, target: cosine_loss(out, target, None),
        output_fn=mean_pooled, distill_loss=cosine_loss, batch_size=32, name="sentence-encoder",
    )  # fmt: skip
