"""Attention-head pruning for decoder language models: whole key/value groups (a key/value head and the query heads
that read it) leave q_proj/k_proj/v_proj (rows) and o_proj (columns), or GPT-2's fused c_attn and c_proj.

Decisions:
- A technique of its own beside `head_pruning`, which prunes BERT-style attention through Torch-Pruning's dependency
  graph: decoders need what that path lacks — grouped-query coupling, GPT-2's fused projection, calibration-based
  importance over token batches, uniform shapes a transformers config can describe, and config fields kept in step.
  `head_pruning` does not touch these layouts (it notes them and points here), so no attention is pruned by both.
- Whole groups only: every group keeps its `rep` query heads, so `num_key_value_groups` (what `repeat_kv` and the
  attention functions read) stays right and the KV cache holds the kept key/value heads. Llama-family attention
  infers its head count from the projection widths; GPT-2's `num_heads` and `split_size` are updated (and recorded
  in checkpoints). Multi-head attention (GPT-2, or Llama with as many key/value heads as heads) is the case rep = 1.
- Importance, `uniform` and slicing: `techniques.decoder_units`; where the exporter reads what each block kept:
  `techniques.decoder_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from techniques._base import LayerMap, TechniqueSpec
from techniques.decoder_layout import LayoutTypes, attention_of, is_decoder_attention_class
from techniques.decoder_units import Units, check_spec

NAME = "decoder_head_pruning"


class DecoderAttention(nn.Module):
    """Stands, in the registry's layer types and in messages, for every decoder attention this technique handles."""


LAYER_TYPES: tuple[type[nn.Module], ...] = LayoutTypes(DecoderAttention, is_decoder_attention_class)


@dataclass(frozen=True)
class DecoderHeadPruningSpec(TechniqueSpec):
    """Per attention module, the fraction of its key/value groups to remove (floor(ratio × groups), at least one
    group stays); `importance` `activation` (calibration data) or `magnitude`; `uniform` gives every attention
    module the same count (see `techniques.decoder_units`).

    Address attention modules by name (`model.layers.0.self_attn`), `re:` regex or `_default`. Valid values: each
    ratio a finite number in [0, MAX_RATIO] = [0, 0.9]; importance one of activation, magnitude; uniform a bool.
    """

    technique: ClassVar[str] = NAME

    group_ratio: LayerMap
    importance: str = "activation"
    uniform: bool = True

    def validate(self) -> None:
        check_spec(self, "group_ratio", self.importance, self.uniform)


UNITS = Units(NAME, "key/value groups", "group_ratio", LAYER_TYPES, attention_of)
apply = UNITS.apply
# beside head_pruning (15), before the feed-forward width (21) and depth (25)
UNITS.register(DecoderHeadPruningSpec, stage=16, title="key/value groups removed")
