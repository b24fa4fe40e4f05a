"""`--format hf`: a compressed decoder LM as a Hugging Face model directory that `AutoModelForCausalLM` loads.

Modules: `_shapes` (the config from the modules' real shapes; non-uniform layers refused), `_weights` (packed
layers decoded to float, ties kept truthful), `_verify` (load the directory back, compare logits and greedy tokens),
`_write` (save, check, publish, report).
"""

from __future__ import annotations

from orchestrator.export.hf._shapes import ShapeError, derived_config
from orchestrator.export.hf._verify import greedy
from orchestrator.export.hf._write import require_causal_lm, write_hf

__all__ = ["ShapeError", "derived_config", "greedy", "require_causal_lm", "write_hf"]
