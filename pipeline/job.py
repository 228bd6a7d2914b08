"""The job's steps around inference: plan (validate everything, list, shard, find committed work)
and finalize (reduce the stats parts into metrics, then write the manifest last, as the commit).

The flow in flows/ wires these with the Ray step in pipeline/execution.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline import __version__, storage
from pipeline.config import JobConfig
from pipeline.errors import CheckpointError, ConfigError, InputError, SegpipeError
from pipeline.labels import LabelError
from pipeline.labels.reader import load_label_format
from pipeline.metrics import metrics_report
from pipeline.models.checkpoint import ModelMeta, load_checkpoint, sha256_hex
from pipeline.outputs import (
    CONFUSION,
    MANIFEST,
    METRICS,
    committed_parts,
    committed_run_id,
    read_confusion,
    write_confusion,
    write_json,
)
from pipeline.shard import ShardSummary
from pipeline.sources import Shard
from pipeline.sources.layout import InputSource

log = logging.getLogger(__name__)

# Fields that change what a run writes; batch size, actors, threads and PNG level do not.
_RESULT_FIELDS = {"input_uri", "labels_uri", "model", "shard_size", "device", "precision", "input", "labels"}


@dataclass
class JobPlan:
    cfg: JobConfig
    run_id: str
    meta: ModelMeta
    checkpoint_sha256: str
    shards: list[Shard]
    committed: set[str] = field(default_factory=set)
    started_at: str = ""
    plan_seconds: float = 0.0

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.committed]


def run_id_for(cfg: JobConfig, checkpoint_sha256: str) -> str:
    """Deterministic: the same job into the same output keeps its id across resumes."""
    key = cfg.model_dump(mode="json", include=_RESULT_FIELDS) | {"checkpoint_sha256": checkpoint_sha256}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _require(cfg: JobConfig, uri: str, what: str, kind: str) -> None:
    """``uri`` must be a folder (``dir``), a file (``file``) or either (``any``)."""
    try:
        fs, path = cfg.resolve(uri)
        found = {"dir": fs.isdir, "file": fs.isfile, "any": fs.exists}[kind](path)
    except Exception as e:  # any client error (botocore's are not OSErrors) means the location is unusable
        raise InputError(f"{what} {uri} cannot be read: {e}") from e
    if not found:
        expected = {"dir": "is not a folder", "file": "is not a file", "any": ""}[kind]
        raise InputError(f"{what} {uri} does not exist" + (f" or {expected}" if expected else ""))


def _require_output(cfg: JobConfig) -> None:
    """The output's bucket must exist and answer; a local output folder is created by the first write."""
    try:
        fs, root = cfg.resolve(cfg.output_uri)
        bucket = storage.bucket_of(fs, root)
        missing = bucket is not None and not fs.exists(bucket)
    except Exception as e:
        raise InputError(f"output {cfg.output_uri} cannot be reached: {e}") from e
    if missing:
        raise InputError(f"output {cfg.output_uri}: bucket {bucket} does not exist")


@dataclass(frozen=True)
class Preflight:
    cfg: JobConfig  # with ``model`` and ``checkpoint_sha256`` filled in from the checkpoint
    meta: ModelMeta
    checkpoint_sha256: str


def preflight(cfg: JobConfig) -> Preflight:
    """Check every location and the checkpoint; raise a SegpipeError naming the one at fault."""
    _require(cfg, cfg.input_uri, "input", "any")
    if cfg.labels_uri:
        _require(cfg, cfg.labels_uri, "labels", "file" if cfg.labels.format == "coco" else "dir")
    _require_output(cfg)
    try:
        ckpt_fs, ckpt_path = cfg.resolve(cfg.checkpoint_uri)
        data = ckpt_fs.cat_file(ckpt_path)
    except Exception as e:  # missing file, unreachable store, denied access
        raise CheckpointError(f"cannot read checkpoint {cfg.checkpoint_uri}: {e}") from e
    _, meta = load_checkpoint(data, cfg.checkpoint_uri, expect_arch=cfg.model, sha256=cfg.checkpoint_sha256)
    # The actors load the checkpoint again: they must get the bytes checked here, and the model they name.
    sha = sha256_hex(data)
    cfg = cfg.model_copy(update={"model": cfg.model or meta.arch, "checkpoint_sha256": sha})
    _check_labels(cfg, meta)
    return Preflight(cfg, meta, sha)


def _check_labels(cfg: JobConfig, meta: ModelMeta) -> None:
    """The label format must load (a COCO JSON parses) and agree with the model on the number of classes."""
    if not cfg.labels_uri and cfg.labels.format == "coco":
        raise ConfigError("labels_uri: the coco label format needs the instances JSON's URI")
    try:
        fmt = load_label_format(cfg.labels, cfg.resolve(cfg.labels_uri) if cfg.labels_uri else None)
    except (LabelError, ConfigError) as e:  # e.g. a JSON that is not COCO, a mapping naming unknown categories
        raise ConfigError(f"labels {cfg.labels_uri}: {e}") from e
    names = fmt.class_names()
    if names is not None and len(names) > meta.num_classes:
        raise ConfigError(
            f"labels.format: {cfg.labels.format} labels have {len(names)} classes but the model "
            f"({cfg.model}) predicts {meta.num_classes}"
        )


