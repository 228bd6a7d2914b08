"""``manifest.json``: the typed record of a finished run, its one builder and its one reader.

Written last, it is the run's commit: a reader that finds it with ``status: complete`` may trust every file
it names. The report, ``evaluate`` and a resumed run all read it through ``read_manifest``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline import __version__, storage
from pipeline.errors import InputError
from pipeline.outputs.paths import MANIFEST

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from pipeline.models.checkpoint import ModelMeta
    from pipeline.outputs.tables import RowCounts
    from pipeline.sources import Shard

COMPLETE = "complete"
PROCESSED, SKIPPED = "processed", "skipped (committed earlier)"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    checkpoint_uri: str | None  # None when weights by name or an hf: model gave the model
    checkpoint_sha256: str  # of the checkpoint, the weights file or the hf: folder's files
    class_names: list[str]
    palette: list[list[int]]  # RGB per class index
    normalization: dict[str, list[float]]  # mean, std
    input_policy: str
    stride: int
    source: str = ""  # where the model came from, in words ("checkpoint s3://...", "torchvision weights ...")


@dataclass(frozen=True, kw_only=True)
class RunCounts:
    images: int
    errors: int
    labeled: int
    shards: int
    shards_skipped: int  # committed by an earlier attempt of the same run
    error_kinds: dict[str, int] = field(default_factory=dict)  # error rows by kind: too_large, model, ...


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    shard_id: str
    images: int | None
    status: str  # PROCESSED or SKIPPED


@dataclass(frozen=True, kw_only=True)
class Timings:
    plan_seconds: float
    infer_seconds: float
    reduce_seconds: float
    images_per_second: float | None


@dataclass(frozen=True, kw_only=True)
class Manifest:
    run_id: str
    status: str
    started_at: str
    finished_at: str
    code_version: str
    config: dict[str, Any]  # the resolved JobConfig, secrets written as "**********"
    model: ModelInfo
    counts: RunCounts
    shards: list[ShardEntry]
    timings: Timings
    inference: dict[str, Any] = field(default_factory=dict)  # the resolved mode, tile, overlap, blend, TTA views

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        """The manifest in ``doc``; TypeError or KeyError when a field is missing or unknown."""
        parts = {
            "model": ModelInfo(**doc["model"]),
            "counts": RunCounts(**doc["counts"]),
            "shards": [ShardEntry(**s) for s in doc["shards"]],
            "timings": Timings(**doc["timings"]),
        }
        return cls(**(doc | parts))


def build_manifest(
    *,
    run_id: str,
    started_at: str,
    config: JobConfig,
    meta: ModelMeta,
    checkpoint_sha256: str,
    shards: list[Shard],
    done: dict[str, int],
    counts: RowCounts,
    timings: Timings,
    inference: dict[str, Any],
    model_source: str,
) -> Manifest:
    """The manifest of a run whose every shard is committed; ``done``: shard id -> images, of the shards this
    attempt ran (the others were committed by an earlier one)."""
    names = list(meta.class_names)
    return Manifest(
        run_id=run_id,
        status=COMPLETE,
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        code_version=__version__,
        config=config.model_dump(mode="json"),
        model=ModelInfo(
            name=config.model,
            checkpoint_uri=config.checkpoint_uri,
            checkpoint_sha256=checkpoint_sha256,
            class_names=names,
            palette=meta.palette_array()[: len(names)].tolist(),
            normalization={"mean": list(meta.mean), "std": list(meta.std)},
            input_policy=meta.input_policy,
            stride=meta.stride,
            source=model_source,
        ),
        counts=RunCounts(
            images=counts.images,
            errors=counts.errors,
            labeled=counts.labeled,
            shards=len(shards),
            shards_skipped=len(shards) - len(done),
            error_kinds=dict(sorted(counts.error_kinds.items())),
        ),
        shards=[_entry(s, done.get(s.shard_id)) for s in shards],
        timings=timings,
        inference=inference,
    )


def _entry(shard: Shard, images: int | None) -> ShardEntry:
    if images is None:
        return ShardEntry(shard_id=shard.shard_id, images=shard.images, status=SKIPPED)
    return ShardEntry(shard_id=shard.shard_id, images=images, status=PROCESSED)


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    """The manifest under ``root``, or None when there is none (a run not finished, or not begun).

    InputError when it cannot be read or is not a segpipe manifest; storage outages propagate as they are.
    """
    path = storage.join(root, MANIFEST)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(json.loads(data))
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{storage.to_uri(fs, path)} is not a segpipe manifest: {e!r}") from e


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: dict) -> None:
    """NaN is written as null: JSON has no NaN, and metrics.json's definitions say what null means."""
    storage.write_bytes(fs, path, json.dumps(_json_safe(obj), indent=2, allow_nan=False, default=str).encode())


def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
