"""``segpipe bench``: the same workload through four paths, side by side, in one run.

- ``ceiling``: the model's forward and argmax alone, on inputs already decoded, normalised and on the device,
  in segpipe's process layout (one process per actor, with an actor's threads);
- ``naive``: the loop a user would write (PIL, batch 1, fp32, PNG per image, Parquet at the end);
- ``raydata``: Ray Data's batch-inference pattern (read_images -> map_batches on an actor pool -> write_parquet);
- ``segpipe``: the real job end to end (plan, actors, masks, stats parts, reduce, manifest).

Each path runs in its own process, so its peak memory (the whole process tree, Ray's workers included)
is its own; see ``runner.py`` for the orchestration and ``paths.py`` for the paths.
"""
