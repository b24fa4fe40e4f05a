"""Hostile input to the workload loaders: a user's broken `module:function`, malformed CIFAR-10 batches.

Each case must end in one `UserError` line (the CLI's `error: ...`, exit code 2), never a traceback.
"""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import UserError
from orchestrator.workloads import Workload, resolve_workload
from orchestrator.workloads.cifar10 import load_splits, make_cifar10, read_batch
from tests.test_workloads import write_cifar_dir
from tests.waiting import HANG_S

REPO = Path(__file__).resolve().parents[1]
_serial = itertools.count()

A_WORKLOAD = """
import torch
from torch import nn
from orchestrator.workloads import Split, Workload

def make(data_dir=None):
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    split = Split(x, y)
    model = lambda: nn.Linear(4, 2)
    return Workload(
        name="ok", build_model=model, load_baseline=model,
        splits={"train": split, "calibration": split, "validation": split, "test": split},
        fingerprint="ok-1",
    )
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module (or `package.module`) with a unique name under tmp_path; returns its dotted name.

    Everything imported under that name is dropped from sys.modules afterwards, so no test sees another's.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str, *, package: bool = False) -> str:
        name = f"hostile_workload_{os.getpid()}_{next(_serial)}"
        names.append(name)
        if package:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
            (tmp_path / name / "bad.py").write_text(textwrap.dedent(source))
            return f"{name}.bad"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    yield write
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[loaded]


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise RuntimeError('boom')\n", r"failed to import: RuntimeError: boom$"),
        ("raise ValueError('bad setting\\nmore detail\\neven more')\n", r"failed to import: ValueError: bad setting$"),
        ("def broken(:\n    pass\n", r"failed to import: SyntaxError: "),
        ("import sys\nsys.exit(3)\n", r"failed to import: SystemExit: 3$"),
        ("import sys\nsys.exit()\n", r"failed to import: SystemExit$"),
        ("import sys\nsys.exit('cannot run here')\n", r"failed to import: SystemExit: cannot run here$"),
        ("1 / 0\n", r"failed to import: ZeroDivisionError: division by zero$"),
        ("import no_such_dependency_xyz\n", r"cannot import workload module .*: No module named 'no_such_dep"),
    ],
    ids=[
        "runtime-error",
        "multiline-value-error",
        "syntax-error",
        "sys-exit-3",
        "sys-exit-bare",
        "sys-exit-text",
        "zero-division",
        "missing-dependency",
    ],
)
def test_a_module_that_fails_at_import_is_one_line_naming_it(user_module, source, message):
    name = user_module(source)
    with pytest.raises(UserError, match=message) as info:
        resolve_workload(f"{name}:make")
    assert f"'{name}'" in one_line(info)


def test_a_package_module_that_raises_at_import_is_named_in_full(user_module):
    name = user_module("raise RuntimeError('boom')\n", package=True)
    with pytest.raises(UserError) as info:
        resolve_workload(f"{name}:make")
    assert one_line(info) == f"workload module '{name}' failed to import: RuntimeError: boom"


@pytest.mark.parametrize(
    "source, data_dir, message",
    [
        (
            "def make(data_dir=None):\n    raise ValueError('no data in ' + str(data_dir))\n",
            None,
            r"failed: ValueError: no data in None$",
        ),
        (
            "def make(data_dir=None):\n    raise RuntimeError('first line\\nsecond line')\n",
            "somewhere",
            r"failed: RuntimeError: first line$",
        ),
        ("def make():\n    return 1\n", "somewhere", r"failed: TypeError: .*unexpected keyword argument 'data_dir'"),
        ("def make():\n    import sys\n    sys.exit(4)\n", None, r"failed: SystemExit: 4$"),
        ("def make():\n    return {}['missing']\n", None, r"failed: KeyError: 'missing'$"),
    ],
    ids=["value-error", "multiline-with-data-dir", "no-data-dir-parameter", "sys-exit", "key-error"],
)
def test_a_factory_that_raises_is_one_line_naming_module_and_function(user_module, source, data_dir, message):
    name = user_module(source)
    with pytest.raises(UserError, match=message) as info:
        resolve_workload(f"{name}:make", data_dir=data_dir)
    assert one_line(info).startswith(f"workload function '{name}:make' failed: ")


def test_a_users_own_user_error_and_a_wrong_return_type_stay_as_they_were(user_module):
    name = user_module(
        """
        from orchestrator.errors import UserError

        def make():
            raise UserError("set MY_DATA first")

        def wrong():
            return [1, 2, 3]
        """
    )
    with pytest.raises(UserError, match=r"^set MY_DATA first$"):
        resolve_workload(f"{name}:make")
    with pytest.raises(UserError, match=r"returned list, not an orchestrator Workload"):
        resolve_workload(f"{name}:wrong")


def test_a_working_module_still_loads(user_module):
    name = user_module(A_WORKLOAD)
    assert isinstance(resolve_workload(f"{name}:make"), Workload)


def test_keyboard_interrupt_is_never_swallowed(user_module):
    name = user_module("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        resolve_workload(f"{name}:make")
    name = user_module("def make():\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        resolve_workload(f"{name}:make")


def test_a_relative_module_name_is_a_bad_spec():
    with pytest.raises(UserError, match="expected package.module:function"):
        resolve_workload(".relative:make")


def test_cli_prints_one_error_line_and_exits_2_for_a_module_that_raises(tmp_path):
    (tmp_path / "cli_hostile_workload.py").write_text("raise RuntimeError('boom')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "baseline", "--workload", "cli_hostile_workload:make"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=HANG_S,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines == ["error: workload module 'cli_hostile_workload' failed to import: RuntimeError: boom"], done.stderr


# --- CIFAR-10 batches --------------------------------------------------------------------------------


def cifar_batch(data, labels, **extra) -> bytes:
    """One batch pickled as the CIFAR-10 python files are: protocol 2, bytes keys."""
    batch = {b"batch_label": b"training batch 1 of 5", b"data": data, b"labels": labels, **extra}
    return pickle.dumps({k: v for k, v in batch.items() if v is not None}, protocol=2)


def pixels(n: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 3072)).astype(dtype)


@pytest.mark.parametrize(
    "content, message",
    [
        (cifar_batch(np.zeros((0, 3072), np.uint8), []), r"holds no images"),
        (cifar_batch(np.zeros((0,), np.uint8), []), r"holds no images"),
        (cifar_batch([], []), r"holds no images"),
        (cifar_batch(pixels(3, np.float32), [0, 1, 2]), r"pixel data must be uint8 \(0-255\), got float32$"),
        (cifar_batch(pixels(3, np.float64), [0, 1, 2]), r"pixel data must be uint8 \(0-255\), got float64$"),
        (cifar_batch(pixels(3).astype(bool), [0, 1, 2]), r"pixel data must be uint8 \(0-255\), got bool$"),
        (cifar_batch(pixels(3, np.int16) + 100, [0, 1, 2]), r"pixel values must be 0-255, found .*355"),
        (cifar_batch(pixels(3, np.int32) - 1, [0, 1, 2]), r"pixel values must be 0-255, found values from -1"),
        (cifar_batch(pixels(12), [3] * 11 + [12]), r"labels must be 0-9, found 12$"),
        (cifar_batch(pixels(12), [-1] + [3] * 10 + [10]), r"labels must be 0-9, found -1, 10$"),
        (cifar_batch(pixels(4), np.array([0, 1, 2, 99], np.int64)), r"labels must be 0-9, found 99$"),
        (cifar_batch(pixels(4), [0.0, 1.0, 2.0, 3.0]), r"labels must be a flat list of integers, got float64"),
        (cifar_batch(pixels(4), [[0, 1], [2, 3]]), r"labels must be a flat list of integers"),
        (cifar_batch(pixels(12), [0] * 11), r"12 images but 11 labels$"),
        (cifar_batch(pixels(3), [0] * 4), r"3 images but 4 labels$"),
        (cifar_batch(np.zeros((2, 5), np.uint8), [0, 1]), r"10 values, not a multiple of 3\*32\*32 = 3072"),
        (cifar_batch(np.zeros(3072 + 1, np.uint8), [0]), r"3073 values, not a multiple of 3\*32\*32 = 3072"),
        (cifar_batch(pixels(2), None), r"no b'labels' entry$"),
        (cifar_batch(None, [0, 1]), r"no b'data' entry$"),
        (pickle.dumps([1, 2, 3], protocol=2), r"expected a dict of b'data' and b'labels', found list"),
        (cifar_batch([[1, 2], [3]], [0]), r"b'data' and b'labels' must be arrays or flat lists"),
    ],
    ids=[
        "empty-2d",
        "empty-1d",
        "empty-lists",
        "float32",
        "float64",
        "bool",
        "int16-over-255",
        "int32-negative",
        "label-12",
        "labels-negative-and-10",
        "label-99-array",
        "float-labels",
        "nested-labels",
        "fewer-labels",
        "more-labels",
        "size-10",
        "size-3073",
        "no-labels-key",
        "no-data-key",
        "not-a-dict",
        "ragged-data",
    ],
)
def test_malformed_cifar_batches_say_what_is_wrong_and_name_the_file(tmp_path, content, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_batch(path)
    assert str(path) in one_line(info)
    assert "forbidden global" not in str(info.value)


def test_a_malformed_batch_in_a_directory_is_named(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar", per_batch=4)
    (root / "data_batch_4").write_bytes(cifar_batch(pixels(4, np.float32), [0, 1, 2, 3]))
    with pytest.raises(UserError, match=r"data_batch_4 is malformed: pixel data must be uint8") as info:
        load_splits(root)
    one_line(info)
    (root / "test_batch").write_bytes(cifar_batch(np.zeros((0, 3072), np.uint8), []))
    (root / "data_batch_4").write_bytes(cifar_batch(pixels(4), [0, 1, 2, 3]))
    with pytest.raises(UserError, match=r"test_batch holds no images"):
        make_cifar10(root)


def test_other_integer_pixel_arrays_within_0_255_are_accepted(tmp_path):
    path = tmp_path / "data_batch_1"
    expected = pixels(3)
    for dtype in (np.int64, np.int16, np.uint16):
        path.write_bytes(cifar_batch(expected.astype(dtype), np.array([9, 0, 5], np.int32)))
        data, labels = read_batch(path)
        assert data.dtype == np.uint8 and data.shape == (3, 3, 32, 32)
        assert np.array_equal(data.reshape(3, -1), expected)
        assert labels.dtype == np.int64 and labels.tolist() == [9, 0, 5]
    path.write_bytes(cifar_batch(expected.tolist(), [1, 2, 3]))  # plain nested lists of ints
    assert np.array_equal(read_batch(path)[0].reshape(3, -1), expected)


def test_bytes_stand_in_only_builds_empty_bytes(tmp_path):
    """`__builtin__.bytes` is allowed only as a zero-argument stand-in: bytes(n) could allocate n bytes."""
    path = tmp_path / "data_batch_1"
    # PROTO 2, GLOBAL __builtin__.bytes, BININT 2**30, TUPLE1, REDUCE, STOP: bytes(2**30) with the real builtin
    path.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00@\x85R.")
    with pytest.raises(UserError, match=r"data_batch_1 is malformed: .*takes 0 positional arguments"):
        read_batch(path)
    path.write_bytes(b"\x80\x02cbuiltins\nbytearray\n)R.")
    with pytest.raises(UserError, match=r"forbidden global builtins\.bytearray"):
        read_batch(path)


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "cifar").write_text("not a directory")
    with pytest.raises(UserError, match=r"cifar is not a directory$"):
        load_splits(tmp_path / "cifar")
