"""Compression policies: ordered technique steps as versioned JSON, validated before any work.

A policy document::

    {"_type": "policy", "_version": 1, "seed": 0,
     "steps": [{"_type": "lowrank", "_version": 1, "_data": {"rank": {"fc1": 0.5}}}, ...]}

Per-layer settings address layers by their names in the *baseline* model (exact name, then `re:` regex,
then `_default`); a setting for a layer that a structural step replaced also applies to its parts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from torch import nn

import techniques
from orchestrator.errors import UserError
from orchestrator.files.jsondoc import parse_json
from techniques import LAYER_DEFAULT, SpecError, TechniqueSpec

POLICY_VERSION = 1
MAX_SEED = 2**32 - 1  # what every RNG the chain seeds (torch, numpy, shuffling) accepts
_TOP_LEVEL = {"_type", "_version", "seed", "steps", "name"}


class PolicyError(UserError):
    """A policy document is malformed or does not fit the model; the message names step and layer."""


@dataclass(frozen=True)
class Policy:
    """An ordered chain of technique specs plus the seed that makes applying it deterministic."""

    steps: tuple[TechniqueSpec, ...] = ()
    seed: int = 0
    name: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"_type": "policy", "_version": POLICY_VERSION, "seed": self.seed}
        if self.name:
            doc["name"] = self.name
        doc["steps"] = [step.to_json() for step in self.steps]
        return doc

    def dumps(self) -> str:
        """JSON text in a fixed key order; per-layer rules keep their order, since the first matching `re:`
        rule wins, so `Policy.loads(p.dumps())` applies exactly what `p` does (and equal policies give equal
        bytes)."""
        return json.dumps(self.to_json(), indent=2)

    def techniques(self) -> list[str]:
        return [step.technique for step in self.steps]

    def fine_tune_epochs(self) -> int | None:
        """Fine-tuning epochs the policy will run (0 without a fine-tuning step); None when a budget of optimiser
        steps may end the fine-tune sooner, so the count is known only afterwards."""
        step = next((step for step in self.steps if techniques.get(step.technique).fine_tunes), None)
        if step is None:
            return 0
        return None if getattr(step, "steps", None) else cast(Any, step).epochs  # the fine-tuning spec's field

    @classmethod
    def from_json(cls, doc: Any) -> Policy:
        """Build a policy from a parsed document; only registered technique types are constructed."""
        if not isinstance(doc, Mapping):
            raise PolicyError(f"a policy must be a JSON object, got {type(doc).__name__}")
        if doc.get("_type") != "policy":
            raise PolicyError('a policy document needs "_type": "policy"')
        if doc.get("_version") != POLICY_VERSION:
            raise PolicyError(f"unsupported policy version {doc.get('_version')!r} (this build reads {POLICY_VERSION})")
        unknown = sorted(set(doc) - _TOP_LEVEL)
        if unknown:
            raise PolicyError(f"unknown policy field(s) {', '.join(unknown)}")
        seed = check_seed(doc.get("seed", 0))
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise PolicyError(f"name must be a string, got {name!r}")
        steps_doc = doc.get("steps")
        if not isinstance(steps_doc, list):
            raise PolicyError('"steps" must be a list of technique steps')
        steps = []
        for index, step in enumerate(steps_doc):
            try:
                steps.append(techniques.spec_from_json(step))
            except SpecError as exc:
                raise PolicyError(f"step {index + 1}: {exc}") from None
        policy = cls(tuple(steps), seed, name)
        check_order(policy)
        return policy

    @classmethod
    def loads(cls, text: str) -> Policy:
        return cls.from_json(parse_json(text, "policy", error=PolicyError))

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise PolicyError(f"policy {path} is not text") from None
        return cls.loads(text)


def check_seed(seed: Any) -> int:
    """The seed, if it is an integer every random generator of the chain accepts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PolicyError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


def check_order(policy: Policy) -> None:
    """Steps must follow the canonical order (the techniques' stages: student → low-rank → head pruning →
    decoder head pruning → structured → FFN → depth pruning → unstructured → quantization → distillation) and
    name each technique once."""
    seen: dict[str, int] = {}
    previous: techniques.Technique | None = None
    for index, step in enumerate(policy.steps, start=1):
        technique = techniques.get(step.technique)
        if step.technique in seen:
            raise PolicyError(f"step {index}: {step.technique} already appears as step {seen[step.technique]}")
        seen[step.technique] = index
        if previous is not None and technique.stage < previous.stage:
            order = ", ".join(techniques.registry())
            raise PolicyError(f"step {index}: {technique.name} cannot follow {previous.name} (order: {order})")
        previous = technique


def validate_for_model(policy: Policy, model: nn.Module) -> None:
    """Check every per-layer key against the model's layers: it must address a layer the step handles."""
    modules = dict(model.named_modules())
    for index, step in enumerate(policy.steps, start=1):
        technique = techniques.get(step.technique)
        eligible = [name for name, _ in techniques.layers_of(model, technique.layer_types)]
        kinds = "/".join(t.__name__ for t in technique.layer_types)
        for setting, layer_map in step.layer_maps().items():
            for key in layer_map.as_dict():
                if key == LAYER_DEFAULT:
                    continue
                if key.startswith("re:"):
                    pattern = re.compile(key[3:])
                    if not any(pattern.fullmatch(name) for name in eligible):
                        raise PolicyError(
                            f"step {index} ({step.technique}.{setting}): {key!r} matches no {kinds} layer"
                        )
                elif key not in modules:
                    raise PolicyError(f"step {index} ({step.technique}.{setting}): the model has no layer {key!r}")
                elif key not in eligible:
                    kind = techniques.base_type(modules[key]).__name__
                    raise PolicyError(
                        f"step {index} ({step.technique}.{setting}): layer {key!r} is a {kind}; "
                        f"{step.technique} handles {kinds}"
                    )
