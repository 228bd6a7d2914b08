"""The job's steps around inference: plan (preflight, list, shard, find committed work) and finalize
(reduce the stats parts into metrics, then write the manifest last, as the commit). In incremental mode
(``pipeline.incremental``) the plan holds only what changed, and finalize brings the result set up to date.

The flow in flows/ wires these with the Ray step in pipeline/execution/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputError, SegpipeError
from pipeline.execution.reduce import committed_totals
from pipeline.incremental import (
    IncrementPlan,
    find_changes,
    plan_changes,
    read_committed,
    remove_replaced,
    replace_parts,
)
from pipeline.inference.plan import plan_inference
from pipeline.labels import get_label_format
from pipeline.metrics import metrics_report
from pipeline.models.checkpoint import ModelMeta
from pipeline.models.loading import model_source
from pipeline.outputs import (
    CONFUSION,
    MANIFEST,
    METRICS,
    Increment,
    Manifest,
    ShardEntry,
    Timings,
    build_manifest,
    committed_parts,
    committed_run_id,
    read_manifest,
    read_tables,
    shard_entries,
    stats_path,
    write_confusion,
    write_json,
)
from pipeline.outputs.manifest import SKIPPED, now
from pipeline.outputs.plan import PlanInfo, commit_plan, light_shards, read_plan_info, write_plan
from pipeline.outputs.totals import Totals
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
    shards: list[Shard]  # this increment's (a full run's: all of them)
    committed: set[str] = field(default_factory=set)
    started_at: str = ""
    plan_seconds: float = 0.0
    increment: IncrementPlan = field(default_factory=lambda: IncrementPlan(number=1))
    info: PlanInfo | None = None  # the plan file's counts

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.committed]


def run_id_for(cfg: JobConfig, checkpoint_sha256: str) -> str:
    """Deterministic: the same job into the same output keeps its id across resumes and increments."""
    key = _identity(cfg) | {"checkpoint_sha256": checkpoint_sha256}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _identity(config: dict | JobConfig) -> dict:
    doc = config.model_dump(mode="json") if isinstance(config, JobConfig) else config
    return {k: v for k, v in doc.items() if k in _RESULT_FIELDS}


def plan_job(cfg: JobConfig, dry_run: bool = False) -> JobPlan:
    """Preflight, then list the input and plan this run's shards: all of them, or in incremental mode those of
    the files new or changed since the output's last run; find the shards an interrupted attempt committed.
    The shards stream into the plan file (``outputs.plan``) as the listing goes; a full run of the same job
    reuses a committed one. ``dry_run``: write and remove nothing, only count.

    Raises a SegpipeError naming the path at fault before anything is written.
    """
    started_at = now()
    checked = preflight(cfg)
    start = time.perf_counter()
    cfg, source = _input(checked.cfg)
    meta, sha = checked.meta, checked.checkpoint_sha256
    run_id = run_id_for(cfg, sha)
    out_fs, out_root = cfg.resolve(cfg.output_uri)
    out_fs.invalidate_cache()  # object-store listings are cached per process; another may have written
    manifest = read_manifest(out_fs, out_root)
    _same_job_or_none(manifest, cfg, sha, run_id)
    if cfg.mode == "incremental":  # an increment is planned from a fresh listing every time
        listed, increment = _plan_increment(cfg, source, manifest, out_fs, out_root)
        shards, info = write_plan(out_fs, out_root, listed, run_id, increment.number, save=not dry_run)
        reused = False
    else:
        shards, info, reused = _plan_full(cfg, source, manifest, out_fs, out_root, run_id, dry_run)
        increment = IncrementPlan(number=1, new_files=info.files)
    committed = _committed_shards(out_fs, out_root, shards, increment, run_id, cfg, dry_run, trusted=reused)
    if shards and not (dry_run or reused):
        commit_plan(out_fs, out_root, info)  # only once the output's parts were checked against it
    removed = 0 if dry_run else storage.remove_temporaries(out_fs, out_root)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    log.info("planned %d %s shards (%d already committed), run %s", len(shards), source.layout, len(committed), run_id)
    plan_seconds = checked.seconds + time.perf_counter() - start
    return JobPlan(cfg, run_id, meta, sha, shards, committed, started_at, plan_seconds, increment, info)


def _input(cfg: JobConfig) -> tuple[JobConfig, InputSource]:
    """The input, with its layout detected (and what the data decides) once here and written into the config
    the actors receive."""
    source = InputSource(*cfg.resolve(cfg.input_uri), cfg.input)
    source.cfg = source.resolve()
    cfg = cfg.model_copy(update={"input": source.cfg})
    if cfg.labels_uri and not get_layout(source.layout).label_files and get_label_format(cfg.labels.format).per_image:
        raise ConfigError(
            f"labels_uri: the {source.layout} layout carries its labels in the input itself "
            "(input.label_suffix, input.label_column); labels_uri is for loose files or a COCO JSON"
        )
    return cfg, source


def _same_job_or_none(manifest: Manifest | None, cfg: JobConfig, sha: str, run_id: str) -> None:
    """A finished run in the output must be of this same job (which then resumes, or adds an increment)."""
    if manifest is None or manifest.run_id == run_id:
        return
    theirs = _identity(manifest.config) | {"checkpoint_sha256": manifest.model.checkpoint_sha256}
    ours = _identity(cfg) | {"checkpoint_sha256": sha}
    differ = sorted(k for k in ours if theirs.get(k) != ours[k])
    raise InputError(
        f"output {cfg.output_uri} holds results of another job (run {manifest.run_id}, this job is run {run_id}; "
        f"they differ in {', '.join(differ) or 'their settings'}); choose a new output for this job"
    )


def _plan_full(
    cfg: JobConfig, source: InputSource, manifest: Manifest | None, fs, root: str, run_id: str, dry_run: bool
) -> tuple[list[Shard], PlanInfo, bool]:
    """Every shard of the input, streamed into the plan file; or the plan an earlier attempt of this job saved
    (then True). Another job's plan, with parts committed, is refused before anything is written."""
    if manifest is not None and manifest.incremental:
        raise InputError(
            f"output {cfg.output_uri} holds an incremental result set ({len(manifest.increments)} increments): "
            "run with mode: incremental to bring it up to date, or choose a new output"
        )
    found = read_plan_info(fs, root)
    if found is not None and (found.run_id, found.increment) == (run_id, 1):
        log.info("reusing this job's plan in the output (%d shards): the input is not listed again", found.shards)
        return light_shards(fs, root, found), found, True
    if found is not None and committed_parts(fs, root):
        raise InputError(
            f"output {cfg.output_uri} holds the plan and stats parts of another job (run {found.run_id}, this job "
            f"is run {run_id}); choose a new output for this job"
        )
    shards, info = write_plan(fs, root, source.plan(cfg.shard_size), run_id, 1, save=not dry_run)
    if not shards:
        raise InputError(f"input {cfg.input_uri} holds no {source.layout} input to segment")
    return shards, info, False


