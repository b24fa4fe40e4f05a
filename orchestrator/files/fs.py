"""One place for where artifacts live: local paths or pyarrow filesystem URIs (s3://, gs://), atomic writes.

Decisions: every writer goes through `write_atomic` (temporary name in the same directory, then a move),
so a crash or a full disk never leaves a half-written file under the final name; the temporary is
removed when the write fails. Local paths are resolved to absolute ones before Ray changes directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
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


def write_problem(location: str) -> str:
    """'' when this process can create files in the local directory `location` (made when missing), else why not.

    The nearest existing directory on the way is probed with a real file: permissions alone do not say (root
    passes them, /proc refuses root)."""
    path = Path(os.path.abspath(location))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or type(exc).__name__})"
    return ""


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


def publish_directory(local: Path, location: str, *, last: str) -> None:
    """Copy a local directory tree to `location` so that it appears complete or not at all: locally a copy
    under a temporary name, then a rename (the temporary is removed on failure); remotely file by file, the
    top-level file `last` written last as the mark of completion. `location` must not exist yet."""
    if is_uri(location):
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for name in [n for n in names if n != last] + [last]:
            parent, _, base = name.rpartition("/")
            write_atomic(join(location, parent) if parent else location, base, (local / name).read_bytes())
        return
    target = Path(location)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(local, tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(location: str, mark: str) -> str:
    """Take a published directory out of use; return where it went. Locally it is renamed to a hidden sibling
    (kept for whoever wants to look); remotely, where a directory cannot be renamed, its completion mark `mark`
    (see `publish_directory`) is deleted, and publishing there again overwrites it. Gone already: a no-op."""
    if is_uri(location):
        filesystem, root = resolve(location)
        _remove_quietly(filesystem, f"{root}/{mark}")
        return f"{location} without {mark}"
    target = Path(location)
    aside = target.with_name(f".{target.name}.set-aside-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):  # another process set it aside first
        target.rename(aside)
    return str(aside)


def upload_file(local: str | os.PathLike[str], location: str, name: str) -> str:
    """Copy a local file to `location/name` atomically."""
    return write_atomic(location, name, Path(local).read_bytes())


LOCK_FILE = ".lock"


class LockHeld(RuntimeError):
    """Another process holds the lock on a directory."""


@contextlib.contextmanager
def directory_lock(location: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on a local directory (created if needed) while the block runs; when another
    process holds it, wait for it with `wait`, else raise LockHeld.

    A POSIX record lock (`fcntl.lockf`) on `LOCK_FILE` inside it: the kernel drops it when the process
    dies, and NFS (v3 with lockd, v4) honours it across machines. Object stores (s3://, gs://) have no
    locks: there this does nothing, and two runs of the same name must not be started.
    """
    if is_uri(location):
        yield
        return
    Path(location).mkdir(parents=True, exist_ok=True)
    with open(Path(location) / LOCK_FILE, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            raise LockHeld(f"{location} is in use by another search (process {handle.read().strip() or '?'})") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def _remove_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except (OSError, pa.ArrowException):
        pass
