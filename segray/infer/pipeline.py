"""Bulk inference on Ray Data: list -> read+decode (CPU tasks) -> predict (actor pool) -> encode -> Parquet.

The same stages for every model family; the checkpoint's family (:mod:`segray.infer.families`)
gives the rows, the steps, the row schema and the summary.

Nothing is collected on the driver: rows stream from the source through the actor pool into
Parquet files, and the summary is computed afterwards from a few small columns. The listing is
an Arrow table (:func:`segray.io.sources.listing`, ~120 bytes per object) handed to Ray Data as
it is, so a million-object manifest is a few hundred MB on the driver, not a Python object each.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from segray.config import InferJobConfig
from segray.core.checkpoint import Checkpoint
from segray.infer.families import family_of
from segray.infer.sinks import ParquetFolderSink
from segray.infer.steps import open_checkpoint
from segray.io.sources import listing
from segray.runtime import model_runtime_env, start_ray


# Rows per listing block, at most: a few thousand rows are ~1 MB of listing, so a million-row
# listing is a few hundred blocks in the object store, not thousands of small objects in the
# driver's own memory (Ray keeps objects under 100 KB in the owner's heap).
MAX_BLOCK_ROWS = 8192


def listing_blocks(n: int, batch_size: int, num_actors: int) -> list[int]:
    """Rows per block of an ``n``-row listing: two batches first (fewer for a small listing: at
    least four blocks per actor), doubling up to a cap. Small blocks first put predictions in
    storage within seconds (a block's rows come out together); the cap, ``n / (16 * actors)``,
    keeps enough blocks in flight to balance the actors to the end, and ``MAX_BLOCK_ROWS``
    bounds a read task."""
    first = max(1, min(batch_size * 2, math.ceil(n / (4 * num_actors))))
    cap = max(first, min(MAX_BLOCK_ROWS, math.ceil(n / (16 * num_actors))))
    sizes, size = [], first
    while n > 0:
        sizes.append(min(size, n))
        n -= sizes[-1]
        size = min(size * 2, cap)
    return sizes


def build_dataset(cfg: InferJobConfig, listed: pa.Table, ckpt: Checkpoint):
    """The lazy Ray Dataset of output rows (the checkpoint family's ``schema``) of the inputs
    ``listed`` (:func:`segray.io.sources.listing`): the family gives the rows and the steps,
    wired here once: read+decode tasks -> predictor actors -> encode tasks."""
    import ray
    from ray.data import ActorPoolStrategy

    stages = family_of(ckpt).image_stages(cfg, listed, ckpt)
    sizes = listing_blocks(len(stages.items), cfg.batch_size, cfg.num_actors) or [0]
    if isinstance(stages.items, pa.Table):  # Arrow all the way: no Python object per row on the driver
        starts = itertools.accumulate(sizes, initial=0)
        ds = ray.data.from_arrow([stages.items.slice(start, size) for start, size in zip(starts, sizes)])
    else:
        ds = ray.data.from_items(stages.items, override_num_blocks=len(sizes))
    ds = ds.map_batches(stages.read, fn_kwargs=stages.read_kwargs, batch_size=cfg.batch_size,
                        num_cpus=cfg.cpus_per_task)
    ds = ds.map_batches(
        stages.predictor,
        fn_constructor_kwargs=stages.predictor_kwargs,
        compute=ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        runtime_env=model_runtime_env(),  # allocator settings (segray.runtime): ~1.5x on CPU
    )
    return ds.map_batches(stages.encode, fn_kwargs=stages.encode_kwargs, batch_size=cfg.batch_size,
                          num_cpus=cfg.cpus_per_task)


def run_inference(cfg: InferJobConfig) -> dict[str, Any]:
    """Runs the job; returns the summary (also in ``<output>/summary.parquet`` and ``_SUCCESS``).

    With ``resume``, the rows a killed run finished are kept and only the other inputs run."""
    # Everything that can fail fast does so before any cluster work.
    ckpt = open_checkpoint(cfg.checkpoint, cfg.storage)
    listed = listing(cfg.source, cfg.storage)
    pa.default_memory_pool().release_unused()  # the listing's intermediate columns: ~2x the listing itself
    from segray.infer.iceberg import IcebergSink  # the sink: an Iceberg table with `table:`, else the folder
    sink = IcebergSink.for_infer(cfg, ckpt, listed) if cfg.table is not None else ParquetFolderSink(
        cfg.output, cfg.storage, listed["image"], overwrite=cfg.overwrite, resume=cfg.resume,
        num_cpus=cfg.cpus_per_task)
    sink.prepare()
    if sink.complete is not None:  # resume over a committed output: nothing left to do
        return {**sink.complete["record"], "status": "already committed"}

    t0 = time.perf_counter()
    # Rows key on the readable form, the listing's ``image``; without resumed rows, no copy.
    todo = listed.filter(pc.invert(pc.is_in(listed["image"], value_set=pa.array(sorted(sink.done), pa.string())))) \
        if sink.done else listed
    if todo.num_rows:
        start_ray()
        sink.write(build_dataset(cfg, todo, ckpt))
    summary = family_of(ckpt).summarize(cfg, ckpt, num_inputs=listed.num_rows, wall_s=time.perf_counter() - t0)
    summary["num_resumed"] = len(sink.done)
    return sink.commit(summary)
