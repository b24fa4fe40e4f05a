"""Checkpoints: a directory of safetensors weights, structure, policy, metrics and a checksummed manifest.

Files and what counts as the model's size:
- `model.safetensors` (packed weights) and `structure.json` (how to rebuild the architecture from the
  workload's base model) are the deployable artifact: `size_bytes` is the sum of their bytes;
- `policy.json`, `metrics.json` are provenance; `manifest.json` lists sha256 and bytes of every file,
  the workload and the package versions, and is written last.

Local checkpoints are written into a temporary sibling directory and renamed into place, so a crash
never leaves a half checkpoint. Remote ones (s3://, gs://, any pyarrow filesystem) are uploaded with the
manifest last; a directory without a manifest is not a checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from orchestrator.artifacts.fs import is_uri, read_bytes, write_atomic
from orchestrator.artifacts.structure import StructureError, describe, rebuild
from orchestrator.artifacts.weights import save_weights
from orchestrator.errors import UserError
from orchestrator.policy import Policy
from orchestrator.workloads import Workload

FORMAT_VERSION = 1
WEIGHTS, STRUCTURE, POLICY, METRICS, MANIFEST = (
    "model.safetensors",
    "structure.json",
    "policy.json",
    "metrics.json",
    "manifest.json",
)
ARTIFACT_FILES = (WEIGHTS, STRUCTURE)
_PACKAGES = ("torch", "safetensors", "tensorly", "torch-pruning", "compression-orchestrator")


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, or belongs to another workload."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus what was recorded with it."""

    model: nn.Module
    policy: Policy
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_artifact(model: nn.Module, base: nn.Module, directory: Path) -> int:
    """Write the deployable files (weights + structure) into `directory`; return their total bytes."""
    (directory / STRUCTURE).write_bytes(_json_bytes({"format": FORMAT_VERSION, "modules": describe(model, base)}))
    save_weights(model, directory / WEIGHTS)
    return sum((directory / name).stat().st_size for name in ARTIFACT_FILES)


def read_artifact(structure: bytes, weights: bytes, base: nn.Module) -> nn.Module:
    """The model the deployable files describe: `base` rebuilt from the structure record, weights loaded."""
    record = _parse_json(structure, STRUCTURE)
    try:
        model = rebuild(base, record["modules"])
        model.load_state_dict(load_safetensors(weights), strict=True)
    except (StructureError, SafetensorError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not rebuild: {str(exc).splitlines()[0]}") from None
    return model.eval()


def measure_artifact(model: nn.Module, base: nn.Module | None = None) -> int:
    """The model's size: bytes on disk of its deployable artifact, by writing it to a temporary directory.

    The one definition of size in the project; checkpoints, trials and the baseline all use it. `base` is
    the architecture the structure record is written against (None: the model's own, an empty record).
    """
    with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
        return write_artifact(model, model if base is None else base, Path(tmp))


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def save(model: nn.Module, policy: Policy, metrics: dict[str, Any], workload: Workload, destination: str) -> str:
    """Write a checkpoint to `destination` (a local path or a pyarrow filesystem URI); return it."""
    base = workload.build_model()
    staging = Path(tempfile.mkdtemp(prefix=".ckpt-"))
    try:
        write_artifact(model, base, staging)
        (staging / POLICY).write_bytes(policy.dumps().encode() + b"\n")
        (staging / METRICS).write_bytes(_json_bytes(metrics))
        files = {
            name: {"sha256": _sha256((staging / name).read_bytes()), "bytes": (staging / name).stat().st_size}
            for name in (WEIGHTS, STRUCTURE, POLICY, METRICS)
        }
        manifest = {
            "format": FORMAT_VERSION,
            "workload": workload.name,
            "workload_fingerprint": workload.fingerprint,
            "files": files,
            "artifact_files": list(ARTIFACT_FILES),
            "versions": package_versions(),
        }
        (staging / MANIFEST).write_bytes(_json_bytes(manifest))
        _publish(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def _publish(staging: Path, destination: str) -> None:
    if not is_uri(destination):
        target = Path(destination)
        if target.exists():
            raise CheckpointError(f"{target} already exists; choose a new checkpoint directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(staging, tmp)
            tmp.chmod(0o755)  # mkdtemp creates 0700
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    if read_bytes(destination, MANIFEST) is not None:
        raise CheckpointError(f"{destination} already holds a checkpoint")
    for name in (WEIGHTS, STRUCTURE, POLICY, METRICS, MANIFEST):  # manifest last: it marks completion
        write_atomic(destination, name, (staging / name).read_bytes())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_files(source: str) -> dict[str, bytes]:
    """Every checkpoint file's bytes, from local disk or a pyarrow filesystem."""
    found = {}
    for name in (MANIFEST, WEIGHTS, STRUCTURE, POLICY, METRICS):
        data = read_bytes(source, name)
        if data is not None:
            found[name] = data
    if MANIFEST not in found:
        raise CheckpointError(f"{source} is not a checkpoint (no {MANIFEST})")
    return found


def read_manifest(source: str) -> dict[str, Any]:
    """The manifest alone (to find the workload before loading)."""
    return _parse_json(_read_files(source)[MANIFEST], MANIFEST)


def _parse_json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{name} is not valid JSON") from None


def verify(files: dict[str, bytes], manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with the recorded sha256 (errors name the file)."""
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"unsupported checkpoint format {manifest.get('format')!r}")
    for name, entry in manifest["files"].items():
        if name not in files:
            raise CheckpointError(f"checkpoint file {name} is missing")
        if _sha256(files[name]) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file {name} is corrupted (sha256 mismatch)")


def load(source: str, workload: Workload) -> Checkpoint:
    """Verify checksums, rebuild the architecture from the workload and the structure record, load weights."""
    files = _read_files(source)
    manifest = _parse_json(files[MANIFEST], MANIFEST)
    verify(files, manifest)
    if manifest.get("workload_fingerprint") != workload.fingerprint:
        raise CheckpointError(
            f"checkpoint belongs to workload {manifest.get('workload')!r} "
            f"({manifest.get('workload_fingerprint')}), not {workload.name!r} ({workload.fingerprint})"
        )
    model = read_artifact(files[STRUCTURE], files[WEIGHTS], workload.build_model())
    policy = Policy.from_json(_parse_json(files[POLICY], POLICY))
    return Checkpoint(model, policy, _parse_json(files[METRICS], METRICS), manifest)
