"""The models users already have: torchvision's weights by name (through torchvision's own cache), foreign
state dicts made into checkpoints by `segpipe import-weights`, torch.export programs without a registry entry,
and Hugging Face SegFormer folders. Nothing is downloaded: weight files are placed where torchvision looks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCH_HOME
from torchvision.models import segmentation

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.inference.predictor import Predictor
from pipeline.models import get_model
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.exported import PROGRAM_ARCH
from pipeline.models.loading import load_model

LRASPP = "lraspp_mobilenet_v3_large"
LRASPP_WEIGHTS = segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1


def job(tmp_path: Path, **fields):
    return load_config(None, input_uri=str(tmp_path), output_uri=str(tmp_path / "out"), **fields)


@pytest.fixture(scope="module")
def lraspp_cache() -> tuple[torch.nn.Module, Path]:
    """torchvision's LRASPP with random weights, saved in the session's TORCH_HOME under the exact file name
    torchvision downloads its COCO_WITH_VOC_LABELS_V1 weights to."""
    torch.manual_seed(3)
    reference = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    path = TORCH_HOME / "hub" / "checkpoints" / os.path.basename(LRASPP_WEIGHTS.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    return reference, path


def assert_same_logits(model, reference, size=(1, 3, 64, 96)) -> None:
    x = torch.randn(*size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours, theirs = model(x), reference(x)
    theirs = theirs["out"] if isinstance(theirs, dict) else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# --- torchvision's weights by name -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["COCO_WITH_VOC_LABELS_V1", "DEFAULT", "LRASPP_MobileNet_V3_Large_Weights.DEFAULT"])
def test_weights_by_name_load_through_torchvisions_cache_with_its_meta(tmp_path, lraspp_cache, name):
    reference, path = lraspp_cache
    loaded = load_model(job(tmp_path, model=LRASPP, weights=name))
    transforms = LRASPP_WEIGHTS.transforms()
    assert loaded.meta.class_names == tuple(LRASPP_WEIGHTS.meta["categories"])
    assert (loaded.meta.mean, loaded.meta.std) == (tuple(transforms.mean), tuple(transforms.std))
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_logits(loaded.model, reference)


def test_weights_pinned_to_other_bytes_are_refused(tmp_path, lraspp_cache):
    with pytest.raises(CheckpointError, match="have sha256 .*, not " + "0" * 64):
        load_model(job(tmp_path, model=LRASPP, weights="DEFAULT", checkpoint_sha256="0" * 64))


def test_weights_neither_cached_nor_reachable_say_where_they_were_looked_for(tmp_path, monkeypatch):
    # A real unreachable network: every download goes through a proxy port nothing listens on.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError, match=f"cannot load {LRASPP_WEIGHTS.url} .cached as {tmp_path}/empty/hub"):
        load_model(job(tmp_path, model=LRASPP, weights="DEFAULT"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weights": "DEFAULT"}, "weights: name the torchvision model"),
        ({"model": "unet", "weights": "DEFAULT"}, "weights: weights by name are torchvision's"),
        ({"model": LRASPP, "weights": "IMAGENET1K_V1"}, "has no weights 'IMAGENET1K_V1'; torchvision has: COCO"),
        ({"model": LRASPP, "weights": "DEFAULT", "checkpoint_uri": "x.pt"}, "checkpoint_uri: give the model one way"),
        ({"model": LRASPP}, "checkpoint_uri: required, unless weights or an hf: model"),
        ({"model": "nope"}, "unknown model 'nope'.*or torch.export .a program., or hf:"),
    ],
)
def test_model_source_config_errors_name_the_field(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, **fields)


# --- segpipe import-weights ------------------------------------------------------------------------------


def test_import_weights_by_name_writes_a_checkpoint_with_torchvisions_meta(tmp_path, lraspp_cache):
    out = tmp_path / "lraspp.safetensors"
    argv = ["import-weights", "--model", LRASPP, "--weights", "COCO_WITH_VOC_LABELS_V1", "--format", "safetensors"]
    assert main([*argv, "--out", str(out)]) == 0
    model, meta = load_checkpoint(out.read_bytes(), str(out), expect_arch=LRASPP)
    assert meta.class_names == tuple(LRASPP_WEIGHTS.meta["categories"]) and meta.stride == 16
    assert_same_logits(model, lraspp_cache[0])


def test_import_weights_unwraps_a_training_runs_file_and_records_the_metadata(tmp_path):
    """A user's own run: {"model": DataParallel state dict, "optimizer": ..., "epoch": ...}, read as weights only."""
    torch.manual_seed(4)
    net = get_model("unet_tiny", num_classes=3, width=4).eval()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    run = {
        "epoch": 7,
        "model": {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()},  # DataParallel of a compiled net
        "optimizer": optimizer.state_dict(),
    }
    torch.save(run, tmp_path / "run.pth")
    out = tmp_path / "unet.pt"
    argv = ["import-weights", str(tmp_path / "run.pth"), "--model", "unet_tiny", "--arch-kwargs", "{width: 4}"]
    argv += ["--classes", "bg,road,car", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.25", "--train-crop", "128"]
    argv += ["--palette", "[[1, 2, 3], [4, 5, 6], [7, 8, 9]]", "--out", str(out)]
    assert main(argv) == 0
    model, meta = load_checkpoint(out.read_bytes(), str(out))
    assert meta.class_names == ("bg", "road", "car") and meta.arch_kwargs == {"width": 4}
    assert (meta.mean, meta.std, meta.train_crop) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25), (128, 128))
    assert meta.palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9)) and meta.stride == 16
    assert_same_logits(model, net)


