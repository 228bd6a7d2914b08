"""Training a registry model on a labeled image folder, with validation mIoU per epoch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from pipeline import storage
from pipeline.images import decode_rgb
from pipeline.labels import label_path_for, read_label
from pipeline.metrics import ConfusionMatrix
from pipeline.models import get_model
from pipeline.models.checkpoint import ModelMeta, save_checkpoint
from pipeline.palette import IGNORE_INDEX
from pipeline.predictor import Predictor, resolve_device
from pipeline.sources.files import list_images

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data_uri: str  # holds images/ and labels/ (the layout `segpipe make-dataset` writes)
    val_uri: str
    output: str
    model: str = "unet_tiny"
    class_names: tuple[str, ...] = ()
    epochs: int = 40
    steps_per_epoch: int = 100
    batch_size: int = 16
    crop: int = 96
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"


def load_labeled(uri: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (image, label) pair under ``uri``/images and ``uri``/labels, matched by relative path."""
    fs, root = storage.resolve(uri)
    img_root, lbl_root = storage.join(root, "images"), storage.join(root, "labels")
    pairs = []
    for rel in list_images(fs, img_root):
        image = decode_rgb(fs.cat_file(storage.join(img_root, rel)))
        pairs.append((image, read_label(fs, storage.join(lbl_root, label_path_for(rel)))))
    if not pairs:
        raise ValueError(f"no labeled images under {uri}/images")
    return pairs


def _batch(
    pairs, rng: np.random.Generator, size: int, crop: int, meta: ModelMeta, device
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for k in rng.integers(len(pairs), size=size):
        img, lbl = pairs[k]
        h, w = lbl.shape
        top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
        img, lbl = img[top : top + crop, left : left + crop], lbl[top : top + crop, left : left + crop]
        if rng.uniform() < 0.5:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        if rng.uniform() < 0.5:
            img, lbl = img[::-1], lbl[::-1]
        xs.append(np.ascontiguousarray(img))
        ys.append(np.ascontiguousarray(lbl))
    x = torch.from_numpy(np.stack(xs)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.stack(ys)).to(device).long()


def evaluate(predictor: Predictor, pairs) -> dict:
    cm = ConfusionMatrix(predictor.meta.num_classes)
    for start in range(0, len(pairs), 32):
        chunk = pairs[start : start + 32]
        for (_, lbl), pred in zip(chunk, predictor.predict([img for img, _ in chunk]), strict=True):
            cm.update(lbl, pred.mask)
    return cm.compute()


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    train_pairs, val_pairs = load_labeled(cfg.data_uri), load_labeled(cfg.val_uri)
    model = get_model(cfg.model, num_classes=len(cfg.class_names)).to(device)
    meta = ModelMeta(
        arch=cfg.model, class_names=tuple(cfg.class_names), input_policy="pad", stride=getattr(model, "stride", 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    best, history, start = -1.0, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for _ in bar:
            x, y = _batch(train_pairs, rng, cfg.batch_size, cfg.crop, meta, device)
            with autocast:
                loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = evaluate(Predictor(model, meta, device=str(device), batch_size=32), val_pairs)
        history.append({"epoch": epoch + 1, "loss": float(loss.item()), "val_mean_iou": metrics["mean_iou"]})
        per_class = ", ".join(f"{n} {v:.3f}" for n, v in zip(cfg.class_names, metrics["per_class"]["iou"], strict=True))
        log.info(
            "epoch %d: loss %.4f, validation mIoU %.4f (%s)", epoch + 1, loss.item(), metrics["mean_iou"], per_class
        )
        if metrics["mean_iou"] > best:
            best = metrics["mean_iou"]
            extra = {"val_mean_iou": best, "epoch": epoch + 1, "train_seconds": time.perf_counter() - start}
            fs, path = storage.resolve(cfg.output)
            storage.write_bytes(fs, path, save_checkpoint(model, meta, extra))
    return {"best_val_mean_iou": best, "history": history}
