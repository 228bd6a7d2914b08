"""Job configuration: a pydantic model loaded from YAML with overrides, validated before any work."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import storage
from pipeline.errors import ConfigError


def _clean_uri(uri: str) -> str:
    """Plain local paths become absolute (relative to the working directory) so every worker agrees."""
    uri = uri.strip()
    if not uri:
        raise ValueError("must not be empty")
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _registry_model(name: str) -> str:
    from pipeline.models import list_models

    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return name


def _job_model(name: str) -> str:
    """A registry name, ``torch.export`` (the checkpoint is a program) or ``hf:<repo or folder>``."""
    from pipeline.models import huggingface
    from pipeline.models.exported import PROGRAM_ARCH

    if huggingface.is_hf(name):
        if not huggingface.installed():
            raise ValueError(f"Hugging Face models need the hf extra: {huggingface.EXTRA}")
        return huggingface.normalize_name(name)
    if name == PROGRAM_ARCH:
        return name
    try:
        return _registry_model(name)
    except ValueError as e:
        raise ValueError(f"{e}; or {PROGRAM_ARCH} (a program), or hf:<repo or folder>") from None


def _check_weights(model: str | None, weights: str | None) -> None:
    """torchvision's weights ``weights`` must exist for ``model``; ValueError naming the field otherwise."""
    from pipeline.models.pretrained import weights_enum

    if weights is None:
        return
    if model is None:
        raise ValueError("weights: name the torchvision model they are for in model")
    try:
        weights_enum(model, weights)
    except ValueError as e:
        raise ValueError(f"weights: {e}") from None


def _known_layout(name: str) -> str:
    from pipeline.sources import get_layout

    if name != "auto":
        try:
            get_layout(name)
        except ValueError as e:
            raise ValueError(f"{e}; or auto, to detect it") from None
    return name


def _known_label_format(name: str) -> str:
    from pipeline.labels import get_label_format

    get_label_format(name)  # its ValueError lists the registered formats
    return name


# What setting a LabelsConfig option is called when the format does not use it; {users}: the formats that do.
_UNUSED_LABEL_OPTION = {
    "classes": "only used by the {users} format, not {format}",
    "mapping": "not used by the {format} format (its own table applies)",
    "reduce_zero_label": "only for the {users} format",
}


def _label_options_fit(cfg: LabelsConfig) -> None:
    """Raise ValueError naming the option when ``cfg`` lacks one its format requires or sets one it does not use."""
    from pipeline.labels import get_label_format, list_label_formats

    fmt = get_label_format(cfg.format)
    for option, what in fmt.required_options.items():
        if not getattr(cfg, option):
            raise ValueError(f"{option}: the {cfg.format} format needs {what}")
    for option, message in _UNUSED_LABEL_OPTION.items():
        if option not in fmt.options and getattr(cfg, option) != type(cfg).model_fields[option].default:
            users = " or ".join(name for name in list_label_formats() if option in get_label_format(name).options)
            raise ValueError(f"{option}: " + message.format(format=cfg.format, users=users))


def _device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


Uri = Annotated[str, AfterValidator(_clean_uri)]
RegistryModelName = Annotated[str, AfterValidator(_registry_model)]
ModelName = Annotated[str, AfterValidator(_job_model)]
LayoutName = Annotated[str, AfterValidator(_known_layout)]
LabelFormatName = Annotated[str, AfterValidator(_known_label_format)]
Device = Annotated[str, AfterValidator(_device)]


