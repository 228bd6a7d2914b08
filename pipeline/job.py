"""The job's steps around inference: plan (preflight, list, shard, find committed work) and finalize
(reduce the stats parts into metrics, then write the manifest last, as the commit).

The flow in flows/ wires these with the Ray step in pipeline/execution/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputError, SegpipeError
from pipeline.inference.plan import plan_inference
from pipeline.labels import get_label_format
from pipeline.metrics import metrics_report
from pipeline.models.checkpoint import ModelMeta
from pipeline.models.loading import model_source
from pipeline.outputs import (
    CONFUSION,
    MANIFEST,
    METRICS,
    Manifest,
    Timings,
    build_manifest,
    committed_parts,
    committed_run_id,
    read_manifest,
    reduce_parts,
    write_confusion,
    write_json,
)
from pipeline.preflight import preflight
from pipeline.shard import ShardSummary
from pipeline.sources import Shard, get_layout
from pipeline.sources.layout import InputSource

log = logging.getLogger(__name__)

# Fields that change what a run writes; batch size, actors, threads and PNG level do not.
_RESULT_FIELDS = {
    *("input_uri", "labels_uri", "model", "weights", "shard_size", "device", "precision"),
    *("inference", "input", "labels"),
}


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


def plan_job(cfg: JobConfig) -> JobPlan:
    """Preflight, then list and shard the input and find the shards a previous attempt committed.

    Raises a SegpipeError naming the path at fault before anything is written.
    """
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    checked = preflight(cfg)
    start = time.perf_counter()
    cfg, source = _input(checked.cfg)
    meta, sha = checked.meta, checked.checkpoint_sha256
    shards = source.plan(cfg.shard_size)
    if not shards:
        raise InputError(f"input {cfg.input_uri} holds no {source.layout} input to segment")
    run_id = run_id_for(cfg, sha)
    out_fs, out_root = cfg.resolve(cfg.output_uri)
    out_fs.invalidate_cache()  # object-store listings are cached per process; another may have written
    _same_job_or_none(read_manifest(out_fs, out_root), run_id, cfg.output_uri)
    committed = _committed_shards(out_fs, out_root, shards, run_id, cfg.output_uri)
    removed = storage.remove_temporaries(out_fs, out_root)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    log.info("planned %d %s shards (%d already committed), run %s", len(shards), source.layout, len(committed), run_id)
    plan_seconds = checked.seconds + time.perf_counter() - start
    return JobPlan(cfg, run_id, meta, sha, shards, committed, started_at, plan_seconds)


def _input(cfg: JobConfig) -> tuple[JobConfig, InputSource]:
    """The input, with its layout detected once here and written into the config the actors receive."""
    source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"layout": source.layout})})
    if cfg.labels_uri and not get_layout(source.layout).label_files and get_label_format(cfg.labels.format).per_image:
        raise ConfigError(
            f"labels_uri: the {source.layout} layout carries its labels in the input itself "
            "(input.label_suffix, input.label_column); labels_uri is for loose files or a COCO JSON"
        )
    return cfg, source


def _same_job_or_none(manifest: Manifest | None, run_id: str, uri: str) -> None:
    """A finished run in the output must be this same job (which then resumes, redoing nothing)."""
    if manifest is not None and manifest.run_id != run_id:
        raise InputError(
            f"output {uri} holds results of another job (run {manifest.run_id}, this job is run {run_id}); "
            "choose an empty output or delete it"
        )


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
    """Reduce every shard's stats into metrics.json and confusion_matrix.parquet; write manifest.json last.

    Returns the run's result document: ``{"manifest": <manifest.json>, "metrics": <metrics.json>}``.
    """
    start = time.perf_counter()
    cfg, meta = plan.cfg, plan.meta
    fs, root = cfg.resolve(cfg.output_uri)
    fs.invalidate_cache()  # the actors wrote the parts from other processes
    parts = committed_parts(fs, root)
    missing = [s.shard_id for s in plan.shards if s.shard_id not in parts]
    if missing:
        raise SegpipeError(f"cannot finalize: {len(missing)} shards are not committed, e.g. {missing[0]}")
    mat, counts = reduce_parts(fs, [parts[s.shard_id] for s in plan.shards], meta.num_classes)
    names = list(meta.class_names)
    metrics_doc = {
        "run_id": plan.run_id,
        "images": counts.images,
        "labeled_images": counts.labeled,
        "errors": counts.errors,
        **metrics_report(mat, names),
    }
    write_json(fs, storage.join(root, METRICS), metrics_doc)
    write_confusion(fs, storage.join(root, CONFUSION), mat, names)
    processed = sum(s.images for s in summaries)
    timings = Timings(
        plan_seconds=round(plan.plan_seconds, 3),
        infer_seconds=round(infer_seconds, 3),
        reduce_seconds=round(time.perf_counter() - start, 3),
        images_per_second=round(processed / infer_seconds, 2) if infer_seconds else None,
    )
    manifest = build_manifest(
        run_id=plan.run_id,
        started_at=plan.started_at,
        config=cfg,
        meta=meta,
        checkpoint_sha256=plan.checkpoint_sha256,
        shards=plan.shards,
        done={s.shard_id: s.images for s in summaries},
        counts=counts,
        timings=timings,
        inference=plan_inference(cfg.inference, meta).describe(),
        model_source=model_source(cfg),
    )
    write_json(fs, storage.join(root, MANIFEST), manifest.to_json())
    log.info("run %s committed: %s", plan.run_id, storage.to_uri(fs, storage.join(root, MANIFEST)))
    return {"manifest": manifest.to_json(), "metrics": metrics_doc}
