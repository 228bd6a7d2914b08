"""Training a registry model on a labeled dataset in any input layout and label format.

The dataset is read once through the same sources and label readers a job uses, decoded into memory
(training is for the small labeled sets that fine-tuning needs, not the millions a job segments), then
sampled as random crops with flips. Validation mIoU is computed after every epoch with the predictor a
job uses; the best epoch is written as a checkpoint with its metadata.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from pipeline import storage
from pipeline.config import DataConfig, InferenceConfig, InputConfig, TrainConfig
from pipeline.errors import InputError
from pipeline.geo.raster import RasterFile, read_whole
from pipeline.images import DecodeError, decode_rgb
from pipeline.inference.plan import plan_inference
from pipeline.inference.predictor import Failure, Predictor, resolve_device
from pipeline.labels import LabelError, validate_label
from pipeline.labels.reader import LabelReader
from pipeline.metrics import ConfusionMatrix
from pipeline.models import get_model
from pipeline.models.checkpoint import ModelMeta, default_meta, load_checkpoint, read_checkpoint, save_checkpoint
from pipeline.palette import IGNORE_INDEX
from pipeline.sources.layout import InputSource
from pipeline.windowed import is_windowed

log = logging.getLogger(__name__)

Pair = tuple[np.ndarray, np.ndarray]  # (HxWx3 uint8 image, HxW uint8 label)


def _decoded(image: bytes | RasterFile | None, cfg: InputConfig) -> np.ndarray | None:
    """A training image whole: a TIFF as a job reads it (bands, scaling), anything else through Pillow."""
    if image is None:
        return None
    return read_whole(image, cfg) if is_windowed(image) else decode_rgb(image)


def load_labeled(cfg: TrainConfig, data: DataConfig, num_classes: int) -> list[Pair]:
    """Every (image, label) pair of ``data``; unreadable images, unlabeled images and bad labels are
    counted, logged and left out."""
    source = InputSource(*cfg.resolve(data.input_uri), data.input)
    labels = LabelReader(data.labels, cfg.resolve(data.labels_uri) if data.labels_uri else None, source.layout)
    pairs: list[Pair] = []
    skipped = {"unreadable": 0, "unlabeled": 0, "bad label": 0}
    with ThreadPoolExecutor(8) as pool:
        for shard in source.plan(shard_size=64):
            for sample in source.read(shard, pool):
                try:
                    image = _decoded(sample.image, data.input)
                except (DecodeError, OSError, ValueError):  # rasterio's errors are OSErrors too
                    image = None
                if image is None:
                    skipped["unreadable"] += 1
                    continue
                try:
                    payload, _ = labels.fetch(sample)
                    if payload is None:
                        skipped["unlabeled"] += 1
                        continue
                    label = labels.to_mask(payload, *image.shape[:2])
                    validate_label(label, *image.shape[:2], num_classes)
                except LabelError as e:
                    log.warning("%s: %s", sample.image_id, e)
                    skipped["bad label"] += 1
                    continue
                pairs.append((image, label))
    log.info("%s: %d labeled images; left out %s", data.input_uri, len(pairs), skipped)
    if not pairs:
        raise InputError(f"no labeled images in {data.input_uri} (left out: {skipped})")
    return pairs


def random_crop(img: np.ndarray, lbl: np.ndarray, crop: int, rng: np.random.Generator) -> Pair:
    """A ``crop``-square window; an image smaller than that is padded (label with ignore) first."""
    h, w = lbl.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        lbl = np.pad(lbl, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        h, w = lbl.shape
    top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
    img, lbl = img[top : top + crop, left : left + crop], lbl[top : top + crop, left : left + crop]
    if rng.uniform() < 0.5:
        img, lbl = img[:, ::-1], lbl[:, ::-1]
    if rng.uniform() < 0.5:
        img, lbl = img[::-1], lbl[::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lbl)


def _batch(pairs: list[Pair], rng, size: int, crop: int, meta: ModelMeta, device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(random_crop(*pairs[k], crop, rng) for k in rng.integers(len(pairs), size=size)), strict=True)
    x = torch.from_numpy(np.stack(xs)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.stack(ys)).to(device).long()


def evaluate(predictor: Predictor, pairs: list[Pair]) -> dict:
    cm = ConfusionMatrix(predictor.meta.num_classes)
    for start in range(0, len(pairs), 32):
        chunk = pairs[start : start + 32]
        for (_, lbl), pred in zip(chunk, predictor.predict([img for img, _ in chunk]), strict=True):
            if isinstance(pred, Failure):
                raise InputError(f"validation: {pred.reason}")
            cm.update(lbl, pred.mask)
    return cm.compute()


def _init_weights(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Copy the tensors of ``init_checkpoint_uri`` whose names and shapes fit; a new classifier stays fresh."""
    data = read_checkpoint(cfg.resolve, cfg.init_checkpoint_uri)
    source, _ = load_checkpoint(data, cfg.init_checkpoint_uri, expect_arch=cfg.model)
    own = model.state_dict()
    fits = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fits, strict=False)
    log.info("initialised %d of %d tensors from %s", len(fits), len(own), cfg.init_checkpoint_uri)


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    meta = replace(default_meta(cfg.model, cfg.class_names), train_crop=(cfg.crop, cfg.crop))
    train_pairs = load_labeled(cfg, cfg.train, meta.num_classes)
    val_pairs = load_labeled(cfg, cfg.val, meta.num_classes)
    model = get_model(cfg.model, num_classes=meta.num_classes)
    if cfg.init_checkpoint_uri:
        _init_weights(model, cfg)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch)
    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    out_fs, out_path = cfg.resolve(cfg.output_uri)
    best, history, start = -1.0, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for _ in bar:
            x, y = _batch(train_pairs, rng, cfg.batch_size, cfg.crop, meta, device)
            with autocast:
                loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        # The Predictor changes the module in place: its memory format (keep the one training runs in) and, on
        # CPU, the inference path of its convolutions, which training with gradients does not take.
        # Whole images, as validation always measured them: epochs stay comparable with earlier trainings.
        whole = plan_inference(InferenceConfig(mode="whole"), meta)
        predictor = Predictor(model, meta, device=str(device), batch_size=8, channels_last=False, plan=whole)
        metrics = evaluate(predictor, val_pairs)
        history.append({"epoch": epoch + 1, "loss": float(loss.item()), "val_mean_iou": metrics["mean_iou"]})
        per_class = ", ".join(f"{n} {v:.3f}" for n, v in zip(cfg.class_names, metrics["per_class"]["iou"], strict=True))
        log.info(
            "epoch %d: loss %.4f, validation mIoU %.4f (%s)", epoch + 1, loss.item(), metrics["mean_iou"], per_class
        )
        if metrics["mean_iou"] > best:
            best = metrics["mean_iou"]
            extra = {"val_mean_iou": best, "epoch": epoch + 1, "train_seconds": time.perf_counter() - start}
            storage.write_bytes(out_fs, out_path, save_checkpoint(model, meta, extra, format=cfg.checkpoint_format))
    return {"best_val_mean_iou": best, "history": history, "seconds": time.perf_counter() - start}
