"""Scene segmentation on Ray: GeoTIFF/COG scenes of any size -> tiles -> actor pool -> stitched,
georeferenced outputs.

Data flow (steps in ``scene_steps``):

    driver: list scenes, read headers only (rasterio ``open_info``) -> chunk rows (scene, tile range)
    Ray Data: read_tiles (CPU tasks, windowed reads) -> TileProbabilities (actor pool, CPU/GPU)
              -> write_tiles (CPU tasks: per-tile float16 blobs + small rows)
    driver: streams the small tile rows; when a scene's last tile is in, submits stitch_scene
    stitch_scene (one CPU task per scene): block-wise blend -> COG mask (+ probabilities),
              class counts, metrics, polygons
    driver: scenes.parquet, tiles.parquet (optional), polygons.parquet (GeoParquet), summary.parquet

An instance (Mask R-CNN) checkpoint takes the same path with ``scene_instances``' actor,
tile writer and per-scene merge in place of the semantic ones.

Tiles of one scene are independent rows, so a huge scene spreads over every actor; no step
holds a scene in memory (the driver keeps a few numbers per scene). Outputs under ``output``:

    masks/<scene_id>.tif          uint8 class map COG, nodata 255, the scene's CRS and transform
    probabilities/<scene_id>.tif  optional, one band per class (one band for a binary model)
    instances/<scene_id>.tif      instance checkpoints: uint32 instance ids (0 = none)
    scenes.parquet                one row per scene (``SCENE_SCHEMA``), errors included
    tiles.parquet                 optional, one row per tile (``scene_steps.TILE_SCHEMA``)
    polygons.parquet              GeoParquet 1.1, one row per polygon (``POLYGON_SCHEMA``)
    summary.parquet               one row: counts, throughput, aggregate metrics
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segray.config import ConfigError, SceneInferJobConfig
from segray.core.metrics import metric_num_classes, segmentation_metrics
from segray.core.scene_polygons import POLYGON_SCHEMA, geoparquet_metadata
from segray.infer.scene_instances import INSTANCE_POLYGON_SCHEMA
from segray.infer.scene_steps import (
    TILE_SCHEMA,
    TileProbabilities,
    grid_tiles,
    model_align,
    read_tiles,
    stitch_scene,
    virtual_size,
    write_tiles,
)
from segray.infer.steps import error_reasons, read_checkpoint
from segray.io.fs import exists, join, list_samples, pyarrow_fs, remove_tree
from segray.io.raster import RasterInfo, gdal_env, open_info
from segray.runtime import model_runtime_env

log = logging.getLogger(__name__)

MASKS, PROBABILITIES, INSTANCES, WORK = "masks", "probabilities", "instances", "_work"
SCENES, TILES, POLYGONS, SUMMARY = "scenes.parquet", "tiles.parquet", "polygons.parquet", "summary.parquet"
MIXED_CRS = "OGC:CRS84"  # polygons.parquet CRS when scenes come in several CRSs

SCENE_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("source_path", pa.string()),
        ("label_path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bands", pa.int32()),
        ("dtype", pa.string()),
        ("crs", pa.string()),  # "EPSG:xxxx" when GDAL finds an authority code, else WKT; null if none
        ("transform", pa.list_(pa.float64())),  # affine a, b, c, d, e, f (pixel -> map)
        ("bounds", pa.list_(pa.float64())),  # left, bottom, right, top in the CRS
        ("nodata", pa.float64()),
        ("num_tiles", pa.int32()),
        ("tile_errors", pa.int32()),
        ("mask_path", pa.string()),
        ("probabilities_path", pa.string()),
        ("num_polygons", pa.int64()),
        ("num_instances", pa.int64()),  # instance checkpoints: objects after merging across tiles
        ("valid_fraction", pa.float64()),
        ("class_pixels", pa.list_(pa.int64())),  # valid pixels per class
        ("class_fractions", pa.list_(pa.float64())),  # of the valid pixels
        ("mean_confidence", pa.float64()),
        ("has_ground_truth", pa.bool_()),
        ("pixel_accuracy", pa.float64()),
        ("miou", pa.float64()),
        ("iou", pa.list_(pa.float64())),
        ("dice", pa.list_(pa.float64())),
        ("confusion", pa.list_(pa.int64())),  # row-major [target, prediction]
        ("model_name", pa.string()),
        ("checkpoint_id", pa.string()),
        ("tile_s", pa.float64()),  # read + predict time summed over tiles
        ("stitch_s", pa.float64()),
    ]
)


def _outputs(cfg: SceneInferJobConfig) -> list[str]:
    return [join(cfg.output, p) for p in (MASKS, PROBABILITIES, INSTANCES, WORK, SCENES, TILES, POLYGONS, SUMMARY)]


def check_output(cfg: SceneInferJobConfig) -> None:
    """Refuse to mix runs in one output folder unless asked to overwrite."""
    found = [u for u in _outputs(cfg) if exists(u, cfg.storage)]
    if found and not cfg.overwrite:
        raise ConfigError(f"output: {found[0]} already exists (set overwrite=true to replace it)")
    for u in found:
        remove_tree(u, cfg.storage)


def _target(url: str, storage) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for a file to write, its parent folder created (local paths)."""
    fs, path = pyarrow_fs(url, storage)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    return fs, path


