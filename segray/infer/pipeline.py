"""Bulk inference on Ray Data: list -> read+decode (CPU tasks) -> predict (actor pool) -> encode -> Parquet.

The same stages for every model family; the checkpoint's family (:mod:`segray.infer.families`)
gives the rows, the steps, the row schema and the summary.

Nothing is collected on the driver: rows stream from the source through the actor pool into
Parquet files, and the summary is computed afterwards from a few small columns. The listing is
an Arrow table (:func:`segray.io.sources.listing`, ~120 bytes per object) handed to Ray Data as
it is, so a million-object manifest is a few hundred MB on the driver, not a Python object each.
"""

from __future__ import annotations

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


# Listing blocks: a few batches each so that every actor is busy early, and at most this many,
# so that a million-row listing is a few thousand puts, not one per batch.
MAX_LISTING_BLOCKS = 4096


def build_dataset(cfg: InferJobConfig, listed: pa.Table, ckpt: Checkpoint):
    """The lazy Ray Dataset of output rows (the checkpoint family's ``schema``) of the inputs
    ``listed`` (:func:`segray.io.sources.listing`): the family gives the rows and the steps,
    wired here once: read+decode tasks -> predictor actors -> encode tasks."""
    import ray
    from ray.data import ActorPoolStrategy

    stages = family_of(ckpt).image_stages(cfg, listed, ckpt)
    n = len(stages.items)
    blocks = max(1, min(n, MAX_LISTING_BLOCKS, max(cfg.num_actors * 4, math.ceil(n / (cfg.batch_size * 2)))))
    if isinstance(stages.items, pa.Table):  # Arrow all the way: no Python object per row on the driver
        step = math.ceil(n / blocks)
        ds = ray.data.from_arrow([stages.items.slice(i, step) for i in range(0, n, step)])
    else:
        ds = ray.data.from_items(stages.items, override_num_blocks=blocks)
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