class StorageConfig(BaseModel):
    """Object-store settings for s3:// URIs. Anything left out comes from the standard AWS environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ~/.aws)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    region: str | None = None
    profile: str | None = Field(None, description="a profile of ~/.aws/credentials")
    key: SecretStr | None = Field(None, description="access key id; never logged or written")
    secret: SecretStr | None = Field(None, description="secret access key; never logged or written")
    anon: bool = Field(False, description="anonymous access, for public buckets")
    client: Literal["s3fs", "obstore"] = Field(
        "s3fs",
        description="who makes whole-object GETs and PUTs: s3fs, or obstore (Rust, outside the GIL; no ~/.aws "
        "profiles, give region for a bucket outside us-east-1)",
    )

    def filesystem(self, uri: str) -> type | None:
        """The fsspec class for ``uri`` when it is not fsspec's own choice: obstore's hot path for s3://."""
        if self.client == "obstore" and uri.startswith(("s3://", "s3a://")):
            from pipeline.obstore_s3 import ObstoreS3FileSystem

            return ObstoreS3FileSystem
        return None

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec options for ``uri``: the S3 settings for s3:// URIs, nothing for other protocols."""
        if not uri.startswith(("s3://", "s3a://")):
            return {}
        # botocore's standard retry mode backs off on 5xx, throttling, timeouts and connection resets.
        opts: dict[str, Any] = {
            "anon": self.anon,
            "config_kwargs": {
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 5, "mode": "standard"},
            },
        }
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.profile:
            opts["profile"] = self.profile
        if self.key is not None:
            opts["key"] = self.key.get_secret_value()
        if self.secret is not None:
            opts["secret"] = self.secret.get_secret_value()
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        return opts


class InputConfig(BaseModel):
    """How the input is laid out. ``auto`` decides from the URI (a .tar, .parquet or .csv file, an S3 Inventory
    manifest.json) or the listing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: LayoutName = Field(
        "auto",
        description="a registered layout (files: loose images; webdataset: tar shards; parquet: an image-bytes "
        "column; manifest: a Parquet/CSV list of image URIs or an S3 Inventory), or auto: detected from the URI "
        "or its listing (a Parquet manifest needs layout: manifest)",
    )
    image_column: str = Field("image", description="parquet: column of encoded image bytes (or {bytes, path})")
    label_column: str | None = Field(None, description="parquet: column of encoded label bytes")
    id_column: str | None = Field(None, description="parquet: column naming each image; default <file>/<row>")
    label_suffix: str = Field("seg.png", description="webdataset: extension of the label member, <key>.seg.png")
    base_uri: Uri | None = Field(
        None,
        description="manifest: the folder image ids are relative to (an id names masks/<id>.png and its label); "
        "default: the longest common folder of the manifest's URIs",
    )
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="TIFF: the bands (1-based, as GDAL counts) read as R, G, B, e.g. [4, 3, 2]; one band is read "
        "as gray; default: 1, 2, 3 (band 1 alone, or through its colour map, when there are fewer)",
    )
    scale: Literal["auto", "none", "minmax", "percentile", "fixed"] = Field(
        "auto",
        description="TIFF: how each band's values map to 0..255: auto (8-bit as is, anything else by percentile), "
        "none (clipped), minmax or percentile (of the image's valid pixels, per band), fixed (scale_range)",
    )
    percentiles: tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]] = Field(
        (2.0, 98.0), description="TIFF, scale: percentile: the low and high percentiles mapped to 0 and 255"
    )
    scale_range: tuple[float, float] | None = Field(
        None, description="TIFF, scale: fixed: the values mapped to 0 and 255, e.g. [0, 10000] for reflectances"
    )
    nodata: float | None = Field(
        None,
        description="TIFF: the value marking pixels without data (their mask is 255, not counted in statistics); "
        "default: the file's own nodata value or mask",
    )
    window: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], PositiveInt, PositiveInt] | None = Field(
        None,
        description="TIFF: only this window of each image, [column, row, width, height] in pixels (clipped to the "
        "image); its mask keeps the georeference of that window",
    )
    bounds: tuple[float, float, float, float] | None = Field(
        None,
        description="georeferenced TIFF: only the pixels within [xmin, ymin, xmax, ymax] in the image's CRS (an "
        "area of interest; the window covering it, clipped to the image)",
    )

    @model_validator(mode="after")
    def _scaling(self) -> InputConfig:
        if self.bands is not None and len(self.bands) not in (1, 3):
            raise ValueError(f"input.bands: give 1 band (gray) or 3 (R, G, B), got {len(self.bands)}")
        if (self.scale == "fixed") != (self.scale_range is not None):
            raise ValueError("input.scale_range: set it exactly when input.scale is fixed")
        if self.scale_range is not None and not self.scale_range[0] < self.scale_range[1]:
            raise ValueError("input.scale_range: the low value must be below the high one")
        if not self.percentiles[0] < self.percentiles[1]:
            raise ValueError("input.percentiles: the low percentile must be below the high one")
        if self.window is not None and self.bounds is not None:
            raise ValueError("input.bounds: give a window or bounds, not both")
        if self.bounds is not None and not (self.bounds[0] < self.bounds[2] and self.bounds[1] < self.bounds[3]):
            raise ValueError("input.bounds: [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax")
        return self


class LabelsConfig(BaseModel):
    """How ground truth is encoded; every format is converted on read to class indices with 255 = ignore."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: LabelFormatName = Field(
        "index_png",
        description="a registered label format: index_png (VOC), cityscapes (labelIds), coco (instances JSON), "
        "labelme, binary",
    )
    mapping: dict[int, int] | None = Field(
        None, description="raw value (COCO: category id) -> class index; unmapped values are an error"
    )
    reduce_zero_label: bool = Field(False, description="ADE20K style: 0 becomes ignore, every other value - 1")
    classes: list[str] | None = Field(
        None, description="labelme: class names in index order (__ignore__ = 255, _background_ = 0)"
    )

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, v: dict[int, int] | None) -> dict[int, int] | None:
        if v is not None:
            bad = {k: t for k, t in v.items() if not (0 <= t <= 255) or k < 0}
            if bad:
                raise ValueError(f"keys must be >= 0 and classes 0..255, got {bad}")
        return v

    @model_validator(mode="after")
    def _fits_format(self) -> LabelsConfig:
        _label_options_fit(self)
        return self


