"""What one night runs (``NightlyJobConfig.workload``): its rows' schema and how they are written
into the night's partition, which :mod:`segray.infer.nightly` then commits.

``images``: the images pipeline's rows (the checkpoint family's schema), streamed by Ray Data
into the partition. ``scenes``: ``segment-scenes`` over the night's scenes into
``run_date=.../scenes/`` (COG masks, polygons, its own ``_SUCCESS``), and its scene rows
(``SCENE_SCHEMA``, one per scene, errors included) as the partition's data file, so readers of
the nightly output get one row per input whatever the workload.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from segray.config import NightlyJobConfig
from segray.core.checkpoint import Checkpoint
from segray.infer.scene_layout import SCENE_SCHEMA, SCENES
from segray.infer.sinks import PartitionSink
from segray.io.fs import join, pyarrow_fs
from segray.io.listing import Archive

SCENES_DIR = "scenes"  # a scenes night's own outputs, inside its partition


class ImagesNight:
    name = "images"
    subfolders: tuple[str, ...] = ()

    def schema(self, family) -> pa.Schema:
        return family.schema

    def write(self, cfg: NightlyJobConfig, sink: PartitionSink, todo: Archive, ckpt: Checkpoint) -> None:
        from segray.infer.pipeline import build_dataset

        sink.write(build_dataset(cfg.infer_config(sink.partition), todo.listing(), ckpt))


class ScenesNight:
    name = "scenes"
    subfolders = (SCENES_DIR,)

    def schema(self, family) -> pa.Schema:
        return SCENE_SCHEMA

    def write(self, cfg: NightlyJobConfig, sink: PartitionSink, todo: Archive, ckpt: Checkpoint) -> None:
        from segray.infer.scenes import run_scenes

        out = join(sink.partition, SCENES_DIR)
        run_scenes(cfg.scene_config(out), samples=todo.samples())
        fs, path = pyarrow_fs(join(out, SCENES), cfg.storage)
        sink.write_table(pq.read_table(path, filesystem=fs))


WORKLOADS = {w.name: w for w in (ImagesNight(), ScenesNight())}
