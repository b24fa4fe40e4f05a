"""One place for where artifacts live: local paths or pyarrow filesystem URIs (s3://, gs://), atomic writes.

Decisions: every writer goes through `write_atomic` (temporary name in the same directory, then a move),
so a crash or a full disk never leaves a half-written file under the final name; the temporary is
removed when the write fails. Local paths are resolved to absolute ones before Ray changes directories.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def cache_root() -> Path:
    """This tool's local cache (trained baselines, journals of remote runs): $COMPRESSION_CACHE, else
    $XDG_CACHE_HOME/compression-orchestrator (~/.cache by default)."""
    if os.environ.get("COMPRESSION_CACHE"):
        return Path(os.environ["COMPRESSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compression-orchestrator"


def is_uri(location: str) -> bool:
    """Whether `location` names a remote filesystem (s3://, gs://, file://…) rather than a local path."""
    return "://" in location


def join(location: str, name: str) -> str:
    """`location/name` for a local path or a URI."""
    return f"{location.rstrip('/')}/{name}"


def absolute(location: str) -> str:
    """URIs as they are; local paths made absolute (trials run in other working directories)."""
    return location if is_uri(location) else str(Path(location).resolve())


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def locate(run_dir: str, path: str) -> str:
    """Where `path` lives: URIs and absolute paths as they are, relative paths under `run_dir`."""
    if is_uri(path) or posixpath.isabs(path) or Path(path).is_absolute():
        return path
    return join(run_dir, path)


def directory_note(location: str) -> str:
    """'' when `location` is an existing directory, else a short note saying why it cannot be used."""
    try:
        filesystem, path = resolve(location)
        kind = filesystem.get_file_info(path).type
    except (OSError, pa.ArrowException) as exc:
        return f"checkpoint unreachable ({str(exc).splitlines()[0]})"
    return "" if kind == pafs.FileType.Directory else "checkpoint missing"


def exists(location: str, name: str) -> bool:
    """Whether `location/name` is a file."""
    filesystem, root = resolve(location)
    return filesystem.get_file_info(f"{root}/{name}").type == pafs.FileType.File


def write_atomic(location: str, name: str, data: bytes) -> str:
    """Write `data` to `location/name` under a temporary name, then move it into place; return its path.

    A failed write (a full disk, say) removes the temporary and leaves any earlier file untouched.
    """
    filesystem, root = resolve(location)
    filesystem.create_dir(root, recursive=True)
    tmp = f"{root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with filesystem.open_output_stream(tmp) as stream:
            stream.write(data)
        filesystem.move(tmp, f"{root}/{name}")
    except BaseException:
        _remove_quietly(filesystem, tmp)
        raise
    return join(location, name)


def read_bytes(location: str, name: str) -> bytes | None:
    """The bytes of `location/name`, or None when it is not a file."""
    filesystem, root = resolve(location)
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def upload_file(local: str | os.PathLike[str], location: str, name: str) -> str:
    """Copy a local file to `location/name` atomically."""
    return write_atomic(location, name, Path(local).read_bytes())


def _remove_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except (OSError, pa.ArrowException):
        pass
