"""`write_hf`: a compressed decoder as a Hugging Face model directory, checked before it is published.

Decisions:
- Only transformers causal LMs (a PreTrainedModel that AutoModelForCausalLM maps) are written; anything else is one
  line pointing at --format onnx.
- The target architecture is the checkpoint model's own class built from the derived config (`_shapes`), filled
  with the decoded float weights (`_weights`) and saved with `save_pretrained` (model.safetensors, config.json,
  generation_config.json when the model generates) into a local staging directory, which is loaded back and checked
  (`_verify`) before `fs.publish_directory` moves it into place in one step (remote: file by file, config.json
  last). The caller (`_run`) writes the JSON report after it.
- With `compressed_tensors`, low-bit Linear weights are saved packed instead (`_compressed`), through the same
  `save_pretrained` given the packed state and the config's `quantization_config`.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.export.hf._compressed import FORMAT, pack, packable, require_package
from orchestrator.export.hf._shapes import derived_config
from orchestrator.export.hf._verify import check_directory, quiet
from orchestrator.export.hf._weights import dequantized, target_state, ties
from orchestrator.files.fs import publish_directory
from orchestrator.workloads import Workload

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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


def _build(model: nn.Module) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The float model to save (the checkpoint's class, derived config, decoded weights) and what the report says
    about how it was made."""
    config, changes = derived_config(model)
    dense, decoded = dequantized(model)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and ties(dense)
    if tied != bool(getattr(config, "tie_word_embeddings", False)):
        changes["tie_word_embeddings"] = [True, False]
    config.tie_word_embeddings = tied
    source = cast("PreTrainedModel", model)  # `write_hf` checked that it is one
    target = type(source)(config).eval()
    target.load_state_dict(target_state(dense, target), strict=True)
    target.generation_config = copy.deepcopy(source.generation_config)
    return target, {"architecture": type(model).__name__, "config_changes": changes, "tie_word_embeddings": tied,
                    "dequantized": decoded}  # fmt: skip


def _packed_state(model: nn.Module, target: PreTrainedModel, made: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The state to save with compressed-tensors' packed layers (`target.config` gets their quantization_config),
    or None when no layer can be packed; `made` records which layers are packed and which stay dequantized."""
    version = require_package()
    layers = packable(model, target, made["tie_word_embeddings"])
    made["packed"] = [{"name": name, "bits": m.bits, "group_size": m.group_size,
                       "written_as": f"compressed-tensors {FORMAT} (written with compressed-tensors {version})"}
                      for name, m in layers.items()]  # fmt: skip
    made["dequantized"] = [entry for entry in made["dequantized"] if entry["name"] not in layers]
    if not layers:
        return None
    state = dict(target.state_dict())
    cast(Any, target.config).quantization_config = pack(state, layers)  # not a declared field of the config
    return state


def _notes(made: dict[str, Any], size: int, source: dict[str, Any]) -> list[str]:
    notes, decoded, packed = [], made["dequantized"], made.get("packed", [])
    if packed:
        notes.append(f"{len(packed)} Linear layer(s) stay packed in compressed-tensors' {FORMAT} format: transformers "
                     "loads this directory only where the compressed-tensors package is installed")  # fmt: skip
    if decoded:
        against = source.get("checkpoint_bytes")
        than = f" than the checkpoint's {against} bytes" if against and not packed else ""
        names = ", ".join(entry["name"] for entry in decoded[:4]) + (", ..." if len(decoded) > 4 else "")
        notes.append(f"{len(decoded)} packed layer(s) ({names}) are written dequantized to float32, which transformers "
                     f"loads as it is: the directory ({size} bytes) is not smaller{than} for them")  # fmt: skip
    return notes


def write_hf(
    model: nn.Module, workload: Workload, out: str, source: dict[str, Any], *, compressed_tensors: bool = False
) -> dict[str, Any]:
    """Write `model` as a transformers directory at `out`, checked before it is published; return its report.
    `compressed_tensors`: keep low-bit Linear weights packed in compressed-tensors' format (see `_compressed`)."""
    require_causal_lm(model)
    if compressed_tensors:
        require_package()
    target, made = _build(model)
    state = _packed_state(model, target, made) if compressed_tensors else None
    with tempfile.TemporaryDirectory(prefix="hf-export-") as staging:
        local = Path(staging) / "model"
        with quiet():
            target.save_pretrained(str(local), state_dict=state)
        files = {p.name: p.stat().st_size for p in sorted(local.iterdir()) if p.is_file()}
        size = sum(files.values())
        report = {
            "format": "hf", "path": out, "bytes": size, "files": files, "source": source, "workload": workload.name,
            "runtime": f"transformers {_version()} (AutoModelForCausalLM.from_pretrained)",
            **made, "notes": _notes(made, size, source),
            "check": check_directory(model, local, workload),
        }  # fmt: skip
        publish_directory(local, out, last=COMPLETE_MARK)
    return report


def _version() -> str:
    import transformers

    return transformers.__version__