def plan_job(cfg: JobConfig) -> JobPlan:
    """Preflight, then list and shard the input and find the shards a previous attempt committed.

    Raises a SegpipeError naming the path at fault before anything is written.
    """
    start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    checked = preflight(cfg)
    cfg, meta, sha = checked.cfg, checked.meta, checked.checkpoint_sha256
    source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"layout": source.layout})})
    if cfg.labels_uri and source.layout != "files" and cfg.labels.format != "coco":
        raise ConfigError(
            f"labels_uri: the {source.layout} layout carries its labels in the input itself "
            "(input.label_suffix, input.label_column); labels_uri is for loose files or a COCO JSON"
        )
    shards = source.plan(cfg.shard_size)
    if not shards:
        raise InputError(f"input {cfg.input_uri} holds no {source.layout} input to segment")
    run_id = run_id_for(cfg, sha)
    out_fs, out_root = cfg.resolve(cfg.output_uri)
    out_fs.invalidate_cache()  # object-store listings are cached per process; another may have written
    committed = _committed_shards(out_fs, out_root, shards, run_id, cfg.output_uri)
    removed = storage.remove_temporaries(out_fs, out_root)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    log.info("planned %d %s shards (%d already committed), run %s", len(shards), source.layout, len(committed), run_id)
    return JobPlan(cfg, run_id, meta, sha, shards, committed, started_at, time.perf_counter() - start)


def _committed_shards(fs, root: str, shards: list[Shard], run_id: str, uri: str) -> set[str]:
    """Shards whose stats part this same job wrote. Parts of another job in the output stop the run."""
    found = committed_parts(fs, root)
    planned = {s.shard_id for s in shards}
    foreign = sorted(set(found) - planned)
    if foreign:
        raise InputError(
            f"output {uri} holds stats parts of another job (e.g. part-{foreign[0]}.parquet); "
            "choose an empty output or delete it"
        )
    done = set()
    for shard_id, path in found.items():
        other = committed_run_id(fs, path)
        if other != run_id:
            raise InputError(
                f"output {uri} holds results of another job (run {other}, this job is run {run_id}); "
                "choose an empty output or delete it"
            )
        done.add(shard_id)
    return done


def finalize_job(plan: JobPlan, summaries: list[ShardSummary], infer_seconds: float) -> dict:
    """Reduce every shard's stats into metrics.json and confusion_matrix.parquet; write manifest.json last."""
    start = time.perf_counter()
    cfg, meta = plan.cfg, plan.meta
    fs, root = cfg.resolve(cfg.output_uri)
    fs.invalidate_cache()  # the actors wrote the parts from other processes
    parts = committed_parts(fs, root)
    missing = [s.shard_id for s in plan.shards if s.shard_id not in parts]
    if missing:
        raise SegpipeError(f"cannot finalize: {len(missing)} shards are not committed, e.g. {missing[0]}")
    mat, counts = read_confusion(fs, [parts[s.shard_id] for s in plan.shards], meta.num_classes)
    names = list(meta.class_names)
    metrics_doc = {
        "run_id": plan.run_id,
        "images": counts["images"],
        "labeled_images": counts["labeled"],
        "errors": counts["errors"],
        **metrics_report(mat, names),
    }
    write_json(fs, storage.join(root, METRICS), metrics_doc)
    write_confusion(fs, storage.join(root, CONFUSION), mat, names)
    reduce_seconds = time.perf_counter() - start
    done_now = {s.shard_id: s for s in summaries}
    manifest = {
        "run_id": plan.run_id,
        "status": "complete",
        "started_at": plan.started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": __version__,
        "config": cfg.model_dump(mode="json"),  # secrets come out as "**********"
        "model": {
            "name": cfg.model,
            "checkpoint_uri": cfg.checkpoint_uri,
            "checkpoint_sha256": plan.checkpoint_sha256,
            "class_names": names,
            "palette": meta.palette_array()[: len(names)].tolist(),
            "normalization": {"mean": list(meta.mean), "std": list(meta.std)},
            "input_policy": meta.input_policy,
            "stride": meta.stride,
        },
        "counts": {
            "images": counts["images"],
            "errors": counts["errors"],
            "labeled": counts["labeled"],
            "shards": len(plan.shards),
            "shards_skipped": len(plan.shards) - len(done_now),
        },
        "shards": [
            {
                "shard_id": s.shard_id,
                "images": done_now[s.shard_id].images if s.shard_id in done_now else s.images,
                "status": "processed" if s.shard_id in done_now else "skipped (committed earlier)",
            }
            for s in plan.shards
        ],
        "timings": {
            "plan_seconds": round(plan.plan_seconds, 3),
            "infer_seconds": round(infer_seconds, 3),
            "reduce_seconds": round(reduce_seconds, 3),
            "images_per_second": round(sum(s.images for s in summaries) / infer_seconds, 2) if infer_seconds else None,
        },
    }
    write_json(fs, storage.join(root, MANIFEST), manifest)
    log.info("run %s committed: %s", plan.run_id, storage.to_uri(fs, storage.join(root, MANIFEST)))
    return {"manifest": manifest, "metrics": metrics_doc}
