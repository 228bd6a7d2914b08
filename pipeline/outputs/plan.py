"""``plan/``: a run's shards with their members, written while the input is listed, read back by the actors.

```
plan/part-<n>.parquet   one row per shard: its id, members (items or a member file and row groups), sizes,
                        versions, images, increment; ``SHARDS_PER_PART`` shards per part, in plan order
plan/plan.json          written last, the plan's commit (once the output's parts are checked against it):
                        the run id, increment and counts
```

The driver keeps each shard light (``Shard.plan_part`` set, no members), so its memory grows by a few hundred
bytes per shard, never per image; an actor reads the part its shard is in (and keeps the last few: shards
arrive in plan order). A rerun of the same job reuses a committed plan instead of listing the input again.
"""

from __future__ import annotations

import json
import posixpath
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import islice

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.outputs.tables import write_table
from pipeline.sources import Shard

PLAN_DIR = "plan"
PLAN_INFO = "plan.json"
SHARDS_PER_PART = 256  # an actor reads a whole part for one shard: small parts, few wasted bytes
PARTS_KEPT = 2  # parts an actor keeps read: the one its shards are in, and the next as they cross over
PLAN_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("sizes", pa.list_(pa.int64())),
        ("versions", pa.list_(pa.string())),
        ("member", pa.string()),
        ("row_groups", pa.list_(pa.int32())),
        ("images", pa.int64()),
        ("increment", pa.int32()),
    ]
)
_LIGHT = ["shard_id", "images", "increment"]  # what the driver reads back of a committed plan


@dataclass(frozen=True, kw_only=True)
class PlanInfo:
    """What a plan holds, in ``plan.json``."""

    run_id: str
    increment: int
    shards: int
    images: int | None  # None when some shard's count is known only once read (a tar)
    bytes: int | None  # None when some input file's size was not listed
    files: int  # input files: loose images, or tars and Parquet files
    parts: int


def plan_part_path(root: str, part: int) -> str:
    return storage.join(root, PLAN_DIR, f"part-{part:05d}.parquet")


