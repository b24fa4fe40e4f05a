"""`write_hf`: a compressed decoder as a Hugging Face model directory, checked before it is published.

Decisions:
- Only transformers causal LMs (a PreTrainedModel that AutoModelForCausalLM maps) are written; anything else is one
  line pointing at --format onnx.
- The target architecture is the checkpoint model's own class built from the derived config (`_shapes`), filled
  with the decoded float weights (`_weights`) and saved with `save_pretrained` (model.safetensors, config.json,
  generation_config.json when the model generates) into a local staging directory, which is loaded back and checked
  (`_verify`) before `fs.publish_directory` moves it into place in one step (remote: file by file, config.json
  last). The caller (`_run`) writes the JSON report after it.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from orchestrator.artifacts.fs import publish_directory
from orchestrator.errors import UserError
from orchestrator.export.hf._shapes import derived_config
from orchestrator.export.hf._verify import check_directory, quiet
from orchestrator.export.hf._weights import dequantized, target_state, ties
from orchestrator.workloads import Workload

COMPLETE_MARK = "config.json"  # what a remote publish writes last


def require_causal_lm(model: nn.Module) -> None:
    """UserError unless `model` is a transformers causal LM that AutoModelForCausalLM can load back."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"--format hf needs a transformers model (a PreTrainedModel), not a {name}; use --format onnx")
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise UserError(f"--format hf writes causal language models that AutoModelForCausalLM loads; {name} is not "
                        "one: use --format onnx")  # fmt: skip


def _build(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The float model to save (the checkpoint's class, derived config, decoded weights) and what the report says
    about how it was made."""
    config, changes = derived_config(model)
    dense, decoded = dequantized(model)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and ties(dense)
    if tied != bool(getattr(config, "tie_word_embeddings", False)):
        changes["tie_word_embeddings"] = [True, False]
    config.tie_word_embeddings = tied
    target = type(model)(config).eval()
    target.load_state_dict(target_state(dense, target), strict=True)
    target.generation_config = copy.deepcopy(model.generation_config)  # type: ignore[union-attr]
    return target, {"architecture": type(model).__name__, "config_changes": changes, "tie_word_embeddings": tied,
                    "dequantized": decoded}  # fmt: skip


def _notes(decoded: list[dict[str, Any]], size: int, source: dict[str, Any]) -> list[str]:
    if not decoded:
        return []
    against = source.get("checkpoint_bytes")
    than = f" than the checkpoint's {against} bytes" if against else ""
    names = ", ".join(entry["name"] for entry in decoded[:4]) + (", ..." if len(decoded) > 4 else "")
    return [f"{len(decoded)} packed layer(s) ({names}) are written dequantized to float32, which transformers loads "
            f"as it is: the directory ({size} bytes) is not smaller{than}"]  # fmt: skip


def write_hf(model: nn.Module, workload: Workload, out: str, source: dict[str, Any]) -> dict[str, Any]:
    """Write `model` as a transformers directory at `out`, checked before it is published; return its report."""
    require_causal_lm(model)
    target, made = _build(model)
    with tempfile.TemporaryDirectory(prefix="hf-export-") as staging:
        local = Path(staging) / "model"
        with quiet():
            target.save_pretrained(str(local))
        files = {p.name: p.stat().st_size for p in sorted(local.iterdir()) if p.is_file()}
        size = sum(files.values())
        report = {
            "format": "hf", "path": out, "bytes": size, "files": files, "source": source, "workload": workload.name,
            "runtime": f"transformers {_version()} (AutoModelForCausalLM.from_pretrained)",
            **made, "notes": _notes(made["dequantized"], size, source),
            "check": check_directory(model, local, workload),
        }  # fmt: skip
        publish_directory(local, out, last=COMPLETE_MARK)
    return report


def _version() -> str:
    import transformers

    return transformers.__version__
