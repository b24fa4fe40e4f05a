"""The float weights a transformers model directory holds, decoded from a compressed model's packed layers.

Decisions:
- transformers loads plain float checkpoints everywhere, so packed low-bit layers are decoded to float32 with the
  arithmetic the checkpoint's own forward uses (`dense_weight`: codes x scales, zeros where pruned); smoothing
  scales (techniques.smoothing's `input_scale`) are folded into the weight's columns. Each decoded layer is listed
  so the report can say the directory is not smaller than the checkpoint.
- Low-rank factored Linears (techniques.lowrank: a Sequential of Linears) are multiplied out into one Linear
  (in float64, then float32): transformers has no place for the factors, so they are listed, not smaller.
- Activation quantisation (W8A8) cannot be written into a plain float model: a checkpoint with it is refused
  rather than written as a model that computes something else.
- Weights are matched by name with the state the target architecture expects; a transformers Conv1D (GPT-2)
  stores (in, out), so a Linear-shaped weight placed there is transposed. Anything missing, extra or of another
  shape is an error, never silently re-initialised.
- Embeddings stay tied only when the decoded embedding and output head are bitwise equal (a compressed head may
  differ from the compressed table): `tie_word_embeddings` says what the weights are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from orchestrator.errors import UserError
from techniques import set_module
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.finalize import finalized_copy
from techniques.packed.layers import PackedConv2d, PackedLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _float_module(module: PackedLayer | PackedEmbedding) -> nn.Module:
    """The plain float32 layer computing what `module` computes (weight-only quantisation decoded)."""
    with torch.no_grad():
        weight = module.dense_weight().detach().float().clone()
        if isinstance(module, PackedEmbedding):
            return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=module.padding_idx)
        if isinstance(module, PackedConv2d):
            raise UserError("--format hf writes decoder language models; this one holds a packed Conv2d")
        if getattr(module, "smoothed", False):
            weight = weight * cast(torch.Tensor, module.input_scale).float()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        layer.weight.copy_(weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


def dequantized(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A float copy of `model` (every packed layer decoded) and one entry per decoded layer."""
    dense = finalized_copy(model)
    quantized = [name for name, m in dense.named_modules() if getattr(m, "act_bits", None) is not None]
    if quantized:
        raise UserError(
            f"{len(quantized)} layer(s) ({quantized[0]}, ...) quantise activations to 8 bits (W8A8), which a plain "
            "transformers model cannot hold; --format hf writes weight-only compression (use --format onnx)"
        )
    entries = []
    for name, module in list(dense.named_modules()):
        if isinstance(module, PackedLayer | PackedEmbedding):
            entries.append(_entry(name, module))
            set_module(dense, name, _float_module(module))
    for name, module in list(dense.named_modules()):
        if _factored(module):
            entries.append({"name": name, "type": "low-rank factors", "bits": 32, "group_size": None,
                            "sparse": False, "smoothed": False,
                            "written_as": "float32 (the factors multiplied out into one Linear)"})  # fmt: skip
            set_module(dense, name, _multiplied(module))
    return dense, entries


def _factored(module: nn.Module) -> bool:
    """A low-rank factored Linear (techniques.lowrank): an nn.Sequential of two or more nn.Linear."""
    children = list(module.children())
    return isinstance(module, nn.Sequential) and len(children) > 1 and all(type(c) is nn.Linear for c in children)


def _multiplied(chain: nn.Sequential) -> nn.Linear:
    """The one Linear computing what a chain of Linears computes: W = Wn...W1, b = Wn(...(W2 b1 + b2)...) + bn."""
    layers = cast(list[nn.Linear], list(chain.children()))
    with torch.no_grad():
        weight, bias = layers[0].weight.double(), _bias(layers[0])
        for layer in layers[1:]:
            weight, bias = layer.weight.double() @ weight, layer.weight.double() @ bias + _bias(layer)
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=any(layer.bias is not None for layer in layers))
        merged.weight.copy_(weight.float())
        if merged.bias is not None:
            merged.bias.copy_(bias.float())
    return merged


def _bias(layer: nn.Linear) -> torch.Tensor:
    return layer.bias.double() if layer.bias is not None else layer.weight.new_zeros(layer.out_features).double()


def _entry(name: str, module: PackedLayer | PackedEmbedding) -> dict[str, Any]:
    sparse = bool(getattr(module, "sparse", False))
    return {"name": name, "type": type(module).__name__, "bits": module.bits, "group_size": module.group_size,
            "sparse": sparse, "smoothed": bool(getattr(module, "smoothed", False)),
            "written_as": "float32 (dequantized" + (", zeros stored dense)" if sparse else ")")}  # fmt: skip


def ties(dense: nn.Module) -> bool:
    """Whether the float model's output head holds exactly its input embedding's weights."""
    pretrained = cast("PreTrainedModel", dense)  # a transformers model's float copy
    head, table = pretrained.get_output_embeddings(), pretrained.get_input_embeddings()
    if head is None or table is None:
        return False
    head_weight, table_weight = cast(torch.Tensor, head.weight), cast(torch.Tensor, table.weight)
    return head_weight.shape == table_weight.shape and bool(torch.equal(head_weight, table_weight))


def _transposed(dense: nn.Module, target: nn.Module, key: str) -> bool:
    """Whether `key` is a Linear's weight in `dense` and a transformers Conv1D's (stored (in, out)) in `target`."""
    owner = key.rpartition(".")[0]
    is_conv1d = type(target.get_submodule(owner)).__name__ == "Conv1D"
    return key.endswith("weight") and is_conv1d and isinstance(dense.get_submodule(owner), nn.Linear)


def target_state(dense: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """`dense`'s tensors under the names and in the layouts `target` (the architecture to write) expects."""
    state = {key: value.detach() for key, value in dense.state_dict().items()}
    wanted = target.state_dict()
    extra = sorted(set(state) - set(wanted))
    if extra:
        raise UserError(f"the compressed model holds {extra[0]}, which a {type(target).__name__} has no place for")
    out = {}
    for key, like in wanted.items():
        if key not in state:
            raise UserError(f"the compressed model has no tensor for {key} of {type(target).__name__}")
        value = state[key]
        if _transposed(dense, target, key):
            value = value.t()
        if value.shape != like.shape:
            raise UserError(f"{key} is {list(value.shape)} in the compressed model, {list(like.shape)} in its config")
        out[key] = value.to(like.dtype).contiguous()
    return out
