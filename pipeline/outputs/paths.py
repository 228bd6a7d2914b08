"""Where each output file lies under the output root, and which stats parts are committed."""

from __future__ import annotations

import posixpath

import fsspec

from pipeline import storage

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CONFUSION = "confusion_matrix.parquet"
EVALUATIONS = "evaluations"


def stats_path(root: str, shard_id: str) -> str:
    return storage.join(root, "stats", f"part-{shard_id}.parquet")


def committed_parts(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    """Shard id -> path of every stats part under ``root``, from one listing (no request per shard)."""
    prefix, suffix = "part-", ".parquet"
    paths = fs.glob(storage.join(root, "stats", f"{prefix}*{suffix}"))
    return {posixpath.basename(p)[len(prefix) : -len(suffix)]: p for p in paths}


def vectors_path(root: str, shard_id: str) -> str:
    return storage.join(root, "vectors", f"part-{shard_id}.parquet")


MASK_SUFFIXES = (".png", ".tif")  # outputs.mask_format png, geotiff


def mask_path(root: str, image_id: str, suffix: str = ".png") -> str:
    return storage.join(root, "masks", f"{image_id}{suffix}")


def overlay_path(root: str, image_id: str) -> str:
    return storage.join(root, "overlays", f"{image_id}.jpg")


def unsafe_image_id(image_id: str) -> str | None:
    """Why ``image_id`` cannot name a file under masks/ (empty, absolute, a ``..`` or empty part), or None."""
    parts = image_id.split("/")
    if not image_id or image_id.startswith("/") or "\\" in image_id or any(p in ("", ".", "..") for p in parts):
        return f"image id {image_id!r} cannot name a mask file (empty, absolute, or with '.', '..' or '//' parts)"
    return None


def segmenting_path(root: str, shard_id: str) -> str:
    """Where a shard rerun image by image names the image it is on (see ``progress``)."""
    return storage.join(root, "_segmenting", shard_id)
