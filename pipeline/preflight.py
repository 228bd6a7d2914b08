"""Preflight: every location, the checkpoint and the labels checked before any work, each failure a
SegpipeError naming the field or path at fault (or StorageUnavailable, retried, when a store does not answer).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.errors import ConfigError, InputError
from pipeline.inference.predictor import resolve_device
from pipeline.labels import LabelError, get_label_format
from pipeline.labels.reader import load_label_format
from pipeline.models.checkpoint import ModelMeta
from pipeline.models.loading import load_model, model_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    given: JobConfig  # the config as checked
    cfg: JobConfig  # the same with ``model`` and ``checkpoint_sha256`` filled in from the model loaded
    meta: ModelMeta
    checkpoint_sha256: str
    seconds: float  # what the checks took


_checked_ahead: list[Preflight] = []


@contextmanager
def checked_ahead(checked: Preflight) -> Iterator[None]:
    """Within the block, the next preflight of the same config in this process returns ``checked`` instead of
    reading and hashing the checkpoint again: ``segpipe run`` checks before Prefect starts, then runs the flow,
    whose plan step would otherwise repeat it. One use only, so a later run checks afresh."""
    _checked_ahead.append(checked)
    try:
        yield
    finally:
        if checked in _checked_ahead:
            _checked_ahead.remove(checked)


def preflight(cfg: JobConfig) -> Preflight:
    """Check every location and the checkpoint; raise a SegpipeError naming the one at fault."""
    for checked in _checked_ahead:
        if checked.given == cfg:
            _checked_ahead.remove(checked)
            return checked
    start = time.perf_counter()
    _require(cfg, cfg.input_uri, "input", "any")
    if cfg.labels_uri:
        _require(cfg, cfg.labels_uri, "labels", "dir" if get_label_format(cfg.labels.format).per_image else "file")
    _require_output(cfg)
    _check_local_device(cfg)
    loaded = load_model(cfg)
    # The actors load the model again: they must get the bytes checked here, and the model they name.
    meta, sha = loaded.meta, loaded.sha256
    filled = cfg.model_copy(update={"model": cfg.model or meta.arch, "checkpoint_sha256": sha})
    _check_labels(filled, meta)
    log.info("preflight passed: input, labels, output, device; %s (sha256 %s)", model_source(cfg), sha)
    return Preflight(cfg, filled, meta, sha, time.perf_counter() - start)


def _require(cfg: JobConfig, uri: str, what: str, kind: str) -> None:
    """``uri`` must be a folder (``dir``), a file (``file``) or either (``any``).

    InputError when it is missing or unusable; StorageUnavailable (retried) when its store does not answer.
    """
    try:
        fs, path = cfg.resolve(uri)
        found = {"dir": fs.isdir, "file": fs.isfile, "any": fs.exists}[kind](path)
    except Exception as e:  # botocore's client errors are not OSErrors: classify, do not guess from the type
        raise storage.location_error(e, f"{what} {uri} cannot be read: {e}", InputError) from e
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
        raise storage.location_error(e, f"output {cfg.output_uri} cannot be reached: {e}", InputError) from e
    if missing:
        raise InputError(f"output {cfg.output_uri}: bucket {bucket} does not exist")


def _check_local_device(cfg: JobConfig) -> None:
    """With no cluster to join, the actors run on this machine: a device it lacks fails here, once, rather
    than in every actor. (On a cluster the driver may well have no GPU while the workers do.)"""
    if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        resolve_device(cfg.device)


def _check_labels(cfg: JobConfig, meta: ModelMeta) -> None:
    """The label format must load (a COCO JSON parses) and agree with the model on the number of classes."""
    if not cfg.labels_uri and not get_label_format(cfg.labels.format).per_image:
        raise ConfigError(f"labels_uri: the {cfg.labels.format} label format needs its dataset file's URI")
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
