"""Listing an input of many objects on the local S3 server: ``iter_files`` one folder at a time, with several
folder listings in flight, and the flat ``fs.find`` it replaced, in interleaved rounds over the same objects;
folder listings made by s3fs and by obstore (``storage.client: obstore``), whose requests are Rust, not Python.

The objects are tiny ``.jpg`` keys spread over two levels of folders (``d000/e00/0000001.jpg``), as date or
partition layouts are; they are uploaded once (many PUTs in flight through obstore) and kept in ``work``.
Each timing lists with a fresh filesystem, so no listing cache is carried over, and notes how many entries
the listing left in ``fs.dircache``: the memory that grows per object.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.bench.increments import _spread
from pipeline.devtools.local_s3 import LocalS3
from pipeline.obstore_s3 import ObstoreS3FileSystem
from pipeline.sources.listing import iter_files

BUCKET = "bench"
SUFFIX = ".jpg"
FOLDERS_PER_PARENT = 10  # second-level folders under each first-level one
UPLOAD_THREADS = 64
CONCURRENCIES = (4, 16, 64)  # obstore's; s3fs's at 16 only: its one event loop gains nothing from more
CLIENTS = {"s3fs": None, "obstore": ObstoreS3FileSystem}


def measure(
    work: Path,
    objects: int = 100_000,
    prefixes: int = 100,
    rounds: int = 3,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
) -> dict:
    """Seconds to list ``objects`` objects in ``prefixes`` folders, min / median / max of ``rounds`` rounds per
    variant, and each variant's speed-up over the sequential walk (median over median); written to
    ``work/listing.json``. Raises RuntimeError if two variants list different paths."""
    root = f"{BUCKET}/listing-{objects}x{prefixes}"
    with LocalS3(work / "s3-listing") as s3:
        _upload_once(s3, root, objects, prefixes)
        variants = _variants(root, concurrencies)
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
        expected = None
        for _ in range(rounds):
            for name, (client, list_paths) in variants.items():
                fs = s3.fs() if client is None else client(**_options(s3))
                start = time.perf_counter()
                paths = list_paths(fs)
                runs[name].append((time.perf_counter() - start, _cached_entries(fs)))
                expected = expected or paths
                if paths != expected or len(paths) != objects:
                    raise RuntimeError(f"{name} listed {len(paths)} paths, not the {objects} the others list")
    report = {"objects": objects, "prefixes": prefixes, "rounds": rounds, "variants": _summary(runs)}
    (work / "listing.json").write_text(json.dumps(report, indent=2))
    return report


def _variants(root: str, concurrencies: tuple[int, ...]) -> dict[str, tuple[type | None, Callable]]:
    """Each way of listing ``root``'s paths, sorted, with the filesystem class it lists through (None: s3fs):
    s3fs's flat find (planning before), the walk through s3fs and through obstore, one folder at a time and
    several in flight."""

    def walk(concurrency: int) -> Callable:
        return lambda fs: [f.path for f in iter_files(fs, root, (SUFFIX,), concurrency=concurrency)]

    def find(fs) -> list[str]:
        prefix = f"{root}/"
        return sorted(path.removeprefix(prefix) for path in fs.find(root, detail=True) if path.endswith(SUFFIX))

    variants = {"s3fs_find": (None, find), "s3fs_walk_1": (None, walk(1)), "s3fs_walk_16": (None, walk(16))}
    obstore = CLIENTS["obstore"]
    return (
        variants
        | {"obstore_walk_1": (obstore, walk(1))}
        | {f"obstore_walk_{n}": (obstore, walk(n)) for n in concurrencies}
    )


def _options(s3: LocalS3) -> dict:
    return {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret, "skip_instance_cache": True}


def _upload_once(s3: LocalS3, root: str, objects: int, prefixes: int) -> None:
    """PUT the objects, unless a previous run left them all (its last step writes ``<root>.done``)."""
    fs = ObstoreS3FileSystem(**_options(s3))
    done = f"{root}.done"
    if fs.exists(done):
        return
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    keys = [f"{root}/{_folder(i % prefixes)}/{i:07d}{SUFFIX}" for i in range(objects)]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda key: fs.pipe_file(key, b"jpg"), keys))
    fs.pipe_file(done, b"")


def _folder(n: int) -> str:
    return f"d{n // FOLDERS_PER_PARENT:03d}/e{n % FOLDERS_PER_PARENT:02d}"


def _cached_entries(fs) -> int:
    """Listing entries the filesystem keeps after the listing (s3fs's ``dircache``)."""
    return sum(len(entries) for entries in fs.dircache.values())


def _summary(runs: dict[str, list[tuple[float, int]]]) -> dict:
    """Per variant: min / median / max seconds, the speed-up of its median over its own client's walk one folder
    at a time and over s3fs's flat find, and the most entries a listing left cached."""
    medians = {name: statistics.median(seconds for seconds, _ in timed) for name, timed in runs.items()}
    out = {}
    for name, timed in runs.items():
        sequential = medians[f"{name.split('_')[0]}_walk_1"]
        out[name] = {
            "seconds": _spread([s for s, _ in timed]),
            "speedup_vs_sequential": round(sequential / medians[name], 2),
            "speedup_vs_s3fs_find": round(medians["s3fs_find"] / medians[name], 2),
            "cached_entries_after": max(entries for _, entries in timed),
        }
    return out
