"""``manifest.json``: the typed record of a finished run, its one builder and its one reader.

Written last, it is the run's commit: a reader that finds it with ``status: complete`` may trust every file
it names. The report, ``evaluate`` and a resumed run all read it through ``read_manifest``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline import __version__, storage
from pipeline.errors import InputError
from pipeline.outputs.paths import MANIFEST, stats_path

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
class Increment:
    """One run into the output's result set: what it found changed in the input and what it wrote.
    A full run is one increment; an incremental output gains one per run."""

    number: int
    started_at: str
    finished_at: str
    processed: int  # images it segmented (rows of its new parts), errors included
    errors: int  # error rows among them
    images: int  # images in the result set once it committed
    new_files: int  # input files not in the result set before
    changed_files: int  # input files whose version changed: their earlier rows left the set
    deleted_files: int  # files of the result set no longer listed in the input
    pruned_files: int  # of those, files whose rows left the set (prune_deleted)
    parts: list[str]  # the stats parts (shard ids) it wrote
    replaced: list[str]  # earlier parts it replaced, each by a part without the rows that left the set
    rewritten: list[str]  # those replacement parts (a replaced part left with no row has none)


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
    increments: list[Increment] = field(default_factory=list)  # oldest first; the last one wrote this manifest

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def incremental(self) -> bool:
        return self.config.get("mode") == "incremental" or len(self.increments) > 1

    def to_json(self) -> dict[str, Any]:
        # Shard entries by hand: asdict's generic recursion takes seconds over 100k of them.
        shards = [{"shard_id": s.shard_id, "images": s.images, "status": s.status} for s in self.shards]
        return asdict(replace(self, shards=[])) | {"shards": shards}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        """The manifest in ``doc``; TypeError or KeyError when a field is missing or unknown."""
        parts = {
            "model": ModelInfo(**doc["model"]),
            "counts": RunCounts(**doc["counts"]),
            "shards": [ShardEntry(**s) for s in doc["shards"]],
            "timings": Timings(**doc["timings"]),
            "increments": [Increment(**i) for i in doc.get("increments", [])],
        }
        return cls(**(doc | parts))


def build_manifest(
    *,
    run_id: str,
    started_at: str,
    config: JobConfig,
    meta: ModelMeta,
    checkpoint_sha256: str,
    shards: list[ShardEntry],
    counts: RowCounts,
    timings: Timings,
    inference: dict[str, Any],
    model_source: str,
    increments: list[Increment],
) -> Manifest:
    """The manifest of a result set whose every part in ``shards`` is committed."""
    names = list(meta.class_names)
    return Manifest(
        run_id=run_id,
        status=COMPLETE,
        started_at=started_at,
        finished_at=increments[-1].finished_at,
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
            shards_skipped=sum(s.status != PROCESSED for s in shards),
            error_kinds=dict(sorted(counts.error_kinds.items())),
        ),
        shards=shards,
        timings=timings,
        inference=inference,
        increments=increments,
    )


def shard_entries(shards: list[Shard], done: dict[str, int]) -> list[ShardEntry]:
    """The entries of a plan's ``shards``; ``done``: shard id -> images, of the shards this attempt ran (the
    others were committed by an earlier one)."""
    return [_entry(s, done.get(s.shard_id)) for s in shards]


def _entry(shard: Shard, images: int | None) -> ShardEntry:
    if images is None:
        return ShardEntry(shard_id=shard.shard_id, images=shard.images, status=SKIPPED)
    return ShardEntry(shard_id=shard.shard_id, images=images, status=PROCESSED)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def part_paths(root: str, manifest: Manifest) -> list[str]:
    """The stats parts of the result set ``manifest`` commits: what a reader should read. A listing of stats/
    is the same set once a run has finished, but while an increment runs it also holds that run's parts."""
    return [stats_path(root, s.shard_id) for s in manifest.shards]


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