def write_plan(
    fs: fsspec.AbstractFileSystem, root: str, shards: Iterable[Shard], run_id: str, increment: int, save: bool = True
) -> tuple[list[Shard], PlanInfo]:
    """Stream ``shards`` into plan parts as they come; returns the light shards and the counts, for
    ``commit_plan`` once the plan is checked. ``save=False`` counts without writing (a dry run)."""
    if save:
        clear_plan(fs, root)
    light: list[Shard] = []
    tally = _Tally()
    stream = iter(shards)
    while group := list(islice(stream, SHARDS_PER_PART)):
        part = len(light) // SHARDS_PER_PART
        if save:
            write_table(fs, plan_part_path(root, part), _to_table(group))
        light.extend(_light(s, part) for s in group)
        tally.add(group)
    return light, tally.info(run_id, increment, len(light), -(-len(light) // SHARDS_PER_PART))


def commit_plan(fs: fsspec.AbstractFileSystem, root: str, info: PlanInfo) -> None:
    """Write ``plan.json``: from now on a rerun of this job reuses the plan (and trusts the parts it names)."""
    storage.write_bytes(fs, storage.join(root, PLAN_DIR, PLAN_INFO), json.dumps(asdict(info), indent=2).encode())


def read_plan(
    fs: fsspec.AbstractFileSystem, root: str, run_id: str, increment: int
) -> tuple[list[Shard], PlanInfo] | None:
    """The light shards and counts of the committed plan of run ``run_id``'s ``increment``, or None."""
    info = read_plan_info(fs, root)
    if info is None or (info.run_id, info.increment) != (run_id, increment):
        return None
    return light_shards(fs, root, info), info


def light_shards(fs: fsspec.AbstractFileSystem, root: str, info: PlanInfo) -> list[Shard]:
    """The light shards of the committed plan ``info`` describes, read back from its parts' light columns."""
    shards = []
    for part in range(info.parts):
        table = pq.read_table(pa.BufferReader(fs.cat_file(plan_part_path(root, part))), columns=_LIGHT)
        rows = table.to_pylist()
        shards.extend(Shard(r["shard_id"], images=r["images"], increment=r["increment"], plan_part=part) for r in rows)
    return shards


def read_plan_info(fs: fsspec.AbstractFileSystem, root: str) -> PlanInfo | None:
    try:
        return PlanInfo(**json.loads(fs.cat_file(storage.join(root, PLAN_DIR, PLAN_INFO))))
    except FileNotFoundError:
        return None


def clear_plan(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove an earlier plan, its commit first: a plan half replaced never looks committed."""
    folder = storage.join(root, PLAN_DIR)
    storage.remove_files(fs, [storage.join(folder, PLAN_INFO)])
    if fs.exists(folder):
        storage.remove_files(fs, [p for p in fs.find(folder) if posixpath.basename(p).startswith("part-")])


class PlanReader:
    """An actor's view of the plan: a light shard back with its members, from the parts it read last."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self._parts: OrderedDict[int, dict[str, dict]] = OrderedDict()

    def full(self, shard: Shard) -> Shard:
        if shard.plan_part is None:
            return shard
        row = self._part(shard.plan_part).get(shard.shard_id)
        if row is None:
            raise LookupError(f"shard {shard.shard_id} is not in plan part {shard.plan_part}: the plan was replaced")
        return _from_row(row)

    def _part(self, part: int) -> dict[str, dict]:
        if part not in self._parts:
            table = pq.read_table(pa.BufferReader(self.fs.cat_file(plan_part_path(self.root, part))))
            self._parts[part] = {row["shard_id"]: row for row in table.to_pylist()}
            while len(self._parts) > PARTS_KEPT:
                self._parts.popitem(last=False)
        self._parts.move_to_end(part)
        return self._parts[part]


def _light(shard: Shard, part: int) -> Shard:
    return Shard(shard.shard_id, images=shard.images, increment=shard.increment, plan_part=part)


def _to_table(shards: list[Shard]) -> pa.Table:
    rows = {
        "shard_id": [s.shard_id for s in shards],
        "items": [list(s.items) for s in shards],
        "sizes": [list(s.sizes) for s in shards],
        "versions": [list(s.versions) for s in shards],
        "member": [s.member for s in shards],
        "row_groups": [list(s.row_groups) if s.row_groups else None for s in shards],
        "images": [s.images for s in shards],
        "increment": [s.increment for s in shards],
    }
    return pa.Table.from_pydict(rows, schema=PLAN_SCHEMA)


def _from_row(row: dict) -> Shard:
    return Shard(
        row["shard_id"],
        items=tuple(row["items"]),
        member=row["member"],
        row_groups=tuple(row["row_groups"]) if row["row_groups"] else None,
        images=row["images"],
        versions=tuple(row["versions"]),
        increment=row["increment"],
        sizes=tuple(row["sizes"]),
    )


class _Tally:
    """Counts of the shards streamed so far."""

    def __init__(self) -> None:
        self.images: int | None = 0
        self.bytes: int | None = 0
        self.files = 0
        self._member: str | None = None

    def add(self, shards: list[Shard]) -> None:
        for s in shards:
            new_member = s.member is not None and s.member != self._member  # a Parquet file's shards share it
            self._member = s.member
            self.files += len(s.items) + new_member
            self.images = None if self.images is None or s.images is None else self.images + s.images
            if s.items or new_member:
                sizes = s.sizes or (None,)
                self.bytes = None if self.bytes is None or None in sizes else self.bytes + sum(sizes)

    def info(self, run_id: str, increment: int, shards: int, parts: int) -> PlanInfo:
        return PlanInfo(
            run_id=run_id,
            increment=increment,
            shards=shards,
            images=self.images,
            bytes=self.bytes,
            files=self.files,
            parts=parts,
        )
