"""Built-in workloads, the user's `module:function` loader, and their bad-input errors."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orchestrator.errors import UserError
from orchestrator.workloads import SPLITS, Workload, resolve_workload
from orchestrator.workloads.cifar10 import TEST_FILE, TRAIN_FILES, make_cifar10, resnet18_cifar


def test_digits_splits_are_fixed_disjoint_and_complete(digits):
    sizes = {name: len(digits.splits[name]) for name in SPLITS}
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 1797
    assert sizes["calibration"] == 256
    again = resolve_workload("digits")
    for name in SPLITS:
        assert torch.equal(digits.splits[name].inputs, again.splits[name].inputs)
    train = {tuple(r) for r in digits.splits["train"].inputs.flatten(1).tolist()}
    test = [tuple(r) for r in digits.splits["test"].inputs.flatten(1).tolist()]
    # the bundled data has a handful of duplicate images; splits are by index, so overlap stays tiny
    assert sum(r in train for r in test) <= 5
    assert set(digits.splits["test"].targets.tolist()) == set(range(10))


@pytest.mark.slow
def test_digits_baseline_reaches_97_percent_and_is_cached(digits, digits_baseline, capfd):
    assert digits.evaluate(digits_baseline, "test") >= 0.97
    reloaded = resolve_workload("digits").load_baseline()
    assert "reusing cached baseline" in capfd.readouterr().err
    for key, value in digits_baseline.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])


def test_digits_workload_example_inputs_and_student(digits):
    x = digits.example_inputs(3)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    student = digits.build_student(0.5)
    assert student(x).shape == (3, 10)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in digits.build_model().parameters())


def write_cifar_dir(root: Path, per_batch: int = 12, seed: int = 0) -> Path:
    """A tiny directory in CIFAR-10's python format (the real layout and keys, random pixels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in (*TRAIN_FILES, TEST_FILE):
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with (root / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


@pytest.mark.slow
def test_cifar10_reads_a_local_directory_and_trains_a_cached_baseline(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar")
    workload = make_cifar10(root, epochs=1)
    assert len(workload.splits["train"]) + len(workload.splits["validation"]) == 5 * 12
    assert len(workload.splits["test"]) == 12
    x = workload.example_inputs(2)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    model = workload.load_baseline()
    assert model(x).shape == (2, 10)
    assert 0.0 <= workload.evaluate(model, "test") <= 1.0
    assert workload.build_student(0.5)(x).shape == (2, 10)


def test_cifar10_baseline_from_a_local_weights_file(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar")
    torch.manual_seed(0)
    model = resnet18_cifar()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    workload = resolve_workload("cifar10", data_dir=root, weights=tmp_path / "w.safetensors")
    loaded = workload.load_baseline()
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "data_batch_3").unlink(), "data_batch_3 is missing"),
        (lambda root: (root / "test_batch").write_bytes(b"not a pickle"), "test_batch is malformed"),
        (
            lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 5))})),
            "malformed",
        ),
    ],
)
def test_cifar10_malformed_directories_give_one_line_errors(tmp_path, damage, message):
    root = write_cifar_dir(tmp_path / "cifar", per_batch=4)
    damage(root)
    with pytest.raises(UserError, match=message) as info:
        make_cifar10(root)
    assert "\n" not in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


def test_cifar10_loader_refuses_code_in_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_cifar_dir(tmp_path / "cifar", per_batch=4)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(UserError, match="forbidden global"):
        make_cifar10(root)
    assert not (tmp_path / "should-not-exist").exists()


def test_cifar10_errors_for_missing_directory_and_weights(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_workload("cifar10", data_dir=tmp_path / "absent")
    with pytest.raises(UserError, match="needs --data-dir"):
        resolve_workload("cifar10")
    root = write_cifar_dir(tmp_path / "cifar", per_batch=4)
    with pytest.raises(UserError, match="weights .* do not exist"):
        resolve_workload("cifar10", data_dir=root, weights=tmp_path / "none.safetensors")


def test_user_workload_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_workload.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from orchestrator.workloads.data import Split
            from orchestrator.workloads import Workload

            def make_workload(data_dir=None):
                torch.manual_seed(0)
                x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
                split = Split(x, y)
                model = lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
                return Workload(
                    name="mine" if data_dir is None else f"mine@{data_dir}",
                    build_model=model,
                    load_baseline=model,
                    splits={"train": split, "calibration": split, "validation": split, "test": split},
                    fingerprint="mine-1",
                )

            def not_a_workload():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    workload = resolve_workload("my_workload:make_workload")
    assert isinstance(workload, Workload) and workload.name == "mine"
    assert resolve_workload("my_workload:make_workload", data_dir="d").name == "mine@d"
    assert 0.0 <= workload.evaluate(workload.load_baseline(), "test") <= 1.0
    with pytest.raises(UserError, match="not an orchestrator Workload"):
        resolve_workload("my_workload:not_a_workload")
    sys.modules.pop("my_workload", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet", "unknown workload 'imagenet'"),
        ("no_such_module_xyz:make", "cannot import workload module"),
        ("json:no_such_function", "has no callable 'no_such_function'"),
        (":make", "expected package.module:function"),
        ("json:", "expected package.module:function"),
    ],
)
def test_bad_workload_specs(spec, message):
    with pytest.raises(UserError, match=message):
        resolve_workload(spec)