class TTAConfig(BaseModel):
    """Test-time augmentation: every flip at every scale, probabilities averaged. The plain view (no flip,
    scale 1) is always one of them; ``flips: []`` and ``scales: [1.0]`` (the defaults) turn TTA off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flips: list[Literal["horizontal", "vertical", "both"]] = Field(
        default_factory=list, description="flips added to the plain view: horizontal, vertical, both"
    )
    scales: list[Annotated[float, Field(gt=0, le=4)]] = Field(
        default_factory=lambda: [1.0], min_length=1, description="window scales, e.g. [0.75, 1.0, 1.25]"
    )

    @field_validator("flips", "scales")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"each value once, got {v}")
        return v


class InferenceConfig(BaseModel):
    """How an image goes through the model: whole, or as overlapping windows merged band by band."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "whole", "slide"] = Field(
        "auto", description="auto: whole when the image fits in one tile (after padding), else slide"
    )
    tile: tuple[Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]] | None = Field(
        None, description="window [height, width]; default: the checkpoint's training crop, else 512x512"
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="overlap of neighbouring windows, a fraction of the tile")
    blend: Literal["gaussian", "mean"] = Field(
        "gaussian", description="window weights: gaussian (centre-weighted, no seams) or mean"
    )
    tta: TTAConfig = Field(default_factory=TTAConfig, description="test-time augmentation (off by default)")

    @field_validator("tile", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v)
        if isinstance(v, list | tuple) and len(v) != 2:
            raise ValueError(f"must be one number or [height, width], got {list(v)}")
        return v


