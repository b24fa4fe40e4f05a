"""Tiny random-initialised transformers decoders (Llama with GQA, tied or not; Qwen2; GPT-2 with fused Conv1D
c_attn) as workloads, importable as `tests.lm_workloads:NAME` from a fresh process. Nothing is downloaded.

Inputs are `{"input_ids": ...}` windows of random token ids, targets the next tokens; the metric is next-token
accuracy (higher is better). initializer_range 0.2 makes the random models' greedy tokens vary from step to step,
so comparing greedy decodes can tell models apart.
"""

from __future__ import annotations

import torch

from orchestrator.api import workload_from
from orchestrator.workloads import Workload

VOCAB = 100
WINDOW = 12


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of positions whose most likely next token is the target."""
    return float((logits.argmax(-1) == targets).float().mean())


def _workload(model: torch.nn.Module, name: str) -> Workload:
    ids = torch.randint(0, VOCAB, (48, WINDOW + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    train = ({"input_ids": inputs[:32]}, targets[:32])
    validation = ({"input_ids": inputs[32:]}, targets[32:])
    return workload_from(model=model.eval(), train=train, validation=validation, metric=token_accuracy,
                         batch_size=16, name=name)  # fmt: skip


_SHARED = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)  # fmt: skip


def llama_model(tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_SHARED, tie_word_embeddings=tied))


def qwen2_model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**_SHARED, tie_word_embeddings=False))


def gpt2_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=64, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def llama() -> Workload:
    return _workload(llama_model(), "tiny-llama")


def llama_tied() -> Workload:
    return _workload(llama_model(tied=True), "tiny-llama-tied")


def qwen2() -> Workload:
    return _workload(qwen2_model(), "tiny-qwen2")


def gpt2() -> Workload:
    return _workload(gpt2_model(), "tiny-gpt2")
