"""The structure of a decoder language model, read from its modules: attention (query heads within key/value
groups), feed-forward width and decoder blocks; and `decoder_layout(model)`, what each block kept.

Recognised layouts (Hugging Face transformers 5.x):
- split attention (Llama, Qwen2, Mistral, …): Linear `q_proj`/`k_proj`/`v_proj`/`o_proj`, an int `head_dim` and
  an int `num_key_value_groups`; the head counts are the projections' widths / `head_dim` (LlamaAttention infers
  them with `view(..., -1, head_dim)`), query head h reads key/value head h // groups (`repeat_kv`);
- fused attention (GPT-2): Conv1D `c_attn` (query, key, value blocks of `split_size` outputs) and `c_proj`, ints
  `num_heads`, `head_dim`, `split_size`; one key/value head per query head; cross-attention is not handled;
- gated feed-forward (LlamaMLP, Qwen2MLP): Linear `gate_proj`/`up_proj`/`down_proj`; GPT-2's MLP: Conv1D `c_fc`
  and `c_proj`;
- a decoder stack: a ModuleList whose every block holds one recognised attention (`model.layers`, `transformer.h`).

Where the exporter finds what each block kept (`decoder_layout(model)` reads it all back from the model):
- widths are the projections' own shapes (`q_proj.out_features` = heads × head_dim, `k_proj.out_features` =
  key/value heads × head_dim, `gate_proj.out_features` / `c_fc.nf` = FFN width); a checkpoint's structure record
  holds them as Linear/Conv1D entries, and GPT-2's `num_heads`/`split_size` as attribute entries;
- after depth pruning the stack's `source_layers` attribute (a tuple) gives each block's index in the original
  model, the structure record a `blocks` entry `{"kept": [...], "of": n}`, and each block's `layer_idx` is its
  new position (attribute entries);
- the model's config holds `num_hidden_layers` (and `layer_types`) always, and `num_attention_heads`,
  `num_key_value_heads`, `head_dim` (explicit) and `intermediate_size` (GPT-2: `n_inner`) only while every
  block has the same shape (`sync_config`); the structure record carries changed fields as a `config` entry.

Decisions: layouts are recognised by what modules hold, never by class name, so `import techniques` does not
import transformers; a registry layer-type tuple admits every class whose `__init__` assigns the layout's names
(`LayoutTypes`) and each instance is checked before it is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj")
FUSED = ("c_attn", "c_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
FUSED_MLP = ("c_fc", "c_proj")
SOURCE_LAYERS = "source_layers"  # a depth-pruned stack's attribute: each block's index in the original model


def init_names(cls: type) -> set[str]:
    """The global and attribute names `cls.__init__` uses (a cheap, class-level view of what it assigns)."""
    init = getattr(cls, "__init__", None)
    code = getattr(inspect.unwrap(init), "__code__", None) if init is not None else None
    return set(code.co_names) if code is not None else set()


class LayoutTypes(tuple[type[nn.Module], ...]):
    """A registry layer-type tuple holding a stand-in class (the name messages show) whose membership test admits
    every class `admits` accepts."""

    admits: Callable[[type], bool]

    def __new__(cls, stand_in: type[nn.Module], admits: Callable[[type], bool]) -> LayoutTypes:
        types = super().__new__(cls, (stand_in,))
        types.admits = admits
        return types

    def __contains__(self, item: object) -> bool:
        return isinstance(item, type) and self.admits(item)


def is_decoder_attention_class(cls: type) -> bool:
    names = init_names(cls)
    return {*SPLIT, "num_key_value_groups"} <= names or {*FUSED, "split_size"} <= names


def is_decoder_mlp_class(cls: type) -> bool:
    names = init_names(cls)
    return set(GATED_MLP) <= names or set(FUSED_MLP) <= names


def is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (a Linear with weight stored (in, out)), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and isinstance(module, nn.Module)


def is_projection(module: Any) -> bool:
    return type(module) is nn.Linear or is_conv1d(module)


def widths(layer: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear or Conv1D."""
    found = cast(Any, layer)
    return (found.out_features, found.in_features) if type(layer) is nn.Linear else (found.nf, found.nx)