class OutputsConfig(BaseModel):
    """What a run writes beside its masks and stats: its report, and images blended with their masks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: bool = Field(True, description="write report.html: charts, the worst images, the errors")
    gallery: int = Field(12, ge=0, le=200, description="worst images shown in the report")
    overlays: Literal["none", "sample", "all"] = Field(
        "none", description="JPEGs of each image blended with its mask under overlays/: none, the report's sample, all"
    )
    overlay_opacity: float = Field(0.5, ge=0, le=1, description="opacity of the mask over the image in overlays")
    mask_format: Literal["auto", "png", "geotiff"] = Field(
        "auto",
        description="masks as palette PNGs, or as tiled Cloud-Optimized GeoTIFFs with the input's CRS, transform "
        "and the palette as colour map; auto: GeoTIFF for a georeferenced input, PNG otherwise",
    )
    vectors: bool = Field(
        False, description="also write each mask as polygons per class to vectors/part-<shard>.parquet (GeoParquet)"
    )
    vector_tolerance: float = Field(
        1.0, ge=0, description="simplification of those polygons, in pixels (0: the exact pixel outlines)"
    )


class DriftConfig(BaseModel):
    """Each run compared with a baseline run: the previous date's output for a dated (nightly) output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        0.1, gt=0, description="population stability index of the class shares above which a run is marked drifted"
    )


class JobConfig(BaseModel):
    """Everything one segmentation job needs. Field names are the YAML keys and the flow's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_uri: Uri = Field(description="images, tar shards or Parquet files (file path, file://, s3://)")
    output_uri: Uri = Field(description="where masks, stats, metrics and the manifest go")
    labels_uri: Uri | None = Field(None, description="folder of label files, or a COCO instances JSON")
    checkpoint_uri: Uri | None = Field(
        None,
        description="segpipe checkpoint (weights plus classes and preprocessing) or torch.export program (.pt2); "
        "not needed with weights or an hf: model",
    )
    checkpoint_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="expected sha256 of the checkpoint (or weights file, or hf: folder), checked before use",
    )
    model: ModelName | None = Field(
        None,
        description="registry name (default: the checkpoint's), torch.export, or hf:<Hugging Face repo or folder>",
    )
    weights: str | None = Field(
        None,
        description="torchvision's pretrained weights of model by name (COCO_WITH_VOC_LABELS_V1, DEFAULT), "
        "downloaded once into TORCH_HOME",
    )
    shard_size: int = Field(64, ge=1, description="images per shard: the unit of work, retry and commit")
    mode: Literal["full", "incremental"] = Field(
        "full",
        description="full: segment the whole input (a rerun resumes it); incremental: segment only input files "
        "new or changed since the output's last run, adding to its one result set",
    )
    prune_deleted: bool = Field(
        False, description="incremental: drop the rows of input files deleted since from the result set"
    )
    actors: int | Literal["auto"] = Field(
        1, description="Ray actors, each holding one model; auto: one per GPU (or cpus_per_actor CPUs) of the cluster"
    )
    gpus_per_actor: float | None = Field(
        None,
        gt=0,
        le=8,
        description="GPUs each actor reserves (0.5: two share one); default 1 when the cluster has one per actor",
    )
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs each actor reserves, also its torch threads; default the cluster's CPUs // actors"
    )
    batch_size: int = Field(8, ge=1, description="windows (or whole images) per forward pass, of one size each")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="CUDA arithmetic: fp32 (IEEE, as on CPU), tf32 (TF32 tensor cores), bf16/fp16 autocast"
    )
    channels_last: bool = Field(True, description="NHWC tensors: faster convolutions with oneDNN (CPU) and cuDNN")
    io_threads: int = Field(8, ge=1, le=256, description="threads per actor for reading, decoding, encoding")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of mask PNGs (1 = fast)")
    shard_retries: int = Field(2, ge=0, le=10, description="reruns of a shard that failed (e.g. a storage outage)")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: RAY_ADDRESS or a local Ray")
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="larger images (width x height, read from the header before decoding) become error rows; "
        "default: what each actor's memory can decode, memory / 16 bytes",
    )
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="whole or sliding windows, TTA")
    outputs: OutputsConfig = Field(default_factory=OutputsConfig, description="report and overlays")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="comparison with the previous run")
    input: InputConfig = Field(default_factory=InputConfig, description="input layout")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="label format")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="object-store settings")

    def resolve(self, uri: str):
        """``(fs, path)`` for one of this job's URIs, with the storage settings applied."""
        return storage.resolve(uri, self.storage.filesystem(uri), **self.storage.options(uri))

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and v.strip().isdigit() and int(v) >= 1:
            return int(v)
        raise ValueError(f"must be a whole number >= 1 or auto, got {v!r}")

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus_per_actor(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"above 1 it must be a whole number of GPUs (Ray shares only fractions of one), got {v}")
        return v

    @model_validator(mode="after")
    def _one_model_source(self) -> JobConfig:
        from pipeline.models.huggingface import is_hf

        _check_weights(self.model, self.weights)
        sources = [f for f, on in (("weights", self.weights), ("model hf:", is_hf(self.model))) if on]
        if self.checkpoint_uri is not None:
            sources.append("checkpoint_uri")
        if not sources:
            raise ValueError("checkpoint_uri: required, unless weights or an hf: model gives the model")
        if len(sources) > 1:
            raise ValueError(f"{sources[-1].split()[0]}: give the model one way, not by {' and '.join(sources)}")
        return self

    @model_validator(mode="after")
    def _prune_needs_increments(self) -> JobConfig:
        if self.prune_deleted and self.mode != "incremental":
            raise ValueError("prune_deleted: applies to mode: incremental only (a full run holds only what it listed)")
        return self

    @model_validator(mode="after")
    def _gpus_need_a_gpu_device(self) -> JobConfig:
        if self.gpus_per_actor is not None and self.device == "cpu":
            raise ValueError("gpus_per_actor: set, but device is cpu; leave it out or use device auto/cuda")
        return self


