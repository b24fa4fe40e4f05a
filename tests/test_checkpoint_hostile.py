"""Hostile checkpoints and full disks: one clear error line, no code run, nothing left half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.files import weights
from orchestrator.measure import evaluate_checkpoint
from orchestrator.policy import Policy
from orchestrator.workloads import Workload
from orchestrator.workloads.data import Split
from orchestrator.workloads.digits import DigitsCNN
from tests.test_policy import policy_doc, step

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests.test_checkpoint_hostile:make_tiny"
POLICY = policy_doc(step("lowrank", rank={"fc1": 0.5}), step("quantization", bits=8))
ENOSPC = "No space left on device"


def make_tiny() -> Workload:
    """A workload with an untrained DigitsCNN and eight blank images: no baseline to train."""
    split = Split(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    return Workload(
        name="tiny",
        build_model=DigitsCNN,
        load_baseline=DigitsCNN,
        splits={s: split for s in ("train", "calibration", "validation", "test")},
        fingerprint="tiny-1",
    )


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return make_tiny()


@pytest.fixture(scope="module")
def applied(tiny):
    torch.manual_seed(0)
    return executor.apply(Policy.from_json(POLICY), tiny)


@pytest.fixture(scope="module")
def saved(applied, tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    store.save(applied.model, applied.policy, applied.metrics, tiny, str(path))
    return path


def tamper(
    saved: Path,
    target: Path,
    files: dict[str, bytes | None] | None = None,
    manifest: Callable[[dict[str, Any]], Any] | None = None,
) -> Path:
    """A copy of `saved` with files replaced (None: deleted), the manifest's sha256 and bytes updated to
    match, then `manifest` applied to the manifest document."""
    shutil.copytree(saved, target)
    doc = json.loads((target / store.MANIFEST).read_text())
    for name, data in (files or {}).items():
        if data is None:
            (target / name).unlink()
            continue
        (target / name).write_bytes(data)
        if name in doc["files"]:
            doc["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if manifest is not None:
        doc = manifest(doc)
    if store.MANIFEST not in (files or {}):
        (target / store.MANIFEST).write_text(json.dumps(doc))
    return target


def _set(path: str, value: Any) -> Callable[[Any], Any]:
    """An edit of a JSON document setting (or, with value DELETE, removing) the `/`-separated path."""

    def edit(doc: Any) -> Any:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = doc
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return doc

    return edit


DELETE = object()


def _structure(saved: Path, edit: Callable[[Any], Any]) -> dict[str, bytes | None]:
    return {store.STRUCTURE: json.dumps(edit(json.loads((saved / store.STRUCTURE).read_text()))).encode()}


# name → (files to replace given the saved checkpoint, manifest edit, words the error must contain)
HOSTILE: dict[str, tuple[Callable[[Path], dict[str, bytes | None]], Callable[[Any], Any] | None, str]] = {
    "manifest-is-a-list": (lambda s: {}, lambda doc: [doc], "manifest.json must be a JSON object, not a list"),
    "manifest-not-json": (lambda s: {store.MANIFEST: b"{"}, None, "manifest.json is not valid JSON"),
    "manifest-too-deep": (lambda s: {store.MANIFEST: b"[" * 100_000}, None, "manifest.json is not valid JSON"),
    "format-missing": (lambda s: {}, _set("format", DELETE), "manifest.json: 'format' is missing"),
    "format-string": (lambda s: {}, _set("format", "1"), "'format' must be an integer, not a string"),
    "format-true": (lambda s: {}, _set("format", True), "'format' must be an integer, not true"),
    "format-2": (lambda s: {}, _set("format", 2), "unsupported checkpoint format 2"),
    "workload-missing": (lambda s: {}, _set("workload", DELETE), "'workload' is missing"),
    "workload-number": (lambda s: {}, _set("workload", 5), "'workload' must be a string"),
    "fingerprint-list": (lambda s: {}, _set("workload_fingerprint", []), "'workload_fingerprint' must be a string"),
    "files-empty-structure-deleted": (
        lambda s: {store.STRUCTURE: None},
        _set("files", {}),
        "'files' does not list model.safetensors",
    ),
    "files-a-list": (lambda s: {}, _set("files", []), "'files' must be an object, not a list"),
    "files-omit-metrics": (lambda s: {}, _set("files/metrics.json", DELETE), "'files' does not list metrics.json"),
    "files-unknown": (lambda s: {}, _set("files/..%2Fetc", {}), "unknown file(s) '..%2Fetc'"),
    "entry-not-object": (lambda s: {}, _set("files/policy.json", "abc"), "files['policy.json'] must be a JSON object"),
    "entry-lacks-sha256": (lambda s: {}, _set("files/policy.json/sha256", DELETE), "'sha256' is missing"),
    "entry-sha256-not-hex": (lambda s: {}, _set("files/policy.json/sha256", "x" * 64), "64 lowercase hex"),
    "entry-lacks-bytes": (lambda s: {}, _set("files/policy.json/bytes", DELETE), "'bytes' is missing"),
    "entry-bytes-string": (lambda s: {}, _set("files/policy.json/bytes", "300"), "'bytes' must be an integer"),
    "bytes-zero": (lambda s: {}, _set("files/model.safetensors/bytes", 0), "model.safetensors is corrupted"),
    "bytes-negative": (lambda s: {}, _set("files/model.safetensors/bytes", -1), "'bytes' must not be negative"),
    "artifact-files-unlisted": (lambda s: {}, _set("artifact_files/1", "extra.bin"), "'artifact_files' names"),
    "artifact-files-string": (lambda s: {}, _set("artifact_files", "x"), "'artifact_files' must be a list"),
    "versions-list": (lambda s: {}, _set("versions", [1]), "'versions' must be an object"),
    "weights-missing": (lambda s: {store.WEIGHTS: None}, None, "model.safetensors is missing"),
    "weights-garbage": (lambda s: {store.WEIGHTS: b"\0" * 64}, None, "checkpoint does not rebuild"),
    "metrics-is-a-list": (lambda s: {store.METRICS: b"[1]"}, None, "metrics.json must be a JSON object, not a list"),
    "metrics-validation-string": (
        lambda s: {store.METRICS: b'{"validation": "high"}'},
        None,
        "metrics.json: 'validation' must be a number",
    ),
    "structure-not-json": (lambda s: {store.STRUCTURE: b"\xff"}, None, "structure.json is not valid JSON"),
    "structure-modules-string": (
        lambda s: {store.STRUCTURE: b'{"format": 1, "modules": "xyz"}'},
        None,
        "structure.json: 'modules' must be a list, not a string",
    ),
    "structure-format-missing": (
        lambda s: {store.STRUCTURE: b'{"modules": []}'},
        None,
        "structure.json: 'format' is missing",
    ),
    "structure-entry-number": (
        lambda s: _structure(s, _set("modules/0", 5)),
        None,
        "structure.json modules[0] must be a JSON object",
    ),
    "structure-entry-lacks-name": (
        lambda s: _structure(s, _set("modules/0/name", DELETE)),
        None,
        "modules[0]: 'name' is missing",
    ),
    "structure-entry-lacks-type": (
        lambda s: _structure(s, _set("modules/0/type", DELETE)),
        None,
        "modules[0]: 'type' is missing",
    ),
    "structure-entry-lacks-config": (
        lambda s: _structure(s, _set("modules/0/config", DELETE)),
        None,
        "modules[0]: 'config' is missing",
    ),
    "structure-entry-config-list": (
        lambda s: _structure(s, _set("modules/0/config", [])),
        None,
        "modules[0]: 'config' must be an object",
    ),
    "structure-path-missing": (
        lambda s: _structure(s, _set("modules/0/name", "nowhere.conv")),
        None,
        "names module 'nowhere.conv', which the model does not have",
    ),
    "structure-path-new-attribute": (
        lambda s: _structure(s, _set("modules/0/name", "__class__")),
        None,
        "names module '__class__', which the model does not have",
    ),
    "structure-type-os-system": (
        lambda s: _structure(s, _set("modules/0/type", "os.system")),
        None,
        "unknown module type 'os.system'",
    ),
    "structure-type-module": (
        lambda s: _structure(s, _set("modules/0/type", "Module")),
        None,
        "unknown module type 'Module'",
    ),
    "structure-builtin-extra-key": (
        lambda s: _structure(s, _set("modules/3/config", {"device": "meta"})),
        None,
        "Sequential config has keys ['device'], not []",
    ),
    "structure-packed-negative-size": (
        lambda s: _structure(s, _set("modules/4/config/in_features", -5)),
        None,
        "bad structure entry 'fc1.0'",
    ),
    "structure-packed-zero-size": (
        lambda s: _structure(s, _set("modules/4/config/in_features", 0)),
        None,
        "bad structure entry 'fc1.0'",
    ),
    "structure-packed-bad-kwarg": (
        lambda s: _structure(s, _set("modules/4/config/device", "cuda:9")),
        None,
        "bad structure entry 'fc1.0'",
    ),
    "manifest-5000-digit-integer": (
        lambda s: {store.MANIFEST: b'{"format": ' + b"9" * 5000 + b"}"},
        None,
        "manifest.json is not valid JSON: Exceeds the limit",
    ),
    "metrics-5000-digit-integer": (
        lambda s: {store.METRICS: b'{"validation": ' + b"9" * 5000 + b"}"},
        None,
        "metrics.json is not valid JSON",
    ),
    "metrics-400-digit-integer": (
        lambda s: {store.METRICS: b'{"validation": 0.5, "speedup": ' + b"9" * 400 + b"}"},
        None,
        "metrics.json: 'speedup' is not a finite number",
    ),
    "metrics-nan": (lambda s: {store.METRICS: b'{"validation": NaN}'}, None, "NaN is not a number JSON allows"),
    "metrics-1e400": (lambda s: {store.METRICS: b'{"validation": 1e400}'}, None, "1e400 is past a float's range"),
    "structure-5000-digit-integer": (
        lambda s: {
            store.STRUCTURE: _structure(s, _set("modules/4/config/in_features", "@"))[store.STRUCTURE].replace(
                b'"@"', b"9" * 5000
            )
        },
        None,
        "structure.json is not valid JSON",
    ),  # fmt: skip
    "structure-400-digit-size": (
        lambda s: _structure(s, _set("modules/4/config/in_features", 10**400)),
        None,
        "bad structure entry 'fc1.0'",
    ),
    "policy-5000-digit-seed": (
        lambda s: {store.POLICY: json.dumps(POLICY).replace('"seed": 0', '"seed": ' + "9" * 5000).encode()},
        None,
        "policy.json is not valid JSON",
    ),
    "policy-a-list": (lambda s: {store.POLICY: b"[1]"}, None, "policy.json is not a valid policy"),
    "policy-steps-string": (
        lambda s: {store.POLICY: json.dumps({**POLICY, "steps": "x"}).encode()},
        None,
        "policy.json is not a valid policy",
    ),
    "policy-unknown-technique": (
        lambda s: {store.POLICY: json.dumps(policy_doc(step("os.system", x=1))).encode()},
        None,
        "policy.json is not a valid policy",
    ),
}


def test_the_saved_structure_is_what_the_hostile_cases_edit(saved):
    modules = json.loads((saved / store.STRUCTURE).read_text())["modules"]
    assert [m["name"] for m in modules] == ["conv1", "conv2", "conv3", "fc1", "fc1.0", "fc1.1", "fc2"]
    assert modules[3]["type"] == "Sequential" and modules[4]["type"] == "PackedLinear"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hand_edited_checkpoints_give_one_checkpoint_error_line(case, saved, tiny, tmp_path, capsys):
    files, manifest, words = HOSTILE[case]
    path = tamper(saved, tmp_path / "ckpt", files(saved), manifest)
    with pytest.raises(store.CheckpointError) as caught:
        store.load(str(path), tiny)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    code = main(["evaluate", str(path), "--workload", TINY, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_an_untouched_checkpoint_still_loads_and_evaluates_with_the_users_workload(saved, tiny, applied):
    checkpoint = store.load(str(saved), tiny)
    x = tiny.example_inputs(4)
    with torch.inference_mode():
        assert torch.equal(checkpoint.model(x), applied.model(x))
    metrics = evaluate_checkpoint(str(saved), workload=TINY, device="cpu")
    assert metrics["size_bytes"] == applied.metrics["size_bytes"]


# --------------------------------------------------------------------------- a checkpoint never runs code


def _named(saved: Path, target: Path, workload: str) -> Path:
    return tamper(saved, target, manifest=_set("workload", workload))


def test_a_checkpoint_of_a_user_workload_asks_for_workload(saved):
    with pytest.raises(store.CheckpointError, match="workload 'tiny', which is not built in.*--workload"):
        evaluate_checkpoint(str(saved), device="cpu")


def test_os_abort_named_by_a_checkpoint_is_not_called(saved, tmp_path):
    path = _named(saved, tmp_path / "ckpt", "os:abort")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "evaluate", str(path), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'os:abort', which is not built in" in lines[0]


def test_this_named_by_a_checkpoint_is_not_imported(saved, tmp_path, capsys):
    path = _named(saved, tmp_path / "ckpt", "this:s")
    sys.modules.pop("this", None)
    with pytest.raises(UserError, match="'this:s', which is not built in"):
        evaluate_checkpoint(str(path), device="cpu")
    assert "this" not in sys.modules
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


def test_a_helper_beside_the_checkpoint_is_not_imported(saved, tmp_path):
    path = _named(saved, tmp_path / "ckpt", "ckpt_helper:make")
    marker = tmp_path / "imported"
    (path / "ckpt_helper.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            Path({str(marker)!r}).write_text("ran")
            def make():
                raise SystemExit(0)
            """
        )
    )
    done = subprocess.run(  # run from the checkpoint's directory, where `python -m` imports from
        [sys.executable, "-m", "orchestrator", "evaluate", ".", "--device", "cpu"],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "not built in" in done.stderr, done.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- full disks


def _fail_under(monkeypatch, parent: Path, exc: Exception) -> None:
    """The safetensors writer raises `exc` for files under `parent` (elsewhere it writes as usual)."""
    real = weights.save_file

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(parent.resolve()):
            raise exc
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(weights, "save_file", save_file)


WRITE_FAILURES = {
    "oserror": OSError(errno.ENOSPC, ENOSPC),
    "safetensors": SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)"),
}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("failure", sorted(WRITE_FAILURES))
def test_a_full_disk_is_one_line_and_leaves_no_temporaries(failure, applied, tiny, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "kept").write_text("mine")
    _fail_under(monkeypatch, disk, WRITE_FAILURES[failure])
    destination = disk / "ckpt"
    with pytest.raises(store.CheckpointError) as caught:
        store.save(applied.model, applied.policy, applied.metrics, tiny, str(destination))
    assert str(caught.value) == f"cannot write checkpoint {destination}: {ENOSPC}"
    assert _leftovers(disk) == ["kept"] and (disk / "kept").read_text() == "mine"