def int_attr(module: nn.Module, name: str) -> int | None:
    value = vars(module).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class Attention:
    """An attention module's layout: head counts and size, and the names of its input and output projections
    (`inputs`: q, k, v for split attention, the fused c_attn alone otherwise)."""

    fused: bool
    heads: int
    kv_heads: int
    head_dim: int
    inputs: tuple[str, ...]
    output: str

    @property
    def rep(self) -> int:
        """Query heads per key/value head (`num_key_value_groups`)."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        """What pruning removes whole: key/value groups (one key/value head and its `rep` query heads)."""
        return self.kv_heads

    @property
    def blocks(self) -> int:
        """Blocks in each input projection's outputs, each holding every unit's rows (c_attn: query, key, value)."""
        return 3 if self.fused else 1

    def attributes(self, kept: int) -> dict[str, int]:
        """The module's integer attributes for `kept` units (GPT-2 reads `split_size`; Llama infers heads)."""
        return {"num_heads": kept, "split_size": kept * self.head_dim} if self.fused else {}


def _split_attention(module: nn.Module, head_dim: int) -> Attention | None:
    q, k, v, o = (cast(Any, getattr(module, name, None)) for name in SPLIT)
    groups = int_attr(module, "num_key_value_groups")
    if groups is None or not all(type(layer) is nn.Linear for layer in (q, k, v, o)):
        return None
    if q.out_features % head_dim or k.out_features % head_dim or not k.out_features:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if v.out_features != k.out_features or heads != kv_heads * groups or o.in_features != q.out_features:
        return None
    return Attention(False, heads, kv_heads, head_dim, SPLIT[:3], SPLIT[3])


def _fused_attention(module: nn.Module, head_dim: int) -> Attention | None:
    qkv, out = (cast(Any, getattr(module, name, None)) for name in FUSED)
    split, heads = int_attr(module, "split_size"), int_attr(module, "num_heads")
    if not (is_conv1d(qkv) and is_conv1d(out)) or split is None or heads is None:
        return None
    if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
        return None
    if split != heads * head_dim or qkv.nf != 3 * split or out.nx != split:
        return None
    return Attention(True, heads, heads, head_dim, FUSED[:1], FUSED[1])


def attention_of(module: nn.Module) -> Attention | None:
    """The module's decoder-attention layout, or None when it has none this project handles."""
    head_dim = int_attr(module, "head_dim")
    if head_dim is None or not is_decoder_attention_class(type(module)):
        return None
    return _split_attention(module, head_dim) or _fused_attention(module, head_dim)


@dataclass(frozen=True)
class Mlp:
    """A feed-forward module's layout: its width and the names of the layers producing and consuming it."""

    gated: bool
    width: int
    inputs: tuple[str, ...]
    output: str
    blocks = 1

    @property
    def units(self) -> int:
        return self.width

    def attributes(self, kept: int) -> dict[str, int]:
        return {"intermediate_size": kept}  # LlamaMLP holds it (its forward does not read it)


def mlp_of(module: nn.Module) -> Mlp | None:
    """The module's feed-forward layout (gated or GPT-2's), or None."""
    if not is_decoder_mlp_class(type(module)):
        return None
    for names, gated in ((GATED_MLP, True), (FUSED_MLP, False)):
        layers = [cast(Any, getattr(module, name, None)) for name in names]
        if not all(is_projection(layer) for layer in layers):
            continue
        *inputs, output = layers
        width = widths(inputs[0])[0]
        if all(widths(layer)[0] == width for layer in inputs) and widths(output)[1] == width:
            return Mlp(gated, width, names[:-1], names[-1])
    return None


def is_decoder_stack(module: nn.Module) -> bool:
    """A ModuleList of decoder blocks: every block holds exactly one recognised attention."""
    if type(module) is not nn.ModuleList or not len(module):
        return False
    return all(len(block_parts(block)[0]) == 1 for block in module)


def block_parts(block: nn.Module) -> tuple[list[tuple[str, Attention]], list[tuple[str, Mlp]]]:
    """The recognised attention and feed-forward modules of one block (names relative to it)."""
    attention, mlp = [], []
    for name, module in block.named_modules():
        if (found := attention_of(module)) is not None:
            attention.append((name, found))
        elif (ffn := mlp_of(module)) is not None:
            mlp.append((name, ffn))
    return attention, mlp


def decoder_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, module) for name, module in model.named_modules() if name and is_decoder_stack(module)]


# --------------------------------------------------------------------------- what each block kept


@dataclass(frozen=True)
class BlockShape:
    """One decoder block: its position, its index in the original model, query heads, key/value heads, head size
    and feed-forward width (None where the block has no recognised feed-forward module)."""

    index: int
    source: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int | None