def plain_type(annotation: Any) -> Any:
    """A field's type without its validators (``Annotated`` metadata), for the CLI flags and flow parameters
    derived from a config: their values are validated once, with the whole config, so errors name the field."""
    if typing.get_origin(annotation) is Annotated:
        return plain_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Union[tuple(plain_type(k) for k in typing.get_args(annotation))]  # noqa: UP007
    return annotation


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


class EvaluateConfig(BaseModel):
    """Re-evaluate a finished run's masks against labels, possibly read differently; masks are not touched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_uri: Uri = Field(description="the output of a finished segment-dataset run")
    labels_uri: Uri = Field(description="folder of label files matched by image id, or a COCO JSON")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="label format")
    ignore_classes: list[int] = Field(default_factory=list, description="ground-truth classes to ignore")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="evaluations/<name>/; default: a digest of the settings"
    )
    io_threads: int = Field(8, ge=1, le=256, description="threads reading masks and labels")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="object-store settings")

    def resolve(self, uri: str):
        return storage.resolve(uri, self.storage.filesystem(uri), **self.storage.options(uri))

    @field_validator("ignore_classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if not 0 <= c < 255]
        if bad:
            raise ValueError(f"class indices must be 0..254, got {bad}")
        return v


class DataConfig(BaseModel):
    """A labeled dataset in any layout and label format (training, validation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_uri: Uri = Field(description="images, tar shards or Parquet files")
    labels_uri: Uri | None = Field(None, description="folder of label files, or a COCO JSON; none for in-band labels")
    input: InputConfig = Field(default_factory=InputConfig, description="input layout")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="label format")


