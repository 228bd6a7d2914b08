"""Filesystems at the edge: resolve a URI once, then pass (fs, path) down.

Writes are atomic for readers: object stores publish a PUT whole, and on a local
disk we write a hidden temporary file and rename it, so a killed process never
leaves a torn file under a final name.
"""

from __future__ import annotations

import posixpath
import sys
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageUnavailable

TMP_MARK = ".tmp-"
# Errors that say a location cannot be used as given, whenever it is tried: missing, denied, malformed URI,
# unknown protocol or a backend not installed. Anything else (refused connections, timeouts, 5xx past the
# client's retries) may pass.
_UNUSABLE = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, ValueError, ImportError)
_UNUSABLE_BOTOCORE = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "NoRegionError")


def resolve(uri: str, filesystem: type | None = None, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``uri``: fsspec's filesystem for its protocol, or ``filesystem`` (a subclass of it)."""
    if filesystem is None:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    else:
        fs = filesystem(**storage_options)
        path = fs._strip_protocol(uri)
    return fs, path.rstrip("/") or path


def location_error(error: Exception, message: str, unusable: type[Exception]) -> Exception:
    """What to raise for ``error`` met while checking a location: ``unusable(message)`` (a SegpipeError: the
    user must act) when the location cannot be used as given, else ``StorageUnavailable(message)``: retried."""
    return unusable(message) if _is_unusable(error) else StorageUnavailable(message)


def _is_unusable(error: Exception) -> bool:
    if isinstance(error, _UNUSABLE):
        return True
    botocore = sys.modules.get("botocore.exceptions")  # loaded only if an s3:// location was tried
    return botocore is not None and isinstance(error, tuple(getattr(botocore, n) for n in _UNUSABLE_BOTOCORE))


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def bucket_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket a path lies in on an object store; None for a local filesystem."""
    return None if isinstance(fs, LocalFileSystem) else path.split("/", 1)[0]


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        tmp = _local_temporary(fs, path)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_file(fs: fsspec.AbstractFileSystem, path: str, local_path: str) -> None:
    """Publish the local file ``local_path`` (left in place) at ``path``, as atomically as ``write_bytes``."""
    if isinstance(fs, LocalFileSystem):
        tmp = _local_temporary(fs, path)
        fs.put_file(local_path, tmp)
        fs.mv(tmp, path)
    else:
        fs.put_file(local_path, path)


def _local_temporary(fs: LocalFileSystem, path: str) -> str:
    """A hidden temporary name beside ``path`` (its folder made) to write and then rename to ``path``."""
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    return join(parent, f".{posixpath.basename(path)}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def remove_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete ``paths``; one already gone is no error."""
    for path in paths:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete temporary files a killed run left under ``root``; returns how many. Only a local disk has
    them (an object store publishes a PUT whole), so an object store's output is not listed for them."""
    if not isinstance(fs, LocalFileSystem) or not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if TMP_MARK in posixpath.basename(p)]
    remove_files(fs, stale)
    return len(stale)
