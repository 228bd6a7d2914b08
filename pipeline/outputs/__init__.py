"""The output contract, owned here and nowhere else: what a run writes under its output root.

```
manifest.json                 the run: config, model, counts, shards, timings; written last (the commit)
stats/part-<shard>.parquet    one ImageRow per input image, errors included; a shard's commit; its footer
                              carries the run id, the input files' versions and the rows' totals
plan/part-<n>.parquet         the shards and their members, written while the input is listed (plan.json last)
masks/<image id>.png|.tif     palette PNG or tiled COG (georeferenced input), value = class index, 255 = ignore
vectors/part-<shard>.parquet  outputs.vectors: the masks' polygons per class, GeoParquet; before its stats part
metrics.json                  dataset and per-class metrics, with their definitions
confusion_matrix.parquet      the dataset confusion matrix, rows ground truth
evaluations/<name>/           re-evaluations of the run's masks (see pipeline.evaluate)
```

- ``paths``: where each file lies;
- ``rows``: the typed rows (``ImageRow``, ``EvaluationRow``) and the Arrow schemas derived from them;
- ``tables``: the one Parquet writer, the run id a part carries, the one confusion reduce;
- ``totals``: a part's rows summed (counts, confusion, class pixels), what the dataset reduce adds up;
- ``plan``: the plan file, written by the driver and read back by the actors;
- ``manifest``: the typed manifest, its one builder and one reader, and JSON writing.
"""

from pipeline.outputs.manifest import (
    Increment,
    Manifest,
    ModelInfo,
    RunCounts,
    ShardEntry,
    Timings,
    build_manifest,
    part_paths,
    read_manifest,
    shard_entries,
    write_json,
)
from pipeline.outputs.paths import (
    CONFUSION,
    EVALUATIONS,
    MANIFEST,
    MASK_SUFFIXES,
    METRICS,
    committed_parts,
    mask_path,
    overlay_path,
    stats_path,
    unsafe_image_id,
    vectors_path,
)
from pipeline.outputs.rows import EVALUATION_SCHEMA, STATS_SCHEMA, ErrorKind, EvaluationRow, ImageRow, to_table
from pipeline.outputs.tables import (
    RowCounts,
    committed_run_id,
    part_run_id,
    part_sources,
    read_sources,
    read_tables,
    reduce_confusion,
    reduce_parts,
    stats_metadata,
    write_confusion,
    write_table,
)
from pipeline.outputs.totals import Totals, read_totals, write_stats

__all__ = [
    "CONFUSION",
    "EVALUATIONS",
    "EVALUATION_SCHEMA",
    "MANIFEST",
    "MASK_SUFFIXES",
    "METRICS",
    "STATS_SCHEMA",
    "EvaluationRow",
    "ErrorKind",
    "ImageRow",
    "Increment",
    "Manifest",
    "ModelInfo",
    "RowCounts",
    "RunCounts",
    "ShardEntry",
    "Timings",
    "Totals",
    "build_manifest",
    "committed_parts",
    "committed_run_id",
    "mask_path",
    "overlay_path",
    "part_paths",
    "part_run_id",
    "part_sources",
    "read_manifest",
    "read_sources",
    "read_tables",
    "read_totals",
    "reduce_confusion",
    "reduce_parts",
    "shard_entries",
    "stats_metadata",
    "stats_path",
    "to_table",
    "unsafe_image_id",
    "vectors_path",
    "write_confusion",
    "write_json",
    "write_stats",
    "write_table",
]
