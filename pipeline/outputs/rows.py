"""The rows a run and an evaluation write, as types: building one with a field missing or misspelled fails
where it is built, and each Parquet schema is derived from its row type, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import pyarrow as pa

Cell = dict[str, int]  # one non-zero confusion cell: {"gt": i, "pred": j, "count": n}
CONFUSION_CELLS = pa.list_(pa.struct([("gt", pa.int32()), ("pred", pa.int32()), ("count", pa.int64())]))
BOUNDS = pa.struct([(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])


def column(arrow_type: pa.DataType) -> Any:
    """A required row field stored as ``arrow_type`` (no default: every row names every column)."""
    return field(metadata={"arrow": arrow_type})


def schema_of(row_type: type) -> pa.Schema:
    return pa.schema([(f.name, f.metadata["arrow"]) for f in fields(row_type)])


def to_table(rows: list, row_type: type) -> pa.Table:
    """Rows of ``row_type`` as one Arrow table with the schema derived from it."""
    names = [f.name for f in fields(row_type)]
    return pa.Table.from_pydict({n: [getattr(r, n) for r in rows] for n in names}, schema=schema_of(row_type))


class ErrorKind(StrEnum):
    """Why a row has an error, for counting and grouping (the ``error`` text says it in words)."""

    INPUT = "input"  # the image could not be read or decoded, or its id cannot name a mask
    TOO_LARGE = "too_large"  # above max_image_pixels
    LABEL = "label"  # the image was segmented, but its label could not be used
    MODEL = "model"  # the model raised (or ran out of memory) on this image alone
    PROCESS_DIED = "process_died"  # the model's process died while segmenting this image


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageRow:
    """One input image's row in ``stats/part-<shard>.parquet``; ``error`` set means no mask (or no usable label)."""

    run_id: str = column(pa.string())
    image_id: str = column(pa.string())  # the image's path relative to the input root (or its id in the input)
    source_uri: str = column(pa.string())
    shard_id: str = column(pa.string())
    width: int | None = column(pa.int32())
    height: int | None = column(pa.int32())
    mask_uri: str | None = column(pa.string())
    class_pixels: list[int] | None = column(pa.list_(pa.int64()))
    class_fraction: list[float] | None = column(pa.list_(pa.float32()))
    mean_confidence: float | None = column(pa.float32())
    labeled: bool = column(pa.bool_())
    label_uri: str | None = column(pa.string())
    pixel_accuracy: float | None = column(pa.float64())
    mean_iou: float | None = column(pa.float64())
    confusion: list[Cell] | None = column(CONFUSION_CELLS)  # sparse: re-reduce any subset of images exactly
    nodata_pixels: int | None = column(pa.int64())  # pixels without data (mask 255), in no class or fraction
    crs: str | None = column(pa.string())  # a georeferenced image's CRS: EPSG:<code>, or WKT; else null
    bounds: dict[str, float] | None = column(BOUNDS)  # its extent in that CRS; null when not georeferenced
    error: str | None = column(pa.string())
    error_kind: str | None = column(pa.string())  # an ErrorKind value, null when fine
    model: str | None = column(pa.string())
    increment: int = column(pa.int32())  # the increment of the output's result set that wrote it (a full run: 1)

    @classmethod
    def failed(cls, *, error: str, error_kind: ErrorKind, **ids):
        """The row of an image that could not be segmented: its ids (run, image, source, shard, model), why,
        and nothing else."""
        return cls(
            **ids,
            error=error,
            error_kind=error_kind,
            width=None,
            height=None,
            mask_uri=None,
            class_pixels=None,
            class_fraction=None,
            mean_confidence=None,
            labeled=False,
            label_uri=None,
            pixel_accuracy=None,
            mean_iou=None,
            confusion=None,
            nodata_pixels=None,
            crs=None,
            bounds=None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationRow:
    """One mask's row in ``evaluations/<name>/images.parquet``: its label, compared with new settings."""

    image_id: str = column(pa.string())
    label_uri: str | None = column(pa.string())
    labeled: bool = column(pa.bool_())
    confusion: list[Cell] | None = column(CONFUSION_CELLS)
    error: str | None = column(pa.string())


STATS_SCHEMA = schema_of(ImageRow)
EVALUATION_SCHEMA = schema_of(EvaluationRow)
