"""Files of a run directory on local disk or any pyarrow filesystem: existence checks and atomic writes."""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.results import join


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI, the way `orchestrator.results` resolves them."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def locate(run_dir: str, path: str) -> str:
    """Where `path` lives: URIs and absolute paths as they are, relative paths under `run_dir`."""
    if "://" in path or posixpath.isabs(path) or Path(path).is_absolute():
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
    """Write `data` to `location/name` under a temporary name, then move it into place; return its path."""
    filesystem, root = resolve(location)
    filesystem.create_dir(root, recursive=True)
    tmp = f"{root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(tmp) as stream:
        stream.write(data)
    filesystem.move(tmp, f"{root}/{name}")
    return join(location, name)
