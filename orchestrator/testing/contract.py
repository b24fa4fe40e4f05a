"""The contract every technique passes: subclass `TechniqueContract` in a technique's tests (pytest collects
classes named `Test…`).

Decisions:
- A subclass states data, not tests: a valid spec (`make_spec`), settings just outside the valid ranges
  (`bad_spec_data`) and settings at their ends (`edge_spec_data`); the contract turns them into the checks every
  technique owes (forward runs, nothing grows, the artifact reloads bitwise, a seed fixes the result, specs
  round-trip through JSON, bad settings and unknown layers are one SpecError, edge settings give finite outputs,
  and every value the technique offers the search is a valid spec).
- The model and data are hooks (`build_model`, `build_context`): TinyCNN on random 1×8×8 images by default; a
  technique for other layers (attention, embeddings, decoder blocks) overrides them. Outputs are read through
  `Context.run`, so models called with a dict batch or returning a ModelOutput work too.
- Reload goes through the same artifact files the store writes and `measure` sizes, not a state-dict shortcut.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import techniques
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, read_artifact, write_artifact
from orchestrator.measure.size import count_weights, measure_artifact
from orchestrator.testing.models import TinyCNN, seeded, tiny_data
from techniques.packed.finalize import finalize


def make_context(seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
    """A context over 64 `tiny_data` images: calibration batches, seeded training epochs, accuracy, a teacher."""
    x, y = tiny_data(64, seed=seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(x), 16):
            idx = order[i : i + 16]
            yield x[idx], y[idx]

    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return techniques.Context(
        example_inputs=x[:4],
        seed=seed,
        calibration=lambda: (x[i : i + 16] for i in range(0, 64, 16)),
        train_batches=batches,
        task_loss=nn.functional.cross_entropy,
        evaluate=evaluate,
        teacher=teacher,
    )


def search_values(technique: techniques.Technique) -> Iterator[tuple[str, Any]]:
    """(setting, value) for every value the technique offers the search: per-layer choices but the "off" value
    (which never appears in a policy), global choices and both ends of global bounds."""
    settings = technique.search
    if settings is None:
        return
    if settings.per_layer is not None:
        per_layer = settings.per_layer
        yield from ((per_layer.setting, value) for value in per_layer.choices if value != per_layer.off)
    for declared in settings.globals:
        yield from ((declared.setting, value) for value in (*(declared.choices or ()), *(declared.bounds or ())))


class TechniqueContract:
    """Subclass, define `make_spec` (a valid spec that changes the model), `bad_spec_data` (`_data` dicts just
    outside the valid settings: each must raise SpecError) and `edge_spec_data` (`_data` dicts at the ends of the
    valid ranges: each must apply with finite outputs); override `build_model`/`build_context` for another model."""

    model_cls: type[nn.Module] = TinyCNN
    bad_spec_data: Sequence[Mapping[str, Any]] = ()
    edge_spec_data: Sequence[Mapping[str, Any]] = ()

    def make_spec(self) -> techniques.TechniqueSpec:
        raise NotImplementedError

    def build_model(self, seed: int = 0) -> nn.Module:
        """The model the technique compresses, with weights fixed by `seed`, in eval mode."""
        return seeded(self.model_cls, seed=seed)

    def build_context(self, seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
        """Inputs and data for the model (`example_inputs` is the batch outputs are compared on)."""
        return make_context(seed, teacher=teacher)

    def unknown_layer_spec(self) -> techniques.TechniqueSpec:
        """A spec addressing a layer the model does not have (override if the spec has no per-layer map)."""
        spec = self.make_spec()
        data = spec.to_json()["_data"]
        for name, layer_map in spec.layer_maps().items():
            data[name] = {**layer_map.as_dict(), "no_such_layer": next(iter(layer_map.values()))}
            return type(spec).from_data(data)
        pytest.skip("spec has no per-layer settings")

    def _apply(self, seed: int = 0) -> tuple[nn.Module, nn.Module, techniques.Context]:
        base, model = self.build_model(seed=0), self.build_model(seed=0)
        ctx = self.build_context(seed, teacher=self.build_model(seed=0))
        torch.manual_seed(seed)
        return base, techniques.apply_spec(model, self.make_spec(), ctx), ctx

    def test_forward_runs_and_output_shape_unchanged(self) -> None:
        base, model, ctx = self._apply()
        x = ctx.example_inputs
        with torch.no_grad():
            out = ctx.run(model.eval(), x)
            assert out.shape == ctx.run(base, x).shape
            assert torch.isfinite(out).all()
            assert ctx.run(finalize(model).eval(), x).shape == out.shape

    def test_parameters_and_artifact_do_not_grow(self) -> None:
        base, model, _ = self._apply()
        final = finalize(model)
        assert count_weights(final)[0] <= count_weights(base)[0]
        assert measure_artifact(final, self.build_model()) <= measure_artifact(base, self.build_model())

    def test_reload_reproduces_the_model_bitwise(self, tmp_path: Path) -> None:
        _, model, ctx = self._apply()
        final = finalize(model).eval()
        write_artifact(final, self.build_model(), tmp_path)
        structure, weights = (tmp_path / STRUCTURE).read_bytes(), (tmp_path / WEIGHTS).read_bytes()
        reloaded = read_artifact(structure, weights, self.build_model())
        assert [type(m) for m in reloaded.modules()] == [type(m) for m in final.modules()]
        expected, got = final.state_dict(), reloaded.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        with torch.no_grad():
            assert torch.equal(ctx.run(final, ctx.example_inputs), ctx.run(reloaded, ctx.example_inputs))

    def test_deterministic_under_seed(self) -> None:
        _, first, _ = self._apply(seed=3)
        _, second, _ = self._apply(seed=3)
        a, b = finalize(first).state_dict(), finalize(second).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    def test_spec_round_trips_through_json(self) -> None:
        spec = self.make_spec()
        doc = json.loads(json.dumps(spec.to_json()))
        assert techniques.spec_from_json(doc) == spec
        assert techniques.spec_from_json(doc).to_json() == spec.to_json()

    def test_bad_specs_raise_spec_error(self) -> None:
        spec_type = type(self.make_spec())
        assert self.bad_spec_data, "list some invalid settings in bad_spec_data"
        for data in self.bad_spec_data:
            with pytest.raises(techniques.SpecError):
                spec_type.from_data(data)
                pytest.fail(f"accepted {data!r}")

    def test_edge_values_apply_with_finite_outputs(self) -> None:
        spec_type = type(self.make_spec())
        assert self.edge_spec_data, "list settings at the ends of their valid ranges in edge_spec_data"
        for data in self.edge_spec_data:
            try:
                self._check_finite(spec_type.from_data(data))
            except Exception as exc:
                exc.add_note(f"settings: {data!r}")
                raise

    def _check_finite(self, spec: techniques.TechniqueSpec) -> None:
        ctx = self.build_context(teacher=self.build_model(seed=1))
        model = techniques.apply_spec(self.build_model(), spec, ctx)
        with torch.no_grad():
            assert torch.isfinite(ctx.run(model.eval(), ctx.example_inputs)).all()
            assert torch.isfinite(ctx.run(finalize(model).eval(), ctx.example_inputs)).all()

    def test_values_offered_to_the_search_are_valid_settings(self) -> None:
        spec = self.make_spec()
        data = spec.to_json()["_data"]
        for setting, value in search_values(techniques.get(spec.technique)):
            try:
                type(spec).from_data({**data, setting: value})
            except techniques.SpecError as exc:
                pytest.fail(f"the search offers {setting}={value!r}, which the spec refuses: {exc}")

    def test_unknown_layer_is_rejected(self) -> None:
        spec = self.unknown_layer_spec()
        with pytest.raises(techniques.SpecError, match="no_such_layer"):
            techniques.apply_spec(self.build_model(), spec, self.build_context())