def test_a_failed_rename_leaves_no_temporaries(applied, tiny, tmp_path, monkeypatch):
    def rename(self, target):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(store.CheckpointError, match=f"{ENOSPC}$"):
        store.save(applied.model, applied.policy, applied.metrics, tiny, str(tmp_path / "ckpt"))
    assert _leftovers(tmp_path) == []


def test_a_remote_upload_that_fails_partway_removes_what_it_wrote(applied, tiny, tmp_path, monkeypatch):
    real, calls = store.write_atomic, []

    def write_atomic(location, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(location, name, data)

    monkeypatch.setattr(store, "write_atomic", write_atomic)
    uri = f"file://{tmp_path}/remote"
    with pytest.raises(store.CheckpointError, match=f"cannot write checkpoint {uri}: {ENOSPC}$"):
        store.save(applied.model, applied.policy, applied.metrics, tiny, uri)
    assert _leftovers(tmp_path / "remote") == []


def test_apply_onto_a_full_disk_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    disk = tmp_path / "disk"
    disk.mkdir()
    _fail_under(monkeypatch, disk, OSError(errno.ENOSPC, ENOSPC))
    args = ["apply", "--workload", TINY, "--policy", str(tmp_path / "policy.json"), "--out", str(disk / "ckpt")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: cannot write checkpoint {disk / 'ckpt'}: {ENOSPC}\n"
    assert _leftovers(disk) == []


@pytest.mark.slow
def test_apply_into_a_real_full_tmpfs(tmp_path, capsys):
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stat = os.statvfs(disk)
        filler = os.urandom(stat.f_bavail * stat.f_frsize - 16 * 1024)
        (disk / "filler").write_bytes(filler)
        args = ["apply", "--workload", TINY, "--policy", str(tmp_path / "policy.json"), "--out", str(disk / "ckpt")]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: cannot write checkpoint {disk / 'ckpt'}: {ENOSPC}\n"
        assert _leftovers(disk) == ["filler"] and (disk / "filler").read_bytes() == filler
        (disk / "filler").unlink()
        assert main(args) == 0
        assert store.load(str(disk / "ckpt"), make_tiny()).metrics["techniques"] == ["lowrank", "quantization"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
