"""Checkpoints: a directory of safetensors weights, structure, policy, metrics and a checksummed manifest.

Files and what counts as the model's size:
- `model.safetensors` (packed weights) and `structure.json` (how to rebuild the architecture from the
  workload's base model) are the deployable artifact: `size_bytes` is the sum of their bytes (written by
  `write_artifact`; `orchestrator.measure.measure_artifact` sizes a model that way);
- `policy.json`, `metrics.json` are provenance; `manifest.json` lists sha256 and bytes of every file,
  the workload and the package versions, and is written last.

Local checkpoints are written into a temporary sibling directory and renamed into place, so a crash
never leaves a half checkpoint. Remote ones (s3://, gs://, any pyarrow filesystem) are uploaded with the
manifest last; a directory without a manifest is not a checkpoint. A failed write (a full disk) is one
CheckpointError and leaves no temporaries behind.

The base architecture is the workload's `build_model()`, or its `build_student(width)` for a policy with a
student step (`base_architecture`, read from the policy on save and from the verified `policy.json` on load),
so a student's structure record only holds what later steps changed, and it rebuilds exactly.

Reading trusts nothing: the manifest, structure record, policy and metrics are schema-checked, every
file is checked against its recorded bytes and sha256, and nothing is ever unpickled or imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from orchestrator.artifacts.structure import StructureError, describe, rebuild
from orchestrator.errors import UserError
from orchestrator.files.fs import is_uri, read_bytes, resolve, write_atomic
from orchestrator.files.jsondoc import finite_json, parse_json
from orchestrator.files.weights import save_weights, tensor_shapes
from orchestrator.policy import Policy
from orchestrator.workloads import BUILTIN, Workload
from techniques import SpecError
from techniques.student import base_architecture as policy_base

FORMAT_VERSION = 1
WEIGHTS, STRUCTURE, POLICY, METRICS, MANIFEST = (
    "model.safetensors",
    "structure.json",
    "policy.json",
    "metrics.json",
    "manifest.json",
)
ARTIFACT_FILES = (WEIGHTS, STRUCTURE)
FILES = (WEIGHTS, STRUCTURE, POLICY, METRICS)  # every file the loader reads; all listed in the manifest
_PACKAGES = (  # recorded in every manifest and run info (the exact pins are constraints.txt)
    "compression-orchestrator",
    "torch",
    "ray",
    "optuna",
    "numpy",
    "safetensors",
    "tensorly",
    "torch-pruning",
    "transformers",
    "onnx",
    "onnxruntime",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WRITE_ERRORS = (OSError, SafetensorError, pa.ArrowException)


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, belongs to another workload, or cannot be written."""


