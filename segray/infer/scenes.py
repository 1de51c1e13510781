"""Scene segmentation on Ray: GeoTIFF/COG scenes of any size -> tiles -> actor pool -> stitched,
georeferenced outputs.

Data flow (steps in ``scene_steps``):

    driver: list scenes, read headers only (rasterio ``open_info``) -> chunk rows (scene, tile range)
    Ray Data: read_tiles (CPU tasks, windowed reads) -> TileProbabilities (actor pool, CPU/GPU)
              -> write_tiles (CPU tasks: per-tile float16 blobs + small rows)
    driver: streams the small tile rows; a row band's stitch task goes out as soon as every tile
            its blocks blend is in, the scene's assemble task when its last tile is in
    stitch_band (CPU tasks, many per scene, in parallel with prediction): block-wise blend ->
              the band's class map (+ probabilities) pieces, class counts, metrics, polygons
    assemble (one CPU task per scene): GDAL mosaics the pieces into COGs (overviews, compression
              on every core); polygons crossing band borders are joined (``scene_bands``)
    driver: scenes.parquet, tiles.parquet (optional), polygons.parquet (GeoParquet), summary.parquet

The stages are wired once; the checkpoint's family (``families.family_of(checkpoint).scenes``, a
``scene_family.SceneFamily``) supplies the tile predictor, the tile writer and the per-scene
merge: ``scene_steps`` for semantic checkpoints, ``scene_instances`` for instance (Mask R-CNN) ones.
A run is three parts: ``scene_plan.plan_scenes`` (checks, headers -> per-scene plan and chunk
rows), ``stream_tiles`` here (the tile dataset, stitch tasks submitted as scenes complete) and
``scene_outputs.write_outputs`` (scene rows, polygons, summary).

Tiles of one scene are independent rows, so a huge scene spreads over every actor; no step
holds a scene in memory (the driver keeps a few numbers per scene). Outputs under ``output``:

    masks/<scene_id>.tif          uint8 class map COG, nodata 255, the scene's CRS and transform
    probabilities/<scene_id>.tif  optional, one band per class (one band for a binary model)
    instances/<scene_id>.tif      instance checkpoints: uint32 instance ids (0 = none)
    scenes.parquet                one row per scene (``SCENE_SCHEMA``), errors included
    tiles.parquet                 optional, one row per tile (``scene_steps.TILE_SCHEMA``)
    polygons.parquet              GeoParquet 1.1, one row per polygon (``POLYGON_SCHEMA``)
    summary.parquet               one row: counts, throughput, aggregate metrics
    _SUCCESS                      the commit: written last, lists every file above (segray.io.commit)

A killed run commits nothing; ``resume: true`` keeps the scenes it finished (``_work/done/``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import pyarrow.parquet as pq

from segray.config import SceneInferJobConfig
from segray.core.checkpoint import Checkpoint
from segray.infer.families import family_of
from segray.infer.scene_layout import SCENE_SCHEMA, TILES, target
from segray.infer.scene_outputs import summarize, summary_rows, write_outputs
from segray.infer.scene_bands import BandTiles
from segray.infer.scene_plan import (
    PlannedScene,
    SceneTally,
    ScenesPlan,
    StitchSettings,
    TileRun,
    plan_scenes,
    record_finished,
)
from segray.infer.scene_steps import TILE_SCHEMA, read_tiles
from segray.io.fs import join
from segray.io.raster import tile_dtype
from segray.runtime import model_runtime_env, start_ray

__all__ = ["SCENE_SCHEMA", "build_tile_dataset", "run_scenes", "stream_tiles", "summarize",
           "summary_rows"]


def run_scenes(cfg: SceneInferJobConfig, on_progress: Callable[[str], None] | None = None,
               samples: list | None = None) -> dict[str, Any]:
    """Runs the job; returns the summary (also written to ``<output>/summary.parquet``).
    ``samples``: the scenes to run, when the caller listed them (default: ``cfg.source``'s)."""
    t_start = time.perf_counter()
    plan = plan_scenes(cfg, samples)
    if isinstance(plan, dict):  # resume over a committed output: nothing left to do
        return {**plan["record"], "status": "already committed"}
    run = stream_tiles(plan, t_start, on_progress)
    return write_outputs(plan, run, t_start)


class _WholeScenes:
    """One ``stitch`` task per scene, once its last tile is in (a family without bands)."""

    def __init__(self, plan: ScenesPlan, settings: StitchSettings) -> None:
        self.plan, self.settings, self.fn = plan, settings, plan.family.stitch

    def tile_in(self, scene: PlannedScene, tile_index: int) -> None:
        pass

    def args(self, scene: PlannedScene) -> tuple:
        return self.plan.stitch_task(scene, self.settings).to_dict(), self.plan.cfg.storage

    def drop(self, scene_id: str) -> None:
        pass


class _Bands:
    """A band task the moment every tile its blocks blend is in (``scene_bands.BandTiles``), then
    the scene's ``assemble`` task, given the band results, once its last tile is in. The driver
    holds a few counters per band and the band results' references, never their contents."""

    def __init__(self, plan: ScenesPlan, settings: StitchSettings) -> None:
        import ray

        self.plan, self.settings, self.fn = plan, settings, plan.family.assemble
        # retried when the worker dies: a band rewrites only its own pieces (scene_bands)
        self.band = ray.remote(plan.family.band).options(num_cpus=plan.cfg.cpus_per_task, max_retries=3)
        self.scenes: dict[str, tuple[dict, BandTiles, list[int], list]] = {}  # task, bands, tiles to come, refs

    def tile_in(self, scene: PlannedScene, tile_index: int) -> None:
        sid = scene.scene_id
        if sid not in self.scenes:
            task = self.plan.stitch_task(scene, self.settings).to_dict()
            bands = BandTiles(task)
            self.scenes[sid] = (task, bands, list(bands.needs), [None] * len(bands.rows))
        task, bands, left, refs = self.scenes[sid]
        for k in bands.bands_of(tile_index):
            left[k] -= 1
            if left[k] == 0:
                refs[k] = self.band.remote(task, k, self.plan.cfg.storage)

    def args(self, scene: PlannedScene) -> tuple:
        task, _, _, refs = self.scenes.pop(scene.scene_id)
        return task, self.plan.cfg.storage, refs  # in a list: fetched one by one, not all resolved first

    def drop(self, scene_id: str) -> None:
        import ray

        if scene_id in self.scenes:
            for ref in self.scenes.pop(scene_id)[3]:
                if ref is not None:  # a band already submitted: its pieces are never assembled
                    ray.cancel(ref)


class StitchQueue:
    """A scene's stitch tasks as its tiles come in: row bands and an ``assemble`` task for a family
    that stitches in bands (``SceneFamily.band``), else one ``stitch`` task once its last tile is
    in. At most ``max_stitch_tasks`` scene tasks in flight."""

    def __init__(self, plan: ScenesPlan, on_progress: Callable[[str], None] | None) -> None:
        import ray

        self.plan, self.on_progress, self.limit = plan, on_progress, plan.cfg.max_stitch_tasks
        settings = plan.stitch_settings()
        self.scheme = (_Bands if plan.family.band else _WholeScenes)(plan, settings)
        self.remote = ray.remote(self.scheme.fn).options(num_cpus=plan.cfg.cpus_per_task, max_retries=3)
        self.pending: dict[Any, str] = {}  # scene task future -> scene id
        self.results: dict[str, dict[str, Any]] = {sid: r["result"] for sid, r in plan.finished.items()}
        self.tile_ms: dict[str, float] = {}

    def tile_in(self, scene: PlannedScene, tally: SceneTally, tile_index: int) -> None:
        if not tally.errors:
            self.scheme.tile_in(scene, tile_index)

    def submit(self, scene: PlannedScene, tally: SceneTally) -> None:
        sid = scene.scene_id
        if tally.errors:
            self.scheme.drop(sid)
            self.results[sid] = {"status": "error",
                                 "error": f"{len(tally.errors)} of {tally.num_tiles} tiles failed: {tally.errors[0]}"}
            return
        while len(self.pending) >= self.limit:
            self.collect(block=False)
        self.tile_ms[sid] = tally.tile_ms
        self.pending[self.remote.remote(*self.scheme.args(scene))] = sid

    def collect(self, block: bool) -> None:
        """Results of finished tasks: one (``block=False``, only when at the limit) or all (``block=True``)."""
        import ray

        while self.pending and (block or len(self.pending) >= self.limit):
            ready, _ = ray.wait(list(self.pending), num_returns=1)
            for ref in ready:
                sid = self.pending.pop(ref)
                try:
                    self.results[sid] = ray.get(ref)
                except Exception as exc:  # the task itself died (e.g. out of memory)
                    self.results[sid] = {"status": "error", "error": f"stitch: {type(exc).__name__}: {exc}"}
                if self.results[sid]["status"] == "ok":  # a killed run's resume starts after it
                    record_finished(self.plan.work, sid, self.results[sid], self.tile_ms[sid], self.plan.cfg.storage)
                if self.on_progress:
                    self.on_progress(f"scene {sid}: {self.results[sid]['status']}")
            if not block:
                break


def stream_tiles(plan: ScenesPlan, t_start: float, on_progress: Callable[[str], None] | None = None) -> TileRun:
    """Streams the small tile rows through the driver (tiles.parquet when asked); a scene's stitch
    task goes out when its last tile is in. Returns when every stitch task has finished."""
    cfg = plan.cfg
    start_ray()
    queue = StitchQueue(plan, on_progress)
    tallies = {sid: SceneTally(s.num_tiles) for sid, s in plan.scenes.items()}
    for sid, record in plan.finished.items():
        if sid in tallies:
            tallies[sid] = SceneTally(plan.scenes[sid].num_tiles, done=plan.scenes[sid].num_tiles,
                                      tile_ms=record["tile_ms"])
    tile_writer = None
    if cfg.per_tile_rows:
        fs, path = target(join(cfg.output, TILES), cfg.storage)
        tile_writer = pq.ParquetWriter(path, TILE_SCHEMA, filesystem=fs)
    num_tiles = 0
    try:
        if plan.chunks:
            dtype = tile_dtype([s.info for s in plan.scenes.values()], plan.bands)
            tiles = build_tile_dataset(cfg, plan.chunks, plan.ckpt, plan.bands, plan.env, dtype)
            for batch in tiles.iter_batches(batch_size=None, batch_format="pyarrow"):
                if tile_writer is not None:
                    tile_writer.write_table(batch.cast(TILE_SCHEMA))
                num_tiles += batch.num_rows
                for sid in _count_tiles(batch, tallies, plan, queue):
                    queue.submit(plan.scenes[sid], tallies[sid])
        tiles_wall = time.perf_counter() - t_start
        queue.collect(block=True)
    finally:
        if tile_writer is not None:
            tile_writer.close()
    return TileRun(queue.results, tallies, num_tiles, tiles_wall)


def _count_tiles(batch, tallies: dict[str, SceneTally], plan: ScenesPlan, queue: StitchQueue) -> list[str]:
    """Adds a batch of tile rows to their scenes' tallies (and to the queue, tile by tile);
    returns the scenes now complete."""
    complete = []
    cols = batch.select(["scene_id", "tile_index", "status", "error", "read_ms", "predict_ms"]).to_pydict()
    for sid, index, status, error, rms, pms in zip(*cols.values()):
        t = tallies[sid]
        t.done += 1
        t.tile_ms += rms + pms
        if status != "ok":
            t.errors.append(error or "tile failed")
        queue.tile_in(plan.scenes[sid], t, index)
        if t.done == t.num_tiles:
            complete.append(sid)
    return complete


def build_tile_dataset(cfg: SceneInferJobConfig, chunks: list[dict], ckpt: Checkpoint, bands: list[int] | None,
                       env: dict, dtype: str = "float32"):
    """The lazy Ray Dataset of per-tile rows (``TILE_SCHEMA``); blobs are written as a side effect.
    Tiles carry pixels as ``dtype`` (one for the job: ``segray.io.raster.tile_dtype``)."""
    import ray
    from ray.data import ActorPoolStrategy

    family = family_of(ckpt).scenes
    # Several chunk rows per block: enough read tasks to feed every actor, few enough to stay cheap.
    num_blocks = max(1, min(len(chunks), max(cfg.num_actors * 4, math.ceil(len(chunks) / 4))))
    ds = ray.data.from_items(chunks, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        read_tiles,
        fn_kwargs={"tile_size": cfg.tile_size, "overlap": cfg.overlap, "bands": bands, "nodata": cfg.nodata, "env": env,
                   "gdal_cache_mb": cfg.gdal_cache_mb, "dtype": dtype},
        batch_size=1,  # one chunk row -> batch_size tiles
        num_cpus=cfg.cpus_per_task,
    )
    load = {"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size}
    ds = ds.map_batches(family.predictor, fn_constructor_kwargs={**load, **family.predictor_kwargs(cfg)},
                        compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
                        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus_per_actor, runtime_env=model_runtime_env())
    return ds.map_batches(family.write_tiles, fn_kwargs=family.write_kwargs(cfg, ckpt, env),
                          batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_task)