def test_import_weights_names_every_key_that_does_not_fit(tmp_path, capsys):
    state = get_model("unet_tiny", num_classes=3, width=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["down.0.0.weight"]
    torch.save(state, tmp_path / "sd.pt")
    argv = ["import-weights", str(tmp_path / "sd.pt"), "--model", "unet_tiny", "--arch-kwargs", "{width: 4}"]
    assert main([*argv, "--classes", "a,b,c,d,e", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.pt").exists()
    assert "missing (1): down.0.0.weight" in err and "unexpected (1): extra.weight" in err
    assert "wrong shape (2): head.weight (file [3, 4, 1, 1], model [5, 4, 1, 1]), head.bias" in err


def test_a_pickled_module_is_refused_with_how_to_export_it(tmp_path, capsys):
    torch.save(get_model("unet_tiny", num_classes=2, width=4), tmp_path / "module.pt")  # pickles the class
    assert main(["import-weights", str(tmp_path / "module.pt"), "--model", "unet_tiny", "--out", "x.pt"]) == 2
    assert "pickled Python objects" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"segpipe does not unpickle them.*torch\.export\.save"):
        load_model(job(tmp_path, checkpoint_uri=str(tmp_path / "module.pt")))


def test_a_plain_state_dict_as_checkpoint_says_how_to_import_it(tmp_path):
    torch.save(get_model("unet_tiny", num_classes=2, width=4).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="plain state dict.*segpipe import-weights"):
        load_model(job(tmp_path, checkpoint_uri=str(tmp_path / "sd.pt")))


# --- torch.export programs ---------------------------------------------------------------------------------


def export(model: torch.nn.Module, path: Path, dynamic: bool) -> Path:
    """``model`` as a program: batch, height and width dynamic (multiples of 16), or all static at 1x3x64x64."""
    if dynamic:
        dims = {0: torch.export.Dim("n", max=64), 2: 16 * torch.export.Dim("h"), 3: 16 * torch.export.Dim("w")}
        program = torch.export.export(model, (torch.randn(2, 3, 64, 96),), dynamic_shapes={"x": dims})
    else:
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    torch.export.save(program, path)
    return path


def test_a_dynamic_program_runs_without_a_registry_entry(tmp_path, tiny_unet):
    program = export(tiny_unet, tmp_path / "m.pt2", dynamic=True)
    with pytest.raises(CheckpointError, match="has no segpipe metadata: put class_names"):
        load_model(job(tmp_path, checkpoint_uri=str(program)))
    (tmp_path / "m.pt2.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "mean": [0.5, 0.5, 0.5]}))
    loaded = load_model(job(tmp_path, checkpoint_uri=str(program)))
    assert loaded.meta.arch == PROGRAM_ARCH and loaded.meta.mean == (0.5, 0.5, 0.5)
    assert (loaded.meta.input_policy, loaded.meta.stride) == ("pad", 16)  # read from 16 * Dim("h")
    assert loaded.sha256 == hashlib.sha256(program.read_bytes()).hexdigest()
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ours = Predictor(loaded.model, loaded.meta, device="cpu", batch_size=2).predict([image, image[:33]])
    eager = Predictor(tiny_unet, loaded.meta, device="cpu", batch_size=2).predict([image, image[:33]])
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(ours, eager, strict=True))


def test_a_static_program_gets_the_resize_policy_and_slides_at_its_size(tmp_path, tiny_unet):
    program = export(tiny_unet, tmp_path / "s.pt2", dynamic=False)
    out = tmp_path / "embedded.pt2"
    assert main(["import-weights", str(program), "--classes", "a,b,c", "--out", str(out)]) == 0
    loaded = load_model(job(tmp_path, checkpoint_uri=str(out), inference={"mode": "slide", "overlap": 0.5}))
    assert (loaded.meta.input_policy, loaded.meta.size) == ("resize", (64, 64)) and loaded.model.batch == 1
    cfg = job(tmp_path, checkpoint_uri=str(out), inference={"mode": "slide", "overlap": 0.5})
    from pipeline.inference.plan import plan_inference

    plan = plan_inference(cfg.inference, loaded.meta)
    assert plan.tile == (64, 64)
    image = np.random.default_rng(1).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    ours = Predictor(loaded.model, loaded.meta, device="cpu", batch_size=5, plan=plan).predict([image])[0]
    eager = Predictor(tiny_unet, loaded.meta, device="cpu", batch_size=5, plan=plan).predict([image])[0]
    assert np.array_equal(ours.mask, eager.mask)  # batches of 5 windows cut to the program's batch of 1


def test_program_metadata_that_contradicts_the_program_is_refused(tmp_path, tiny_unet):
    program = export(tiny_unet, tmp_path / "m.pt2", dynamic=True)
    (tmp_path / "m.pt2.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="outputs 3 classes, but its metadata names 2"):
        load_model(job(tmp_path, checkpoint_uri=str(program)))
    with pytest.raises(CheckpointError, match="is a torch.export program, but the config asks for model unet"):
        load_model(job(tmp_path, checkpoint_uri=str(program), model="unet"))


# --- Hugging Face ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segformer(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny randomly initialised SegFormer and its processor, saved with save_pretrained."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    labels = {0: "background", 1: "building", 2: "water"}
    config = SegformerConfig(
        num_labels=3,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(6)
    net = SegformerForSemanticSegmentation(config).eval()
    folder = tmp_path_factory.mktemp("segformer")
    net.save_pretrained(folder)
    processor = SegformerImageProcessor(size={"height": 128, "width": 128}, image_mean=[0.5, 0.4, 0.3])
    processor.save_pretrained(folder)
    return net, folder


def test_a_segformer_folder_runs_with_its_labels_and_normalisation(tmp_path, segformer):
    net, folder = segformer
    cfg = job(tmp_path, model=f"hf:{folder}")
    loaded = load_model(cfg)
    assert loaded.meta.class_names == ("background", "building", "water")
    assert loaded.meta.mean == pytest.approx((0.5, 0.4, 0.3)) and loaded.meta.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    assert (loaded.meta.input_policy, loaded.meta.stride, loaded.meta.train_crop) == ("pad", 32, (128, 128))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = torch.nn.functional.interpolate(net(pixel_values=x).logits, size=(64, 96), mode="bilinear")
        torch.testing.assert_close(loaded.model(x), expected)
    with pytest.raises(CheckpointError, match="its files have sha256"):
        load_model(cfg.model_copy(update={"checkpoint_sha256": "f" * 64}))


def test_without_the_hf_extra_the_error_names_it(tmp_path, segformer):
    """transformers made unimportable in a fresh interpreter, as it is where the extra is not installed."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from pipeline.cli import main\n"
        f"sys.exit(main(['run', '--input', {str(tmp_path)!r}, '--output', {str(tmp_path / 'o')!r}, "
        f"'--model', 'hf:{segformer[1]}']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "model: Hugging Face models need the hf extra: pip install 'segpipe[hf]'" in done.stderr


# --- whole jobs on Ray actors, one per route ---------------------------------------------------------------


@pytest.fixture(scope="module")
def route_runs(dataset, lraspp_cache, segformer, tiny_unet, tmp_path_factory, ray_local, prefect_ephemeral):
    """The segment-dataset flow on a Ray actor, once per route; the actor loads the model itself (torchvision
    from the session's TORCH_HOME, the program and the folder from their paths)."""
    from flows.segment_dataset import segment_dataset

    root = tmp_path_factory.mktemp("routes")
    program = export(tiny_unet, root / "static.pt2", dynamic=False)
    (root / "static.pt2.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))
    routes = {
        "weights": {"model": LRASPP, "weights": "COCO_WITH_VOC_LABELS_V1"},
        "program": {"checkpoint_uri": str(program)},
        "hf": {"model": f"hf:{segformer[1]}"},
    }
    common = dict(input_uri=str(dataset / "images"), shard_size=8, actors=1, batch_size=4, outputs={"report": False})
    return {
        name: (root / name, segment_dataset(**common, output_uri=str(root / name), **fields))
        for name, fields in routes.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "source"),
    [
        ("weights", "torchvision weights COCO_WITH_VOC_LABELS_V1 of lraspp_mobilenet_v3_large"),
        ("program", "checkpoint "),
        ("hf", "Hugging Face "),
    ],
)
def test_every_route_runs_a_job_whose_masks_are_the_models(route_runs, dataset, route, source):
    from pipeline.images import decode_rgb
    from pipeline.palette import png_to_mask

    out, result = route_runs[route]
    manifest = result["manifest"]
    assert manifest["counts"]["images"] == 24 and manifest["counts"]["errors"] == 0
    assert manifest["model"]["source"].startswith(source)
    cfg = load_config(None, **{k: v for k, v in manifest["config"].items() if v is not None})
    loaded = load_model(cfg)  # pinned: the driver's checksum, as the actors checked it
    assert loaded.sha256 == manifest["model"]["checkpoint_sha256"]
    assert manifest["model"]["class_names"] == list(loaded.meta.class_names)
    from pipeline.inference.plan import plan_inference

    alone = Predictor(
        loaded.model, loaded.meta, device="cpu", batch_size=1, plan=plan_inference(cfg.inference, loaded.meta)
    )
    for name in sorted(p.name for p in (out / "masks").rglob("*.png"))[:3]:
        image_id = name.removesuffix(".png")
        image = decode_rgb(next((dataset / "images").rglob(image_id)).read_bytes())
        written = png_to_mask(next((out / "masks").rglob(name)).read_bytes())
        assert np.array_equal(written, alone.predict([image])[0].mask)