def _plan_increment(
    cfg: JobConfig, source: InputSource, manifest: Manifest | None, fs, root: str
) -> tuple[list[Shard], IncrementPlan]:
    """The shards of the files new or changed since the output's last increment, and what leaves the set."""
    try:
        listing = source.list_inputs()
    except NotImplementedError:
        raise ConfigError(f"mode: the {source.layout} layout cannot run incrementally (it lists no versions)") from None
    committed = read_committed(fs, root, manifest)
    if not listing and not committed.rows:
        raise InputError(f"input {cfg.input_uri} holds no {source.layout} input to segment")
    earlier = manifest.increments if manifest else []
    number = max(len(earlier), 1) + 1 if manifest else 1  # a manifest older than increments was one run
    changes = find_changes(listing, committed.versions)
    shards = source.plan_increment(changes.todo, cfg.shard_size, number)
    increment = plan_changes(number, earlier, committed, changes, cfg.prune_deleted)
    log.info(
        "increment %d: %d new, %d changed, %d deleted files (%d pruned); %d parts to replace",
        *(number, increment.new_files, increment.changed_files, increment.deleted_files, increment.pruned_files),
        len(increment.replaced),
    )
    return shards, increment


def _committed_shards(
    fs,
    root: str,
    shards: list[Shard],
    increment: IncrementPlan,
    run_id: str,
    cfg: JobConfig,
    dry_run: bool,
    trusted: bool,
) -> set[str]:
    """Shards whose stats part this same job wrote. Other parts no manifest names are left by an interrupted
    increment of this job, and removed (not in a dry run); in a full run, or when another job wrote them, they
    stop the run. ``trusted``: the plan is this job's own, committed by an earlier attempt, and no other job
    plans into an output holding it, so its parts need no footer read each (a million reads, at scale)."""
    found = committed_parts(fs, root)
    planned = {s.shard_id for s in shards}
    stray = sorted(set(found) - planned - set(increment.kept) - set(increment.replaced))
    ours = [key for key in stray if cfg.mode == "incremental" and committed_run_id(fs, found[key]) == run_id]
    foreign = sorted(set(stray) - set(ours))
    if foreign:
        raise InputError(
            f"output {cfg.output_uri} holds stats parts of another job or of another listing of the input "
            f"(e.g. part-{foreign[0]}.parquet); choose an empty output or delete it, or run with mode: "
            "incremental to segment only what changed in the input"
        )
    if ours and not dry_run:
        storage.remove_files(fs, [found[key] for key in ours])
        log.info("removed %d stats parts of an interrupted increment that no manifest names", len(ours))
    done = planned & set(found)
    for shard_id in () if trusted else done:
        other = committed_run_id(fs, found[shard_id])
        if other != run_id:
            raise InputError(
                f"output {cfg.output_uri} holds results of another job (run {other}, this job is run {run_id}); "
                "choose a new output for this job"
            )
    return done


