"""Feed-forward width pruning for decoder language models: channels of a gated FFN leave gate_proj and up_proj
(rows) and down_proj (columns) together; GPT-2's c_fc (outputs) and c_proj (inputs) likewise.

Decisions:
- A technique of its own beside `structured_pruning`: Torch-Pruning's graph does not handle GPT-2's Conv1D, and a
  decoder's FFN needs calibration-based importance over token batches, uniform widths a transformers config can
  describe (`intermediate_size`, GPT-2's `n_inner`) and the config kept in step. LlamaMLP's own
  `intermediate_size` attribute follows (its forward does not read it).
- Importance: `magnitude` scores a channel by its squared gate, up and down weights; `activation` by Wanda-sp's
  ‖down[:, c]‖₂ · ‖X_c‖₂ with X the down projection's input on calibration tokens (`techniques.decoder_units`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from techniques._base import LayerMap, TechniqueSpec
from techniques.decoder_layout import LayoutTypes, is_decoder_mlp_class, mlp_of
from techniques.decoder_units import Units, check_spec

NAME = "ffn_pruning"


class DecoderMLP(nn.Module):
    """Stands, in the registry's layer types and in messages, for every feed-forward module this technique handles."""


LAYER_TYPES: tuple[type[nn.Module], ...] = LayoutTypes(DecoderMLP, is_decoder_mlp_class)


@dataclass(frozen=True)
class FfnPruningSpec(TechniqueSpec):
    """Per feed-forward module, the fraction of its intermediate channels to remove (at least one stays);
    `importance` `activation` (calibration data) or `magnitude`; `uniform` gives every module the same width.

    Address modules by name (`model.layers.0.mlp`), `re:` regex or `_default`. Valid values: each ratio a finite
    number in [0, MAX_RATIO] = [0, 0.9]; importance one of activation, magnitude; uniform a bool.
    """

    technique: ClassVar[str] = NAME

    ffn_ratio: LayerMap
    importance: str = "activation"
    uniform: bool = True

    def validate(self) -> None:
        check_spec(self, "ffn_ratio", self.importance, self.uniform)


UNITS = Units(NAME, "channels", "ffn_ratio", LAYER_TYPES, mlp_of)
apply = UNITS.apply
# after structured_pruning (20), before depth (25)
UNITS.register(FfnPruningSpec, stage=21, title="feed-forward channels removed")