class CheckpointExistsError(CheckpointError):
    """The destination already holds a checkpoint (or, locally, anything at all)."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model plus what was recorded with it."""

    model: nn.Module
    policy: Policy
    metrics: dict[str, Any]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Verified:
    """A checkpoint's files, each checked against the manifest, and its documents, each schema-checked."""

    files: dict[str, bytes]
    manifest: dict[str, Any]
    policy: Policy
    metrics: dict[str, Any]


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(finite_json(doc), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_artifact(model: nn.Module, base: nn.Module, directory: Path) -> int:
    """Write the deployable files (weights + structure) into `directory`; return their total bytes."""
    (directory / STRUCTURE).write_bytes(_json_bytes({"format": FORMAT_VERSION, "modules": describe(model, base)}))
    save_weights(model, directory / WEIGHTS)
    return sum((directory / name).stat().st_size for name in ARTIFACT_FILES)


def read_artifact(structure: bytes, weights: bytes, base: nn.Module) -> nn.Module:
    """The model the deployable files describe: `base` rebuilt from the structure record, weights loaded."""
    record = check_structure(_parse_json(structure, STRUCTURE))
    try:
        model = rebuild(base, record, tensor_shapes(weights))  # claims checked against the file, then allocated
        model.load_state_dict(load_safetensors(weights), strict=True)
    except (UserError, StructureError, SafetensorError, RuntimeError, LookupError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not rebuild: {_first_line(exc)}") from None
    return model.eval()


def base_architecture(policy: Policy, workload: Workload) -> nn.Module:
    """The untrained architecture a model made by `policy` is saved and rebuilt against: the workload's
    `build_student(width)` when the policy has a student step, else its `build_model()` (SpecError when the
    policy needs a student the workload cannot build)."""
    return policy_base(policy.steps, workload.build_model, workload.build_student)


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


# --------------------------------------------------------------------------- writing


def save(model: nn.Module, policy: Policy, metrics: dict[str, Any], workload: Workload, destination: str) -> str:
    """Write a checkpoint to `destination` (a local path or a pyarrow filesystem URI); return it.

    An existing checkpoint is refused (CheckpointExistsError); a failed write (a full disk) is one
    CheckpointError line, leaves no temporaries and changes nothing that was there before.
    """
    try:
        base = base_architecture(policy, workload)
    except SpecError as exc:
        raise CheckpointError(f"cannot write checkpoint {destination}: {exc}") from None
    staging: Path | None = None
    try:
        _refuse_existing(destination)
        staging = _staging_dir(destination)
        _write_files(model, base, policy, metrics, workload, staging)
        _publish(staging, destination)
    except _WRITE_ERRORS as exc:
        raise CheckpointError(f"cannot write checkpoint {destination}: {_os_reason(exc)}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place
    return destination


def _refuse_existing(destination: str) -> None:
    if not is_uri(destination):
        if Path(destination).exists():
            raise CheckpointExistsError(f"{destination} already exists; choose a new checkpoint directory")
    elif read_bytes(destination, MANIFEST) is not None:
        raise CheckpointExistsError(f"{destination} already holds a checkpoint")


def _staging_dir(destination: str) -> Path:
    """Local: a `.NAME.tmp-*` sibling of the destination (renamed into place); remote: a local temporary."""
    if is_uri(destination):
        return Path(tempfile.mkdtemp(prefix=".ckpt-"))
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def _write_files(
    model: nn.Module, base: nn.Module, policy: Policy, metrics: dict[str, Any], workload: Workload, staging: Path
) -> None:
    write_artifact(model, base, staging)
    (staging / POLICY).write_bytes(policy.dumps().encode() + b"\n")
    (staging / METRICS).write_bytes(_json_bytes(metrics))
    files = {
        name: {"sha256": _sha256((staging / name).read_bytes()), "bytes": (staging / name).stat().st_size}
        for name in FILES
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


def _publish(staging: Path, destination: str) -> None:
    if not is_uri(destination):
        staging.chmod(0o755)  # mkdtemp creates 0700
        _refuse_existing(destination)  # again: it may have appeared while we wrote
        staging.rename(destination)
        return
    written: list[str] = []
    try:
        for name in (*FILES, MANIFEST):  # manifest last: it marks completion
            write_atomic(destination, name, (staging / name).read_bytes())
            written.append(name)
    except BaseException:
        _remove_remote(destination, written)
        raise


def _remove_remote(destination: str, names: list[str]) -> None:
    """Best effort: delete the files this save uploaded before it failed."""
    try:
        filesystem, root = resolve(destination)
        for name in names:
            filesystem.delete_file(f"{root}/{name}")
    except _WRITE_ERRORS:
        pass


def _os_reason(exc: BaseException) -> str:
    """The OS's words for a failed read or write ("No space left on device"), also out of a safetensors error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(exc))
    return found.group(1) if found else _first_line(exc)


# --------------------------------------------------------------------------- reading


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_files(source: str) -> dict[str, bytes]:
    """Every checkpoint file's bytes, from local disk or a pyarrow filesystem."""
    found = {}
    try:
        for name in (MANIFEST, *FILES):
            data = read_bytes(source, name)
            if data is not None:
                found[name] = data
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"cannot read checkpoint {source}: {_os_reason(exc)}") from None
    if MANIFEST not in found:
        raise CheckpointError(f"{source} is not a checkpoint (no {MANIFEST})")
    return found


def _parse_json(data: bytes, name: str) -> Any:
    return parse_json(data, name, error=CheckpointError)


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _object(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where} must be a JSON object, not {_kind(doc)}")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """`doc[key]`, which must be present and of `kind` (CheckpointError naming `where` and `key` if not)."""
    if key not in doc:
        raise CheckpointError(f"{where}: {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        wanted = {dict: "an object", list: "a list", str: "a string", int: "an integer"}[kind]
        raise CheckpointError(f"{where}: {key!r} must be {wanted}, not {_kind(value)}")
    return value


def _check_format(doc: dict[str, Any], where: str) -> None:
    version = _field(doc, "format", int, where)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported checkpoint format {version} (this build reads {FORMAT_VERSION})")


def check_manifest(doc: Any) -> dict[str, Any]:
    """`doc` if it is a well-formed manifest, else a CheckpointError naming the field."""
    manifest = _object(doc, MANIFEST)
    _check_format(manifest, MANIFEST)
    _field(manifest, "workload", str, MANIFEST)
    _field(manifest, "workload_fingerprint", str, MANIFEST)
    files = _field(manifest, "files", dict, MANIFEST)
    unknown = sorted(set(files) - set(FILES))
    if unknown:
        raise CheckpointError(f"{MANIFEST}: 'files' lists unknown file(s) {', '.join(map(repr, unknown))}")
    for name in FILES:
        if name not in files:
            raise CheckpointError(f"{MANIFEST}: 'files' does not list {name}, which every checkpoint has")
        where = f"{MANIFEST} files[{name!r}]"
        entry = _object(files[name], where)
        if not _SHA256.fullmatch(_field(entry, "sha256", str, where)):
            raise CheckpointError(f"{where}: 'sha256' must be 64 lowercase hex digits")
        if _field(entry, "bytes", int, where) < 0:
            raise CheckpointError(f"{where}: 'bytes' must not be negative")
    for name in _field(manifest, "artifact_files", list, MANIFEST):
        if not isinstance(name, str) or name not in files:
            raise CheckpointError(f"{MANIFEST}: 'artifact_files' names {name!r}, which 'files' does not list")
    if "versions" in manifest:
        _field(manifest, "versions", dict, MANIFEST)
    return manifest


def check_structure(doc: Any) -> list[dict[str, Any]]:
    """The module entries of a well-formed structure record, else a CheckpointError naming the field."""
    record = _object(doc, STRUCTURE)
    _check_format(record, STRUCTURE)
    modules = _field(record, "modules", list, STRUCTURE)
    for index, entry in enumerate(modules):
        where = f"{STRUCTURE} modules[{index}]"
        _object(entry, where)
        if not _field(entry, "name", str, where):
            raise CheckpointError(f"{where}: 'name' must not be empty")
        _field(entry, "type", str, where)
        _field(entry, "config", dict, where)
        unknown = sorted(set(entry) - {"name", "type", "config"})
        if unknown:
            raise CheckpointError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    return modules


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


def check_metrics(doc: Any) -> dict[str, Any]:
    """`doc` if it is a metrics object whose recorded scores are numbers (or null) and whose every number is
    finite as a float (a table or a ratio computed from it stays finite)."""
    metrics = _object(doc, METRICS)
    for key in ("validation", "test", "size_bytes"):
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise CheckpointError(f"{METRICS}: {key!r} must be a number, not {_kind(value)}")
    for key, value in metrics.items():
        if isinstance(value, int | float) and not _finite(value):
            raise CheckpointError(f"{METRICS}: {key!r} is not a finite number")
    return metrics


def _check_policy(doc: Any) -> Policy:
    try:
        return Policy.from_json(doc)
    except (UserError, LookupError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{POLICY} is not a valid policy: {_first_line(exc)}") from None


def verify(files: dict[str, bytes], manifest: Any) -> None:
    """The manifest is well formed and every file it lists is present with its recorded bytes and sha256."""
    check_manifest(manifest)
    for name, entry in manifest["files"].items():
        if name not in files:
            raise CheckpointError(f"checkpoint file {name} is missing")
        if len(files[name]) != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {name} is corrupted ({len(files[name])} bytes, {MANIFEST} records {entry['bytes']})"
            )
        if _sha256(files[name]) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {name} is corrupted (sha256 mismatch)")


def read_verified(source: str) -> Verified:
    """Read a checkpoint and check all of it (manifest, bytes, checksums, every document's schema)."""
    files = _read_files(source)
    manifest = _parse_json(files[MANIFEST], MANIFEST)
    verify(files, manifest)
    check_structure(_parse_json(files[STRUCTURE], STRUCTURE))
    metrics = check_metrics(_parse_json(files[METRICS], METRICS))
    policy = _check_policy(_parse_json(files[POLICY], POLICY))
    return Verified(files, manifest, policy, metrics)


def read_manifest(source: str) -> dict[str, Any]:
    """The manifest of a checkpoint whose every file and document has been verified."""
    return read_verified(source).manifest


def recorded_workload(manifest: dict[str, Any]) -> str:
    """The built-in workload a verified manifest names; any other name must come from the user."""
    name = manifest["workload"]
    if name not in BUILTIN:
        raise CheckpointError(
            f"the checkpoint is of workload {name!r}, which is not built in; "
            "pass --workload package.module:function yourself to load it"
        )
    return name


def load_verified(verified: Verified, workload: Workload) -> Checkpoint:
    """Rebuild a verified checkpoint's model from `workload` (which must be the one it was saved from)."""
    manifest = verified.manifest
    if manifest["workload_fingerprint"] != workload.fingerprint:
        raise CheckpointError(
            f"checkpoint belongs to workload {manifest['workload']!r} "
            f"({manifest['workload_fingerprint']!r}), not {workload.name!r} ({workload.fingerprint!r})"
        )
    try:
        base = base_architecture(verified.policy, workload)
    except SpecError as exc:
        raise CheckpointError(f"checkpoint does not rebuild: {exc}") from None
    model = read_artifact(verified.files[STRUCTURE], verified.files[WEIGHTS], base)
    return Checkpoint(model, verified.policy, verified.metrics, manifest)


def load(source: str, workload: Workload) -> Checkpoint:
    """Verify everything, rebuild the architecture from the workload and the structure record, load weights."""
    return load_verified(read_verified(source), workload)