@dataclass(frozen=True)
class DecoderLayout:
    """The shapes of a decoder stack's blocks; `fused` for GPT-2-style attention."""

    stack: str
    fused: bool
    blocks: tuple[BlockShape, ...]

    def heads(self) -> set[tuple[int, int, int]]:
        return {(b.heads, b.kv_heads, b.head_dim) for b in self.blocks}

    def ffn(self) -> set[int | None]:
        return {b.ffn for b in self.blocks}

    def uniform(self) -> bool:
        """Whether every block has the same shape (what a transformers config can describe)."""
        return len(self.heads()) == 1 and len(self.ffn()) == 1

    def global_fields(self, config: Any) -> tuple[dict[str, int], list[str]]:
        """The config fields these shapes set (block count always; heads and FFN width where every block agrees
        and the config can say it), and why any other cannot be set."""
        fused = self.fused
        fields = {"n_layer" if fused else "num_hidden_layers": len(self.blocks)}
        problems = []
        if len(self.heads()) == 1:
            heads, kv_heads, head_dim = next(iter(self.heads()))
            if not fused:
                fields.update(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
            elif heads * head_dim == getattr(config, "n_embd", None):
                fields["n_head"] = heads
            else:
                problems.append(
                    f"GPT-2's config derives the head size from n_embd / n_head: {heads} heads of "
                    f"{head_dim} cannot be described"
                )
        else:
            problems.append(f"blocks keep different heads (heads, key/value heads, size): {self._per_block('heads')}")
        moved = any(b.source != b.index for b in self.blocks)
        if fused and moved and getattr(config, "scale_attn_by_inverse_layer_idx", False):
            problems.append(
                "GPT-2 scales attention by 1 / (layer_idx + 1) from its original position; a config "
                "rebuilding the kept blocks at their new positions would scale them differently"
            )
        ffn = self.ffn()
        if len(ffn) == 1 and None not in ffn:
            fields["n_inner" if fused else "intermediate_size"] = cast(int, next(iter(ffn)))
        elif len(ffn) > 1:
            problems.append(f"blocks keep different feed-forward widths: {self._per_block('ffn')}")
        return fields, problems

    def hf_fields(self, config: Any) -> dict[str, int]:
        """The config fields a transformers model of these shapes needs; ValueError naming why when no config
        can describe them (blocks of different shapes, or GPT-2 heads whose size n_embd / n_head cannot give)."""
        fields, problems = self.global_fields(config)
        if problems:
            raise ValueError("; ".join(problems))
        return fields

    def _per_block(self, what: str) -> str:
        values = [(b.heads, b.kv_heads, b.head_dim) if what == "heads" else b.ffn for b in self.blocks]
        return ", ".join(f"{i}: {v}" for i, v in enumerate(values))


def _block_shape(index: int, source: int, block: nn.Module) -> BlockShape:
    attention, mlp = block_parts(block)
    layout = attention[0][1]
    ffn = mlp[0][1].width if len(mlp) == 1 else None
    return BlockShape(index, source, layout.heads, layout.kv_heads, layout.head_dim, ffn)


def decoder_layout(model: nn.Module) -> DecoderLayout | None:
    """The shapes of the model's decoder stack, read from its modules; None unless it has exactly one."""
    stacks = decoder_stacks(model)
    if len(stacks) != 1:
        return None
    name, stack = stacks[0]
    sources = getattr(stack, SOURCE_LAYERS, None) or tuple(range(len(stack)))
    blocks = tuple(_block_shape(i, source, block) for i, (source, block) in enumerate(zip(sources, stack, strict=True)))
    return DecoderLayout(name, block_parts(stack[0])[0][0][1].fused, blocks)


def _current(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    if key == "n_inner" and value is None:  # GPT-2: None means 4 × n_embd
        return 4 * getattr(config, "n_embd", 0)
    return value


def model_config(model: nn.Module) -> tuple[str, Any] | None:
    """(name of the module holding it, config): the model's transformers config — the first module's, in module
    order, whose `config` is an object with `to_dict` (the root's for a transformers model, the inner model's for a
    user's wrapper; transformers modules share one config object)."""
    for name, module in model.named_modules():
        config = vars(module).get("config")
        if config is not None and callable(getattr(config, "to_dict", None)):
            return name, config
    return None


def sync_config(model: nn.Module) -> dict[str, int]:
    """Set the model config's global shape fields that the blocks now agree on (`global_fields`); return those
    changed. A config field describing shapes the blocks no longer share keeps its old value."""
    layout, found = decoder_layout(model), model_config(model)
    if layout is None or found is None:
        return {}
    config = found[1]
    fields, _ = layout.global_fields(config)
    changed = {key: value for key, value in fields.items() if _current(config, key) != value}
    if {"num_attention_heads", "num_key_value_heads"} & set(changed):
        changed["head_dim"] = fields["head_dim"]  # explicit: Llama would derive hidden_size // heads
    for key, value in changed.items():
        setattr(config, key, value)
    return changed
