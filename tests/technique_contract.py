"""The contract every technique passes; each technique's tests subclass `TechniqueContract`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import techniques
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, read_artifact, write_artifact
from orchestrator.measure import count_weights, measure_artifact
from tests.tiny_models import TinyCNN, seeded, tiny_data


def make_context(seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
    x, y = tiny_data(64, seed=seed)

    def batches(epoch: int):
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


def finalize(model: nn.Module) -> nn.Module:
    from techniques.finalize import finalize as _finalize

    return _finalize(model)


class TechniqueContract:
    """Subclass and define `make_spec` (a valid spec that changes TinyCNN) and `bad_spec_data`
    (a list of `_data` dicts that must be rejected with SpecError)."""

    model_cls: type[nn.Module] = TinyCNN
    bad_spec_data: list[dict] = []

    def make_spec(self) -> techniques.TechniqueSpec:
        raise NotImplementedError

    def unknown_layer_spec(self) -> techniques.TechniqueSpec:
        """A spec addressing a layer the model does not have (override if the spec has no per-layer map)."""
        spec = self.make_spec()
        data = spec.to_json()["_data"]
        for name, layer_map in spec.layer_maps().items():
            data[name] = {**layer_map.as_dict(), "no_such_layer": next(iter(layer_map.values()))}
            return type(spec).from_data(data)
        pytest.skip("spec has no per-layer settings")

    def _apply(self, seed: int = 0) -> tuple[nn.Module, nn.Module, techniques.Context]:
        base = seeded(self.model_cls, seed=0)
        ctx = make_context(seed, teacher=seeded(self.model_cls, seed=0))
        torch.manual_seed(seed)
        model = techniques.apply_spec(seeded(self.model_cls, seed=0), self.make_spec(), ctx)
        return base, model, ctx

    def test_forward_runs_and_output_shape_unchanged(self) -> None:
        base, model, ctx = self._apply()
        x = ctx.example_inputs
        with torch.no_grad():
            out = model.eval()(x)
            assert out.shape == base(x).shape
            assert torch.isfinite(out).all()
            assert finalize(model).eval()(x).shape == out.shape

    def test_parameters_and_artifact_do_not_grow(self) -> None:
        base, model, _ = self._apply()
        final = finalize(model)
        assert count_weights(final)[0] <= count_weights(base)[0]
        assert measure_artifact(final, self.model_cls()) <= measure_artifact(base, self.model_cls())

    def test_reload_reproduces_the_model_bitwise(self, tmp_path) -> None:
        _, model, ctx = self._apply()
        final = finalize(model).eval()
        write_artifact(final, self.model_cls(), tmp_path)
        structure, weights = (tmp_path / STRUCTURE).read_bytes(), (tmp_path / WEIGHTS).read_bytes()
        reloaded = read_artifact(structure, weights, self.model_cls())
        assert [type(m) for m in reloaded.modules()] == [type(m) for m in final.modules()]
        expected, got = final.state_dict(), reloaded.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        with torch.no_grad():
            assert torch.equal(final(ctx.example_inputs), reloaded(ctx.example_inputs))

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
        assert self.bad_spec_data, "list some invalid settings"
        for data in self.bad_spec_data:
            with pytest.raises(techniques.SpecError):
                spec_type.from_data(data)

    def test_unknown_layer_is_rejected(self) -> None:
        spec = self.unknown_layer_spec()
        with pytest.raises(techniques.SpecError, match="no_such_layer"):
            techniques.apply_spec(seeded(self.model_cls), spec, make_context())
