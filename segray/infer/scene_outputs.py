"""What a scenes run leaves under ``output`` (see ``scenes.py``), once its tiles are in: the
scene rows (scenes.parquet), polygons.parquet (GeoParquet, copied scene by scene from the work
area), the summary, and the commit that publishes them all (``_SUCCESS``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segray.config import SceneInferJobConfig
from segray.core.metrics import metric_num_classes, segmentation_metrics
from segray.core.scene_polygons import geoparquet_metadata
from segray.infer.scene_layout import (
    INSTANCES,
    MASKS,
    POLYGONS,
    PROBABILITIES,
    SCENE_SCHEMA,
    SCENES,
    SUMMARY,
    WORK,
    scene_raster,
    scene_row,
    target,
)
from segray.infer.scene_plan import PlannedScene, ScenesPlan, TileRun
from segray.infer.steps import error_reasons
from segray.infer.stac_items import write_stac_items
from segray.io.commit import folder_files
from segray.io.fs import exists, get_fs, join, pyarrow_fs, remove_tree


# --------------------------------------------------------------------------- writing a run's outputs


def write_outputs(plan: ScenesPlan, run: TileRun, t_start: float) -> dict[str, Any]:
    """scenes.parquet, polygons.parquet, summary.parquet; the work area removed; then the commit
    (``_SUCCESS``, listing every output file). Returns the summary."""
    cfg = plan.cfg
    ordered, num_polygons = write_scene_rows(plan, run)
    if cfg.polygons:
        write_polygons(plan, run.results)
    if cfg.stac_items or (cfg.stac_items is None and cfg.source.stac is not None):
        write_stac_items(cfg, plan.samples, ordered, plan.class_names)
    _remove_strays(plan, {r["scene_id"] for r in ordered if r["status"] == "ok"})
    wall = time.perf_counter() - t_start
    summary = summarize(cfg, ordered, plan.class_names, plan.num_classes, plan.ckpt.id, plan.model_name,
                        run.num_tiles, num_polygons, wall, run.tiles_wall_s)
    summary["num_resumed"] = len(plan.finished)
    fs, path = target(join(cfg.output, SUMMARY), cfg.storage)
    pq.write_table(pa.Table.from_pylist([summary]), path, filesystem=fs)
    if not cfg.keep_work and exists(plan.work, cfg.storage):
        remove_tree(plan.work, cfg.storage)
    plan.publication.commit(summary, exclude=(WORK,))
    return summary


def _remove_strays(plan: ScenesPlan, ok: set[str]) -> None:
    """Rasters of scenes that are not ok in this run (a killed attempt's, cut off mid-write) go:
    the commit lists every file under ``output``."""
    for folder in (MASKS, PROBABILITIES, INSTANCES):
        url = join(plan.cfg.output, folder)
        for name in folder_files(url, plan.cfg.storage):
            if name.removesuffix(".tif") not in ok:
                fs, path = get_fs(join(url, name), plan.cfg.storage)
                fs.rm(path)


def write_scene_rows(plan: ScenesPlan, run: TileRun) -> tuple[list[dict[str, Any]], int]:
    """scenes.parquet in listing order; returns its rows and the number of polygons."""
    rows = dict(plan.rows)  # scenes refused at planning
    num_polygons = 0
    for sid, s in plan.scenes.items():
        r = run.results.get(sid, {"status": "error", "error": "tiles missing from the pipeline output"})
        rows[sid] = _result_row(plan, s, run, r)
        if r["status"] == "ok":
            num_polygons += r["num_polygons"]
    ordered = [rows[s.image_id] for s in plan.samples if s.image_id in rows]
    fs, path = target(join(plan.cfg.output, SCENES), plan.cfg.storage)
    pq.write_table(pa.Table.from_pylist(ordered, schema=SCENE_SCHEMA), path, filesystem=fs)
    return ordered, num_polygons


def _result_row(plan: ScenesPlan, s: PlannedScene, run: TileRun, r: dict[str, Any]) -> dict[str, Any]:
    info, tally = s.info, run.tallies[s.scene_id]
    row = scene_row(
        scene_id=s.scene_id, source_path=s.sample.source_path, label_path=s.sample.mask, status=r["status"],
        error=r.get("error"), height=info.height, width=info.width, bands=info.count, dtype=info.dtype,
        crs=info.crs, transform=list(info.transform), bounds=list(info.bounds), nodata=info.nodata,
        num_tiles=s.num_tiles, tile_errors=len(tally.errors), model_name=plan.model_name,
        checkpoint_id=plan.ckpt.id, tile_s=tally.tile_ms / 1000, stitch_s=r.get("stitch_s"), has_ground_truth=False,
        num_instances=r.get("num_instances"),
    )
    if r["status"] != "ok":
        return row
    cfg, counts = plan.cfg, np.asarray(r["class_pixels"], np.int64)
    row.update(
        mask_path=scene_raster(cfg, MASKS, s.scene_id),
        probabilities_path=scene_raster(cfg, PROBABILITIES, s.scene_id) if cfg.write_probabilities else None,
        num_polygons=r["num_polygons"], valid_fraction=r["valid_pixels"] / (info.height * info.width),
        class_pixels=counts.tolist(), class_fractions=(counts / max(counts.sum(), 1)).tolist(),
        mean_confidence=r["mean_confidence"],
    )
    if r["confusion"] is not None:
        names = plan.class_names
        k = metric_num_classes(plan.num_classes)
        m = segmentation_metrics(torch.tensor(r["confusion"]).reshape(k, k), names)
        row.update(has_ground_truth=True, confusion=r["confusion"], pixel_accuracy=m["pixel_accuracy"],
                   miou=m["miou"], iou=[m[f"iou/{c}"] for c in names], dice=[m[f"dice/{c}"] for c in names])
    return row


def write_polygons(plan: ScenesPlan, results: dict[str, dict[str, Any]]) -> None:
    """One GeoParquet file, scene by scene (one scene's polygons in memory at a time)."""
    cfg, scenes, family = plan.cfg, plan.scenes, plan.family
    bboxes = [results[s]["polygon_bbox"] for s in scenes if results.get(s, {}).get("polygon_bbox")]
    bbox = [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes),
            max(b[3] for b in bboxes)] if bboxes else None
    fs, path = target(join(cfg.output, POLYGONS), cfg.storage)
    schema = family.polygon_schema.with_metadata(
        geoparquet_metadata(plan.polygon_crs if scenes else None, bbox, family.polygon_types))
    with pq.ParquetWriter(path, schema, filesystem=fs) as writer:
        for sid in scenes:
            if not results.get(sid, {}).get("num_polygons"):
                continue
            for url in results[sid].get("polygon_parts") or [plan.polygon_part(sid)]:  # bands' pieces, in order
                wfs, wpath = pyarrow_fs(url, cfg.storage)
                with wfs.open_input_file(wpath) as f:  # row group by row group: bounded memory
                    part = pq.ParquetFile(f)
                    for i in range(part.num_row_groups):
                        writer.write_table(part.read_row_group(i).replace_schema_metadata(schema.metadata))


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