class TrainConfig(BaseModel):
    """``segpipe train``: fine-tune a registry model on a labeled dataset; the best epoch is the checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: RegistryModelName = Field("unet_tiny", description="registry name")
    class_names: list[str] = Field(min_length=2, description="class names in index order")
    train: DataConfig
    val: DataConfig
    output_uri: Uri = Field(description="checkpoint to write (the best validation epoch)")
    checkpoint_format: Literal["torch", "safetensors"] = "torch"
    init_checkpoint_uri: Uri | None = Field(
        None, description="start from these weights (tensors whose shapes differ, e.g. the classifier, are left)"
    )
    epochs: int = Field(40, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    crop: int = Field(96, ge=8, description="random square crops (padded with ignore when an image is smaller)")
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N; bf16 autocast on CUDA")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="object-store settings")

    def resolve(self, uri: str):
        return storage.resolve(uri, self.storage.filesystem(uri), **self.storage.options(uri))


class ImportConfig(BaseModel):
    """``segpipe import-weights``: foreign weights, torchvision's by name, or a torch.export program, written as
    a checkpoint with the metadata a run needs. Metadata fields left unset keep the model's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_uri: Uri | None = Field(
        None, description=".pth/.pt state dict (read as weights only), .safetensors, or a torch.export .pt2 program"
    )
    output_uri: Uri = Field(description="the checkpoint to write (a .pt2 program stays a program)")
    model: RegistryModelName | None = Field(None, description="registry model the weights are for")
    weights: str | None = Field(
        None, description="torchvision weights of model by name: their classes and normalisation"
    )
    class_names: list[str] | None = Field(None, min_length=1, description="class names in index order")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model's builder")
    mean: tuple[float, float, float] | None = Field(None, description="RGB mean in 0..1")
    std: tuple[float, float, float] | None = Field(None, description="RGB std in 0..1")
    palette: list[tuple[int, int, int]] | None = Field(None, description="RGB per class; default the VOC palette")
    input_policy: Literal["pad", "resize"] | None = Field(None, description="pad to the stride, or resize to size")
    size: tuple[int, int] | None = Field(None, description="[height, width] of the resize policy")
    stride: int | None = Field(None, ge=1, description="the model's output stride, for the pad policy")
    train_crop: tuple[int, int] | None = Field(None, description="[height, width] it was trained on: the default tile")
    checkpoint_format: Literal["torch", "safetensors"] = "torch"
    storage: StorageConfig = Field(default_factory=StorageConfig, description="object-store settings")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"must be above 0, got {list(v)}")
        return v

    @field_validator("train_crop", "size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        """One number, or a list of one, means a square."""
        if isinstance(v, (list, tuple)) and len(v) == 1:
            v = v[0]
        return (v, v) if isinstance(v, (int, str)) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _enough(self) -> ImportConfig:
        if self.source_uri is None and self.weights is None:
            raise ValueError("source_uri: name the weights file (or torchvision weights by name with weights)")
        _check_weights(self.model, self.weights)
        if self.input_policy == "resize" and self.size is None:
            raise ValueError("size: the resize input policy needs [height, width]")
        return self

    def resolve(self, uri: str):
        return storage.resolve(uri, self.storage.filesystem(uri), **self.storage.options(uri))


def load_config(path: str | Path | None = None, schema: type[BaseModel] = JobConfig, **overrides: Any) -> Any:
    """Read YAML (if given), apply the overrides that are not None, validate as ``schema`` (a JobConfig by
    default); ConfigError names the field.

    An override of a section (``labels``, ``input``, ``storage``: a mapping or a section model) changes only
    the fields it names and keeps the file's others; any other field is replaced whole.
    """
    data: dict[str, Any] = {}
    source = "parameters"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(loaded).__name__}")
        data.update(loaded or {})
    data = merge_overrides(schema, data, overrides)
    try:
        return schema(**data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def merge_overrides(schema: type[BaseModel], data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the ``overrides`` that are not None; sections (fields typed as a model) merge field by field."""
    merged = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        section = section_schema(schema, key)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if section is not None and isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_overrides(section, merged[key], value)
        merged[key] = value
    return merged


def section_schema(schema: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The model of field ``key`` when it is a section (``labels``, ``input``, ``storage``), else None."""
    field = schema.model_fields.get(key)
    kind = field.annotation if field is not None else None
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
