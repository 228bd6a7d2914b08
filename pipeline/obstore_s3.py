"""s3:// with obstore on the hot path: an s3fs filesystem whose whole-object GETs and PUTs go through obstore.

s3fs makes every request in Python (signing, building, parsing: 3.6-7 ms of CPU per request on this project's
VM), on one event-loop thread per process, so an actor cannot fetch its images and write their masks much
faster than ~125 images/s however many cores it has (BENCHMARKS.md, "Feeding a GPU"). obstore makes the same
requests in Rust, outside the GIL, for ~0.3 ms of CPU. Whole-object reads and writes take that path (the
images, the masks, the stats parts, labels, the manifest), and so do folder listings (``ls``: the input's
listing, folder by folder, ~9x faster than s3fs's here); ``find``, ``info`` (the ETags of incremental runs),
ranged reads of Parquet footers and deletes stay s3fs's.

``storage.client: obstore`` selects it. Credentials and endpoint: the job's ``storage`` settings, else the
standard AWS environment, which obstore reads itself (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, an instance's or a pod's role). Unlike s3fs it neither reads
~/.aws profiles nor finds a bucket's region by itself: give ``storage.region`` for a bucket outside us-east-1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from s3fs import S3FileSystem

# As the s3fs client's own settings (StorageConfig.options): 5 attempts, a 5 s connect and 60 s read timeout.
_RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=60)}
_CLIENT = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=60)}


class ObstoreS3FileSystem(S3FileSystem):
    """``S3FileSystem`` with ``cat_file`` and ``pipe_file`` of whole objects made by obstore."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stores: dict[str, Any] = {}
        self._stores_lock = threading.Lock()

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if start is not None or end is not None or kwargs:
            return super().cat_file(path, start=start, end=end, **kwargs)
        import obstore

        bucket, key, _ = self.split_path(path)
        with _as_os_errors(path):
            return bytes(obstore.get(self._store(bucket), key).bytes())

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        if kwargs:
            super().pipe_file(path, value, **kwargs)
            return
        import obstore

        bucket, key, _ = self.split_path(path)
        with _as_os_errors(path):
            obstore.put(self._store(bucket), key, value)
        self.invalidate_cache(path)  # as s3fs does after a write of its own

    def ls(self, path: str, detail: bool = False, refresh: bool = False, **kwargs: Any) -> list:
        """One folder's entries (a delimiter listing, every page), as s3fs gives them; never cached, so
        ``refresh`` has nothing to do. A bucket list, or a listing of object versions, stays s3fs's."""
        bucket, key, _ = self.split_path(path)
        if not bucket or kwargs:
            return super().ls(path, detail=detail, refresh=refresh, **kwargs)
        import obstore

        prefix = key.rstrip("/") + "/" if key else None
        with _as_os_errors(path):
            found = obstore.list_with_delimiter(self._store(bucket), prefix)
        if not found["objects"] and not found["common_prefixes"] and key:
            raise FileNotFoundError(path)  # as s3fs: a prefix with nothing under it is not a folder
        files = [_file(bucket, o, marker=f"{o['path']}/" == prefix) for o in found["objects"]]
        entries = [_folder(bucket, p) for p in found["common_prefixes"]] + files
        return entries if detail else [e["name"] for e in entries]

    def _store(self, bucket: str) -> Any:
        with self._stores_lock:
            if bucket not in self._stores:
                self._stores[bucket] = _s3_store(bucket, self)
            return self._stores[bucket]


def _s3_store(bucket: str, fs: S3FileSystem) -> Any:
    """An obstore S3Store for ``bucket`` with ``fs``'s settings; what they leave out comes from the environment."""
    from obstore.store import S3Store

    config: dict[str, Any] = {}
    if fs.anon:
        config["skip_signature"] = True
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
        if getattr(fs, ours):
            config[theirs] = getattr(fs, ours)
    if fs.endpoint_url:
        config["endpoint"] = fs.endpoint_url
    if fs.client_kwargs.get("region_name"):
        config["region"] = fs.client_kwargs["region_name"]
    client = _CLIENT | ({"allow_http": True} if (fs.endpoint_url or "").startswith("http://") else {})
    return S3Store(bucket, config=config, client_options=client, retry_config=_RETRY)


def _folder(bucket: str, prefix: str) -> dict:
    return {"name": f"{bucket}/{prefix.rstrip('/')}", "size": 0, "type": "directory", "StorageClass": "DIRECTORY"}


def _file(bucket: str, meta: dict, marker: bool) -> dict:
    """An object as s3fs's ``ls`` describes it: name, size, type, ETag (quoted, as S3 sends it), LastModified.
    ``marker``: the folder's own zero-byte marker, whose key ends in "/" (obstore's path drops it)."""
    etag = meta.get("e_tag") or ""
    return {
        "name": f"{bucket}/{meta['path']}" + ("/" if marker else ""),
        "size": meta["size"],
        "type": "file",
        "ETag": etag if etag.startswith('"') else f'"{etag}"',
        "LastModified": meta["last_modified"],
        "StorageClass": "STANDARD",
    }


@contextmanager
def _as_os_errors(path: str) -> Iterator[None]:
    """obstore's errors as the builtin ones fsspec callers expect: a missing object is a FileNotFoundError (a
    missing image becomes its error row), a refused one a PermissionError, anything else an OSError (a shard
    that meets one fails and is retried)."""
    from obstore import exceptions

    try:
        yield
    except exceptions.NotFoundError as e:
        raise FileNotFoundError(path) from e
    except (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError) as e:
        raise PermissionError(f"{path}: {e}") from e
    except exceptions.BaseError as e:
        raise OSError(f"{path}: {e}") from e
