"""The check of a written transformers directory: load it as a user would and compare it with the checkpoint.

Decisions:
- The directory is loaded with `AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)` (no remote code,
  nothing downloaded), in this process, from the files that will be published.
- Logits on the workload's validation inputs (at batch sizes CHECK_BATCH and 1) are compared with the checkpoint
  model's under `_check.compare`'s float32 rule: the weights are the checkpoint's decoded weights, so only the
  order of float32 operations may differ.
- Generation is checked as users generate: greedy decoding (`do_sample=False`) of GENERATED_TOKENS tokens from the
  first PROMPT_TOKENS tokens of PROMPTS validation rows, with the KV cache, in both models; the tokens must be the
  same. The written model also decodes once without the cache, which must give the same tokens again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.export._check import TOLERANCE, compare
from orchestrator.workloads import Workload
from techniques.tools.inputs import Inputs, batch_length, call_model, main_output

if TYPE_CHECKING:
    from transformers import GenerationConfig

CHECK_BATCH = 8
PROMPTS = 2
PROMPT_TOKENS = 8
GENERATED_TOKENS = 8


def _logits(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    with torch.no_grad():
        return [main_output(call_model(model, inputs)).detach().float().cpu().numpy()]


def prompts(workload: Workload) -> dict[str, torch.Tensor]:
    """The first PROMPT_TOKENS tokens of the first PROMPTS validation rows (with their attention mask, if any)."""
    batch = workload.example_inputs(PROMPTS)
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    elif not isinstance(batch, dict) or "input_ids" not in batch:
        raise UserError("--format hf checks generation from the workload's input_ids: its batches must be a tensor of "
                        "token ids or a dict holding input_ids")  # fmt: skip
    return {key: batch[key][:, :PROMPT_TOKENS] for key in ("input_ids", "attention_mask") if key in batch}


def greedy(model: nn.Module, prompt: dict[str, torch.Tensor], *, use_cache: bool = True) -> list[list[int]]:
    """The GENERATED_TOKENS tokens greedy decoding appends to each prompt row (fewer where it stops at EOS)."""
    with torch.no_grad():
        out = cast(Any, model).generate(  # a transformers causal LM (`write_hf` checked), whose generate takes **prompt
            **prompt, max_new_tokens=GENERATED_TOKENS, do_sample=False, use_cache=use_cache,
            pad_token_id=_pad(model),
        )  # fmt: skip
    return out[:, prompt["input_ids"].shape[1] :].tolist()


def _pad(model: nn.Module) -> int:
    config = cast("GenerationConfig", model.generation_config)
    for value in (config.pad_token_id, config.eos_token_id, 0):
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' progress bars off while the block runs (they are process-wide; restored after)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load(directory: Path) -> nn.Module:
    """The directory as `transformers` loads it: AutoModelForCausalLM, local files only, no remote code."""
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


def check_directory(model: nn.Module, directory: Path, workload: Workload) -> dict[str, Any]:
    """Load `directory` and compare its logits and greedy tokens with `model`'s; the report's `check` entry."""
    written = load(directory)
    batches = [workload.example_inputs(CHECK_BATCH), workload.example_inputs(1)]
    logits = compare([_logits(model, b) for b in batches], [_logits(written, b) for b in batches], TOLERANCE)
    prompt = prompts(workload)
    expected, got = greedy(model, prompt), greedy(written, prompt)
    uncached = greedy(written, prompt, use_cache=False)
    generation = {
        "prompts": prompt["input_ids"].tolist(),
        "new_tokens": GENERATED_TOKENS,
        "decoding": "greedy (do_sample=False), with the KV cache",
        "checkpoint_tokens": expected,
        "export_tokens": got,
        "export_tokens_without_cache": uncached,
        "same": expected == got == uncached,
    }
    count = batch_length(batches[0])
    return {
        "loaded_with": "AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)",
        "loaded_class": type(written).__name__,
        "inputs": f"logits on the workload's first {count} validation examples, at batch sizes {count} and 1",
        **logits,
        "generation": generation,
        "passed": bool(logits["passed"] and generation["same"]),
    }