def read_headers(urls: list[str], env: dict, threads: int = 8) -> list[RasterInfo | Exception]:
    """Headers only (size, bands, CRS, transform, nodata), a few at a time; errors are returned."""

    def one(url: str) -> RasterInfo | Exception:
        try:
            return open_info(url, env)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        return list(pool.map(one, urls))


def _class_names(payload: dict) -> list[str]:
    names = list(payload["class_names"])
    return ["background", *names] if len(names) == 1 else names


def _scene_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SCENE_SCHEMA.names)
    row.update(values)
    return row


class _Scene:
    """Driver-side bookkeeping for one scene (a few numbers, never pixels)."""

    def __init__(self, sample, info: RasterInfo, tiles: int, vheight: int, vwidth: int) -> None:
        self.sample, self.info, self.num_tiles = sample, info, tiles
        self.vheight, self.vwidth = vheight, vwidth
        self.done = 0
        self.errors: list[str] = []
        self.tile_ms = 0.0


def run_scenes(cfg: SceneInferJobConfig, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the job; returns the summary (also written to ``<output>/summary.parquet``)."""
    import ray

    t_start = time.perf_counter()
    payload, ckpt_id = read_checkpoint(cfg.checkpoint, cfg.storage)
    task = payload.get("task", "semantic")
    if task not in ("semantic", "instance"):
        raise ConfigError(f"checkpoint: unknown task {task!r}")
    instance = task == "instance"
    if instance and cfg.write_probabilities:
        raise ConfigError("write_probabilities: instance checkpoints give instances, not class probabilities")
    model_cfg = payload["model_config"]
    num_classes, in_channels = int(model_cfg["num_classes"]), int(model_cfg["in_channels"])
    if num_classes > 255:
        raise ConfigError("segment-scenes writes uint8 class maps: at most 255 classes")
    names = _class_names(payload)
    bands0 = cfg.bands if cfg.bands is not None else payload.get("bands")
    bands = [b + 1 for b in bands0] if bands0 else None  # GDAL bands are 1-based
    if bands and len(bands) != in_channels:
        raise ConfigError(f"bands: {len(bands)} bands given, the model takes {in_channels}")
    align = cfg.tile_align or model_align(model_cfg)
    if (cfg.tile_size - cfg.overlap) % align or cfg.tile_size % align:
        log.warning("tile_size %d and tile_size - overlap %d are best multiples of %d (the model's pooling "
                    "factor); otherwise tiled predictions differ slightly from untiled ones",
                    cfg.tile_size, cfg.tile_size - cfg.overlap, align)
    samples = list_samples(cfg.source, cfg.storage)
    check_output(cfg)
    env = gdal_env(cfg.storage)
    work = join(cfg.work_dir, uuid.uuid4().hex[:12]) if cfg.work_dir else join(cfg.output, WORK)

    # ---- headers -> chunk rows (driver work is per scene, not per pixel)
    headers = read_headers([s.image for s in samples], env)
    scenes: dict[str, _Scene] = {}
    rows: dict[str, dict[str, Any]] = {}  # finished scene rows
    chunks: list[dict[str, Any]] = []
    for sample, info in zip(samples, headers):
        base = dict(scene_id=sample.image_id, source_path=sample.image, label_path=sample.mask, model_name=model_cfg["name"],
                    checkpoint_id=ckpt_id, has_ground_truth=False)
        if isinstance(info, Exception):
            rows[sample.image_id] = _scene_row(**base, status="error", error=f"unreadable: {type(info).__name__}: {info}")
            continue
        geo = dict(height=info.height, width=info.width, bands=info.count, dtype=info.dtype, crs=info.crs,
                   transform=list(info.transform), bounds=list(info.bounds), nodata=info.nodata)
        wanted = len(bands) if bands else info.count
        bad = [b for b in bands or [] if b > info.count]
        if bad or wanted != in_channels:
            why = f"band {bad[0]} requested, scene has {info.count}" if bad else \
                f"scene has {info.count} bands, model expects {in_channels} (set bands)"
            rows[sample.image_id] = _scene_row(**base, **geo, status="error", error=why)
            continue
        vh = virtual_size(info.height, cfg.tile_size, align)
        vw = virtual_size(info.width, cfg.tile_size, align)
        n = len(grid_tiles(vh, vw, cfg.tile_size, cfg.overlap))
        scenes[sample.image_id] = _Scene(sample, info, n, vh, vw)
        blob_dir = join(work, "tiles", sample.image_id)
        for start in range(0, n, cfg.batch_size):
            chunks.append(dict(scene_id=sample.image_id, url=sample.image, label=sample.mask or "", blob_dir=blob_dir,
                               crs=info.crs or "", transform=list(info.transform), height=info.height,
                               width=info.width, bands=info.count, vheight=vh, vwidth=vw, tile_start=start,
                               tile_stop=min(start + cfg.batch_size, n)))

    crss = {s.info.crs for s in scenes.values()} - {None}  # scenes without a CRS get no polygons beside others
    polygon_crs = None if not crss else next(iter(crss)) if len(crss) == 1 else MIXED_CRS
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    if instance:
        from segray.infer.scene_instances import merge_scene_instances

        stitch = ray.remote(merge_scene_instances).options(num_cpus=cfg.cpus_per_task, max_retries=1)
    else:
        stitch = ray.remote(stitch_scene).options(num_cpus=cfg.cpus_per_task, max_retries=1)

    def stitch_task(s: _Scene) -> dict[str, Any]:
        sid = s.sample.image_id
        poly = cfg.polygons and (s.info.crs is not None or polygon_crs is None)  # no CRS: only if none has one
        return dict(
            scene_id=sid, url=s.sample.image, label=s.sample.mask or "", height=s.info.height, width=s.info.width,
            vheight=s.vheight, vwidth=s.vwidth, crs=s.info.crs or "", transform=list(s.info.transform),
            blob_dir=join(work, "tiles", sid), tile_size=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend,
            margin=cfg.margin, block_size=cfg.block_size, num_classes=num_classes, class_names=names,
            mask_url=join(cfg.output, MASKS, f"{sid}.tif"),
            prob_url=join(cfg.output, PROBABILITIES, f"{sid}.tif") if cfg.write_probabilities else None,
            prob_dtype=cfg.probabilities_dtype, compress=cfg.compress, env=env,
            polygons_url=join(work, "polygons", f"{sid}.parquet") if poly else None,
            polygon_crs=polygon_crs, min_polygon_pixels=cfg.min_polygon_pixels,
            polygon_max_vertices=cfg.polygon_max_vertices,
            label_values=cfg.label_values, label_nodata=cfg.label_nodata, gdal_cache_mb=cfg.gdal_cache_mb,
            instance_url=join(cfg.output, INSTANCES, f"{sid}.tif") if instance and cfg.write_instances else None,
            merge_ios=cfg.merge_ios,
        )

    pending: dict[Any, str] = {}  # stitch future -> scene id
    results: dict[str, dict[str, Any]] = {}

    def collect(block: bool) -> None:
        while pending and (block or len(pending) >= cfg.max_stitch_tasks):
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                sid = pending.pop(ref)
                try:
                    results[sid] = ray.get(ref)
                except Exception as exc:  # the task itself died (e.g. out of memory)
                    results[sid] = {"status": "error", "error": f"stitch: {type(exc).__name__}: {exc}"}
                if on_progress:
                    on_progress(f"scene {sid}: {results[sid]['status']}")
            if not block:
                break

    def submit(sid: str) -> None:
        s = scenes[sid]
        if s.errors:
            results[sid] = {"status": "error", "error": f"{len(s.errors)} of {s.num_tiles} tiles failed: {s.errors[0]}"}
            return
        while len(pending) >= cfg.max_stitch_tasks:
            collect(block=False)
        pending[stitch.remote(stitch_task(s), cfg.storage)] = sid

    tile_writer = None
    if cfg.per_tile_rows:
        fs, path = _target(join(cfg.output, TILES), cfg.storage)
        tile_writer = pq.ParquetWriter(path, TILE_SCHEMA, filesystem=fs)
    num_tiles = 0
    try:
        if chunks:
            for batch in build_tile_dataset(cfg, chunks, payload, bands, env).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                if tile_writer is not None:
                    tile_writer.write_table(batch.cast(TILE_SCHEMA))
                num_tiles += batch.num_rows
                cols = batch.select(["scene_id", "status", "error", "read_ms", "predict_ms"]).to_pydict()
                for sid, status, error, rms, pms in zip(*cols.values()):
                    s = scenes[sid]
                    s.done += 1
                    s.tile_ms += rms + pms
                    if status != "ok":
                        s.errors.append(error or "tile failed")
                    if s.done == s.num_tiles:
                        submit(sid)
        tiles_wall = time.perf_counter() - t_start
        collect(block=True)
    finally:
        if tile_writer is not None:
            tile_writer.close()
    if not chunks:
        tiles_wall = time.perf_counter() - t_start

    # ---- scene rows
    num_polygons = 0
    for sid, s in scenes.items():
        r = results.get(sid, {"status": "error", "error": "tiles missing from the pipeline output"})
        info = s.info
        row = _scene_row(
            scene_id=sid, source_path=s.sample.image, label_path=s.sample.mask, status=r["status"], error=r.get("error"),
            height=info.height, width=info.width, bands=info.count, dtype=info.dtype, crs=info.crs,
            transform=list(info.transform), bounds=list(info.bounds), nodata=info.nodata, num_tiles=s.num_tiles,
            tile_errors=len(s.errors), model_name=model_cfg["name"], checkpoint_id=ckpt_id, tile_s=s.tile_ms / 1000,
            stitch_s=r.get("stitch_s"), has_ground_truth=False, num_instances=r.get("num_instances"),
        )
        if r["status"] == "ok":
            counts = np.asarray(r["class_pixels"], np.int64)
            total = info.height * info.width
            row.update(
                mask_path=join(cfg.output, MASKS, f"{sid}.tif"),
                probabilities_path=join(cfg.output, PROBABILITIES, f"{sid}.tif") if cfg.write_probabilities else None,
                num_polygons=r["num_polygons"], valid_fraction=r["valid_pixels"] / total,
                class_pixels=counts.tolist(), class_fractions=(counts / max(counts.sum(), 1)).tolist(),
                mean_confidence=r["mean_confidence"],
            )
            num_polygons += r["num_polygons"]
            if r["confusion"] is not None:
                k = metric_num_classes(num_classes)
                m = segmentation_metrics(torch.tensor(r["confusion"]).reshape(k, k), names)
                row.update(has_ground_truth=True, confusion=r["confusion"], pixel_accuracy=m["pixel_accuracy"],
                           miou=m["miou"], iou=[m[f"iou/{c}"] for c in names], dice=[m[f"dice/{c}"] for c in names])
        rows[sid] = row
    ordered = [rows[s.image_id] for s in samples if s.image_id in rows]
    fs, path = _target(join(cfg.output, SCENES), cfg.storage)
    pq.write_table(pa.Table.from_pylist(ordered, schema=SCENE_SCHEMA), path, filesystem=fs)

    # ---- polygons: one GeoParquet file, scene by scene (one scene's polygons in memory at a time)
    if cfg.polygons:
        bboxes = [results[s]["polygon_bbox"] for s in scenes if results.get(s, {}).get("polygon_bbox")]
        bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
                max(b[3] for b in bboxes)] if bboxes else None
        fs, path = _target(join(cfg.output, POLYGONS), cfg.storage)
        types = ("Polygon", "MultiPolygon") if instance else ("Polygon",)  # an instance may be in parts
        schema = (INSTANCE_POLYGON_SCHEMA if instance else POLYGON_SCHEMA).with_metadata(
            geoparquet_metadata(polygon_crs if scenes else None, bbox, types))
        with pq.ParquetWriter(path, schema, filesystem=fs) as writer:
            for sid in scenes:
                if results.get(sid, {}).get("num_polygons"):
                    wfs, wpath = pyarrow_fs(join(work, "polygons", f"{sid}.parquet"), cfg.storage)
                    with wfs.open_input_file(wpath) as f:  # row group by row group: bounded memory
                        part = pq.ParquetFile(f)
                        for i in range(part.num_row_groups):
                            writer.write_table(part.read_row_group(i).replace_schema_metadata(schema.metadata))
    if not cfg.keep_work and exists(work, cfg.storage):
        remove_tree(work, cfg.storage)

    wall = time.perf_counter() - t_start
    summary = summarize(cfg, ordered, names, num_classes, ckpt_id, model_cfg["name"], num_tiles, num_polygons, wall,
                        tiles_wall)
    fs, path = _target(join(cfg.output, SUMMARY), cfg.storage)
    pq.write_table(pa.Table.from_pylist([{k: ", ".join(v) if isinstance(v, list) else v for k, v in summary.items()}]),
                   path, filesystem=fs)
    return summary


def build_tile_dataset(cfg: SceneInferJobConfig, chunks: list[dict], payload: dict, bands: list[int] | None,
                       env: dict):
    """The lazy Ray Dataset of per-tile rows (``TILE_SCHEMA``); blobs are written as a side effect."""
    import ray
    from ray.data import ActorPoolStrategy

    # Several chunk rows per block: enough read tasks to feed every actor, few enough to stay cheap.
    num_blocks = max(1, min(len(chunks), max(cfg.num_actors * 4, math.ceil(len(chunks) / 4))))
    ds = ray.data.from_items(chunks, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        read_tiles,
        fn_kwargs={"tile_size": cfg.tile_size, "overlap": cfg.overlap, "bands": bands, "nodata": cfg.nodata, "env": env,
                   "gdal_cache_mb": cfg.gdal_cache_mb},
        batch_size=1,  # one chunk row -> batch_size tiles
        num_cpus=cfg.cpus_per_task,
    )
    actor = dict(compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
                 num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus_per_actor, runtime_env=model_runtime_env())
    ckpt = {"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size}
    if payload.get("task") == "instance":
        from segray.infer.scene_instances import TileInstances, write_tile_instances

        limits = {"score_threshold": cfg.score_threshold, "max_detections": cfg.max_detections,
                  "mask_threshold": cfg.mask_threshold}
        ds = ds.map_batches(TileInstances, fn_constructor_kwargs={**ckpt, **limits}, **actor)
        return ds.map_batches(write_tile_instances, fn_kwargs={"storage": cfg.storage}, batch_size=cfg.batch_size,
                              num_cpus=cfg.cpus_per_task)
    ds = ds.map_batches(TileProbabilities, fn_constructor_kwargs=ckpt, **actor)
    return ds.map_batches(
        write_tiles,
        fn_kwargs={"num_classes": int(payload["model_config"]["num_classes"]), "storage": cfg.storage,
                   "tile_stats": cfg.per_tile_rows, "label_values": cfg.label_values,
                   "label_nodata": cfg.label_nodata, "env": env, "gdal_cache_mb": cfg.gdal_cache_mb},
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_task,
    )


def summarize(cfg: SceneInferJobConfig, rows: list[dict], names: list[str], num_classes: int, ckpt_id: str,
              model_name: str, num_tiles: int, num_polygons: int, wall_s: float, tiles_wall_s: float) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    pixels = float(sum(r["height"] * r["width"] for r in ok))
    errors = [r["error"] for r in rows if r["status"] != "ok"]
    summary: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12],
        "output": cfg.output,
        "model_name": model_name,
        "checkpoint_id": ckpt_id,
        "num_scenes": len(rows),
        "num_ok": len(ok),
        "num_error": len(rows) - len(ok),
        "num_tiles": num_tiles,
        "num_polygons": num_polygons,
        "megapixels": pixels / 1e6,
        "wall_s": wall_s,
        "tiles_done_s": tiles_wall_s,  # since the start, when the last tile was written
        "stitch_s": float(sum(r["stitch_s"] or 0.0 for r in ok)),  # summed over scenes
        "megapixels_per_s": pixels / 1e6 / wall_s if wall_s else 0.0,
        "error_reasons": error_reasons(errors),
    }
    cms = [r["confusion"] for r in ok if r["confusion"] is not None]
    summary["num_with_ground_truth"] = len(cms)
    if cms:
        k = metric_num_classes(num_classes)
        summary.update(segmentation_metrics(torch.tensor(np.sum(cms, axis=0).reshape(k, k)), names))
    return summary


def summary_rows(s: dict[str, Any], class_names: list[str] | None = None) -> list[tuple[str, Any]]:
    keys = ("num_scenes", "num_ok", "num_error", "num_tiles", "num_polygons", "megapixels", "wall_s",
            "megapixels_per_s", "num_with_ground_truth", "miou", "pixel_accuracy", "mean_dice", "model_name",
            "checkpoint_id")
    rows = [(k, s[k]) for k in keys if k in s]
    if s.get("error_reasons"):
        rows.append(("error reasons", s["error_reasons"]))
    rows += [(f"IoU {c}", s[f"iou/{c}"]) for c in class_names or [] if f"iou/{c}" in s]
    rows.append(("output", s["output"]))
    return rows