def finalize_job(plan: JobPlan, summaries: list[ShardSummary], infer_seconds: float) -> dict:
    """Replace the parts whose rows left the set, reduce every current part into metrics.json and
    confusion_matrix.parquet, write manifest.json last, then delete what the set no longer holds.

    Returns the run's result document: ``{"manifest": <manifest.json>, "metrics": <metrics.json>}``.
    """
    start = time.perf_counter()
    cfg, meta, inc = plan.cfg, plan.meta, plan.increment
    fs, root = cfg.resolve(cfg.output_uri)
    fs.invalidate_cache()  # the actors wrote the parts from other processes
    ran = {s.shard_id for s in summaries}
    missing = [s.shard_id for s in plan.shards if s.shard_id not in ran and s.shard_id not in plan.committed]
    if missing:
        raise SegpipeError(f"cannot finalize: {len(missing)} shards are not committed, e.g. {missing[0]}")
    rewritten, left = replace_parts(fs, root, inc, meta.num_classes) if inc.replaced else ({}, set())
    earlier = {**inc.kept, **rewritten}
    new = _new_totals(root, plan, summaries)
    totals = new + committed_totals(cfg, [stats_path(root, key) for key in earlier], meta.num_classes)
    counts, new_counts = totals.counts, new.counts
    names = list(meta.class_names)
    metrics_doc = {
        "run_id": plan.run_id,
        "images": counts.images,
        "labeled_images": counts.labeled,
        "errors": counts.errors,
        **metrics_report(totals.confusion, names),
    }
    write_json(fs, storage.join(root, METRICS), metrics_doc)
    write_confusion(fs, storage.join(root, CONFUSION), totals.confusion, names)
    processed = sum(s.images for s in summaries)
    timings = Timings(
        plan_seconds=round(plan.plan_seconds, 3),
        infer_seconds=round(infer_seconds, 3),
        reduce_seconds=round(time.perf_counter() - start, 3),
        images_per_second=round(processed / infer_seconds, 2) if infer_seconds else None,
    )
    increment = Increment(
        number=inc.number,
        started_at=plan.started_at,
        finished_at=now(),
        processed=new_counts.images,
        errors=new_counts.errors,
        images=counts.images,
        new_files=inc.new_files,
        changed_files=inc.changed_files,
        deleted_files=inc.deleted_files,
        pruned_files=inc.pruned_files,
        parts=[s.shard_id for s in plan.shards],
        replaced=inc.replaced,
        rewritten=sorted(rewritten),
    )
    earlier_entries = [ShardEntry(shard_id=key, images=n, status=SKIPPED) for key, n in sorted(earlier.items())]
    manifest = build_manifest(
        run_id=plan.run_id,
        started_at=plan.started_at,
        config=cfg,
        meta=meta,
        checkpoint_sha256=plan.checkpoint_sha256,
        shards=earlier_entries + shard_entries(plan.shards, {s.shard_id: s.images for s in summaries}),
        counts=counts,
        timings=timings,
        inference=plan_inference(cfg.inference, meta).describe(),
        model_source=model_source(cfg),
        increments=[*inc.earlier, increment],
    )
    manifest_doc = manifest.to_json()
    write_json(fs, storage.join(root, MANIFEST), manifest_doc)
    log.info("run %s committed: %s", plan.run_id, storage.to_uri(fs, storage.join(root, MANIFEST)))
    if inc.replaced:  # a changed image keeps its mask file's name: only the others' masks go
        remove_replaced(fs, root, inc.replaced, left - _masked_ids(fs, root, plan.shards))
    return {"manifest": manifest_doc, "metrics": metrics_doc}


def _new_totals(root: str, plan: JobPlan, summaries: list[ShardSummary]) -> Totals:
    """This plan's parts summed: the totals the summaries brought (``ShardResults`` folds them as they come),
    and the footers of the parts committed by an earlier attempt, or whose summary brought none."""
    folded = getattr(summaries, "totals", None)
    total = Totals(plan.meta.num_classes)
    if folded is not None:
        total += folded
    for s in summaries:
        if s.totals is not None:
            total += s.totals
    ran = {s.shard_id for s in summaries if s.totals is not None or folded is not None}
    unread = [s.shard_id for s in plan.shards if s.shard_id not in ran]
    return total + committed_totals(plan.cfg, [stats_path(root, key) for key in unread], plan.meta.num_classes)


def _masked_ids(fs, root: str, shards: list[Shard]) -> set[str]:
    """The ids of the images ``shards``' parts wrote a mask for."""
    masked = set()
    for table in read_tables(fs, [stats_path(root, s.shard_id) for s in shards], ["image_id", "mask_uri"]):
        ids, masks = table["image_id"].to_pylist(), table["mask_uri"].to_pylist()
        masked.update(image_id for image_id, mask in zip(ids, masks, strict=True) if mask)
    return masked
