"""Layers a model holds but its outputs never depend on (BERT's pooler under a module that reads only
`last_hidden_state`): an exporter drops them from the graph, so per-layer reports and measurements must not
expect them there.

Decisions:
- A layer is a module holding parameters or buffers of its own. It is unused on a batch when its forward never
  runs, or when it runs and the model's outputs do not depend on what it returns (the result is discarded, as
  `BertModel`'s pooler output under a wrapper returning `last_hidden_state`).
- Dependence is read in one forward and backward: every layer's float output gets a zero probe that requires a
  gradient, and the probes with no path to an output are the candidates. Integer kernels (int8 GEMMs of packed
  layers) cut that path, so each candidate is confirmed by running the model once more with that layer's
  output replaced by other values: only a layer whose replacement leaves every output bitwise unchanged is
  unused. Candidates are tried in halves (a group whose replacement changes nothing is unused as a whole), so a
  model with a few unused layers costs a few forwards per unused layer even when int8 kernels make every layer
  a candidate.
- Found on a real batch of the workload (`Workload.unused_layers`); a layer that only some inputs reach is
  therefore "used" as soon as the batch reaches it, never the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from techniques.tools.inputs import Inputs, call_model, output_tensors

Hook = Callable[[str, torch.Tensor], torch.Tensor | None]


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules holding parameters or buffers of their own (the root excluded), by name in model order."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and (next(module.parameters(recurse=False), None) is not None
                     or next(module.buffers(recurse=False), None) is not None)
    }  # fmt: skip


@contextlib.contextmanager
def _hooked(layers: dict[str, nn.Module], hook: Hook) -> Iterator[None]:
    """Forward hooks calling `hook(name, output)` on each layer's float tensor output (a tensor it returns
    replaces the output); the layer's name is passed for every output, float or not, with `output` None."""

    def make(name: str) -> Callable[[nn.Module, Any, Any], Any]:
        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                return hook(name, output)
            hook(name, None)  # type: ignore[arg-type]
            return None

        return forward_hook

    handles = [module.register_forward_hook(make(name)) for name, module in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _outputs(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    return list(output_tensors(call_model(model, inputs)))


def _disconnected(model: nn.Module, inputs: Inputs, layers: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """(layers that never ran, layers that ran with no autograd path from their output to the model's)."""
    ran: list[str] = []
    probes: dict[str, torch.Tensor] = {}

    def probe(name: str, output: torch.Tensor | None) -> torch.Tensor | None:
        if name not in ran:
            ran.append(name)
        if output is None:
            return None
        zero = probes.setdefault(name, torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True))
        return output + zero

    with torch.inference_mode(False), torch.enable_grad(), _hooked(layers, probe):
        outputs = [t for t in _outputs(model, inputs) if t.requires_grad]
        grads: Any = [None] * len(probes)
        if outputs and probes:
            total = torch.stack([t.float().sum() for t in outputs]).sum()
            with contextlib.suppress(RuntimeError):  # an in-place op autograd refuses: every layer is confirmed
                grads = torch.autograd.grad(total, list(probes.values()), allow_unused=True)
    never = [name for name in layers if name not in ran]
    return never, [name for name, grad in zip(probes, grads, strict=True) if grad is None]


def _matters(model: nn.Module, inputs: Inputs, layers: dict[str, nn.Module], names: list[str], reference: list) -> bool:
    """Whether replacing the outputs of the layers `names` by other values changes any of the model's outputs."""
    generator = torch.Generator().manual_seed(0)

    def replace(hooked: str, output: torch.Tensor | None) -> torch.Tensor | None:
        if output is None:
            return None
        noise = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
        return output + noise * (1 + output.detach().abs().max())

    with torch.no_grad(), _hooked({name: layers[name] for name in names}, replace):
        changed = _outputs(model, inputs)
    if len(changed) != len(reference):
        return True
    return any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(changed, reference, strict=True))


def _confirmed(
    model: nn.Module, inputs: Inputs, layers: dict[str, nn.Module], names: list[str], reference: list
) -> list[str]:
    """The layers among `names` whose outputs the model's do not depend on, by halving: a group whose
    replacement changes nothing is unused as a whole (one forward), else each half is tried."""
    if not names or not _matters(model, inputs, layers, names, reference):
        return names
    if len(names) == 1:
        return []
    half = len(names) // 2
    return _confirmed(model, inputs, layers, names[:half], reference) + _confirmed(
        model, inputs, layers, names[half:], reference
    )


def unused_layers(model: nn.Module, inputs: Inputs) -> list[str]:
    """The weight layers (`weight_layers`) of `model` whose output none of its outputs depends on, on `inputs`,
    in model order (the model is put in eval mode)."""
    model.eval()
    layers = weight_layers(model)
    never, candidates = _disconnected(model, inputs, layers)
    if not candidates:
        return never
    with torch.no_grad():
        reference = _outputs(model, inputs)
    unused = set(never) | set(_confirmed(model, inputs, layers, candidates, reference))
    return [name for name in layers if name in unused]
