"""Instance (Mask R-CNN) scenes: the same tiles and reads as ``scene_steps``, with per-tile
instances instead of per-tile probabilities, merged per scene across tile borders.

1. ``TileInstances`` (actor): per tile, the checkpoint's detections (label, score, RLE mask in
   tile pixels); nodata pixels are set to the band mean before the model.
2. ``write_tile_instances``: one small JSON blob per tile (detections + the tile's valid mask).
3. ``merge_scene_instances`` (one task per scene): every detection becomes a mask crop in scene
   pixels (nodata removed); in decreasing score, a detection that overlaps an already kept one
   of the same class *from another tile* by ``intersection / smaller area >= merge_ios`` joins it
   (union of the masks, the higher score): an object cut by a tile edge and seen whole by the
   neighbour comes out once, whole. Detections of one tile are never merged with each other
   (the model's own NMS decided those). Then the scene is written block by block: an instance-id
   COG (uint32, 0 = none), a class-map COG (uint8, nodata 255), one polygon per instance.

Memory: a scene's instances (mask crops) are held while merging, so it follows the number and
size of objects, not the scene's area; blocks are painted one at a time.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

from segray.config import SceneInferJobConfig, StorageOptions
from segray.core.polygons import mask_to_polygons
from segray.core.scene_polygons import BBOX_FIELDS, POLYGON_SCHEMA
from segray.core.tiling import Tile, Window, blocks
from segray.infer.scene_family import SceneFamily
from segray.infer.scene_grid import MASK_NODATA, TileIndex, ensure_parent, grid_tiles
from segray.infer.scene_steps import TILE_SCHEMA, tile_row
from segray.io.fs import join, pyarrow_fs, read_bytes, write_bytes
from segray.io.raster import CogBlockWriter, limit_gdal_cache

INSTANCE_NODATA = np.iinfo(np.uint32).max
INSTANCE_POLYGON_SCHEMA = POLYGON_SCHEMA.append(pa.field("instance_id", pa.int64()))


# --------------------------------------------------------------------------- 1-2. predict, write


class TileInstances:
    """Mask R-CNN detections per tile (``instances`` column: JSON text, tile pixel coordinates)."""

    def __init__(self, checkpoint: str, storage: StorageOptions | None = None, device: str | None = None,
                 max_batch: int = 8, score_threshold: float | None = None, max_detections: int | None = None,
                 mask_threshold: float | None = None) -> None:
        from segray.infer.instance import InstancePredictor

        self.predictor = InstancePredictor(checkpoint, storage, device, max_batch=max_batch,
                                           score_threshold=score_threshold, max_detections=max_detections,
                                           mask_threshold=mask_threshold)
        self.mean = self.predictor.mean.numpy()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        status, error, todo = self.predictor.usable(batch, what="tile")
        # the job's tile type (read_tiles: often the files' integers) -> float32, nodata -> band mean
        images = [np.where(np.asarray(batch["valid"][i], bool), batch["pixels"][i], self.mean).astype(np.float32)
                  for i in todo]
        texts = [""] * len(status)
        for i, p in zip(todo, self.predictor.predict(images)):
            texts[i] = json.dumps({"labels": p["labels"].tolist(), "scores": np.round(p["scores"], 5).tolist(),
                                   "counts": [r["counts"] for r in p["rles"]]}, separators=(",", ":"))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        ms = (time.perf_counter() - t0) * 1000 / max(len(status), 1)
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
                   instances=np.array(texts, dtype=object), predict_ms=np.full(len(status), ms))
        return out


def instance_blob_url(blob_dir: str, tile_index: int) -> str:
    return join(blob_dir, f"{tile_index:07d}.json")


def write_tile_instances(batch: dict[str, Any], storage: StorageOptions | None = None) -> pa.Table:
    """Detections + valid mask -> one JSON blob per tile; rows of ``TILE_SCHEMA`` (no class stats)."""
    from segray.core.instances import encode_rle

    rows: dict[str, list] = {f.name: [] for f in TILE_SCHEMA}
    for i in range(len(batch["status"])):
        status, error = str(batch["status"][i]), str(batch["error"][i] or "")
        idx = int(batch["tile_index"][i])
        url = instance_blob_url(str(batch["blob_dir"][i]), idx)
        if status == "ok":
            try:
                blob = json.loads(batch["instances"][i])
                blob["valid"] = encode_rle(np.asarray(batch["valid"][i], np.uint8))["counts"]
                write_bytes(url, json.dumps(blob, separators=(",", ":")).encode(), storage)
            except Exception as exc:
                status, error = "error", f"write: {type(exc).__name__}: {exc}"
        for key, v in tile_row(batch, i, status, error).items():
            rows[key].append(v)
        for key in ("valid_fraction", "class_pixels", "class_fractions", "mean_confidence", "confusion"):
            rows[key].append(None)
        rows["has_ground_truth"].append(False)
        rows["blob"].append(url if status == "ok" else None)
        rows["read_ms"].append(float(batch["read_ms"][i]))
        rows["predict_ms"].append(float(batch["predict_ms"][i]))
    return pa.Table.from_pydict(rows, schema=TILE_SCHEMA)


# --------------------------------------------------------------------------- 3. merge


@dataclass
class SceneInstance:
    """A mask crop in scene pixels: ``mask[r - row_off, c - col_off]``."""

    label: int
    score: float
    row_off: int
    col_off: int
    mask: np.ndarray  # bool [h, w], tight around the pixels
    tiles: set = field(default_factory=set)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.row_off, self.col_off, self.row_off + self.mask.shape[0], self.col_off + self.mask.shape[1]

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())


def crop(mask: np.ndarray, row_off: int, col_off: int) -> tuple[int, int, np.ndarray] | None:
    """Tight crop of a boolean mask: (row_off, col_off, crop), None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return row_off + int(rows[0]), col_off + int(cols[0]), mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _overlap(a: SceneInstance, b: SceneInstance) -> int:
    r0, c0 = max(a.row_off, b.row_off), max(a.col_off, b.col_off)
    r1, c1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if r1 <= r0 or c1 <= c0:
        return 0
    sa = a.mask[r0 - a.row_off : r1 - a.row_off, c0 - a.col_off : c1 - a.col_off]
    sb = b.mask[r0 - b.row_off : r1 - b.row_off, c0 - b.col_off : c1 - b.col_off]
    return int((sa & sb).sum())


def _union(a: SceneInstance, b: SceneInstance) -> SceneInstance:
    r0, c0 = min(a.row_off, b.row_off), min(a.col_off, b.col_off)
    r1, c1 = max(a.box[2], b.box[2]), max(a.box[3], b.box[3])
    m = np.zeros((r1 - r0, c1 - c0), bool)
    for x in (a, b):
        m[x.row_off - r0 : x.box[2] - r0, x.col_off - c0 : x.box[3] - c0] |= x.mask
    return SceneInstance(a.label, max(a.score, b.score), r0, c0, m, a.tiles | b.tiles)


def merge_instances(instances: list[SceneInstance], merge_ios: float = 0.5, cell: int = 256) -> list[SceneInstance]:
    """Greedy merge across tiles by intersection over the smaller mask (see the module doc)."""
    kept: list[SceneInstance | None] = []
    grid: dict[tuple[int, int], set[int]] = {}

    def cells(box):
        r0, c0, r1, c1 = box
        return [(i, j) for i in range(r0 // cell, (r1 - 1) // cell + 1) for j in range(c0 // cell, (c1 - 1) // cell + 1)]

    for inst in sorted(instances, key=lambda x: -x.score):
        near = {k for key in cells(inst.box) for k in grid.get(key, ())}
        best, best_ios = None, 0.0
        for k in sorted(near):
            other = kept[k]
            if other is None or other.label != inst.label or other.tiles & inst.tiles:
                continue
            inter = _overlap(inst, other)
            ios = inter / max(min(inst.pixels, other.pixels), 1)
            if ios > best_ios:
                best, best_ios = k, ios
        if best is not None and best_ios >= merge_ios:
            merged = _union(kept[best], inst)  # type: ignore[arg-type]
            for key in cells(kept[best].box):  # type: ignore[union-attr]
                grid.get(key, set()).discard(best)
            kept[best] = merged
            idx = best
        else:
            kept.append(inst)
            idx = len(kept) - 1
        for key in cells(kept[idx].box):  # type: ignore[union-attr]
            grid.setdefault(key, set()).add(idx)
    return [k for k in kept if k is not None]


def load_scene_instances(task: dict[str, Any], storage: StorageOptions | None) -> tuple[list[SceneInstance], list]:
    """Every tile's detections as scene-pixel crops (nodata and outside-scene pixels removed)."""
    from segray.core.instances import decode_rle

    h, w = int(task["height"]), int(task["width"])
    tiles = grid_tiles(int(task["vheight"]), int(task["vwidth"]), int(task["tile_size"]), int(task["overlap"]))
    out: list[SceneInstance] = []
    valids = []
    for i, t in enumerate(tiles):
        blob = json.loads(read_bytes(instance_blob_url(task["blob_dir"], i), storage))
        size = [t.height, t.width]
        valid = decode_rle({"size": size, "counts": blob["valid"]}).astype(bool)
        valid[max(h - t.row_off, 0) :, :] = False  # beyond the scene (virtual extent)
        valid[:, max(w - t.col_off, 0) :] = False
        valids.append(valid)
        for label, score, counts in zip(blob["labels"], blob["scores"], blob["counts"]):
            got = crop(decode_rle({"size": size, "counts": counts}).astype(bool) & valid, t.row_off, t.col_off)
            if got is not None:
                out.append(SceneInstance(int(label), float(score), got[0], got[1], got[2], {i}))
    return out, valids


def merge_scene_instances(task: dict[str, Any], storage: StorageOptions | None = None) -> dict[str, Any]:
    """The instance counterpart of ``scene_steps.stitch_scene``; never raises."""
    t0 = time.perf_counter()
    limit_gdal_cache(task.get("gdal_cache_mb"))
    result: dict[str, Any] = {"scene_id": task["scene_id"], "status": "ok", "error": None, "num_polygons": 0,
                              "polygon_bbox": None, "confusion": None}
    try:
        result.update(_merge_and_write(task, storage))
    except Exception as exc:
        result.update(status="error", error=f"merge: {type(exc).__name__}: {exc}")
    result["stitch_s"] = time.perf_counter() - t0
    return result


def _paint(window: Window, instances: list[SceneInstance], ids: list[int], valid: np.ndarray,
           num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    r0, c0, h, w = window
    inst_map = np.zeros((h, w), np.uint32)
    cls_map = np.zeros((h, w), np.uint8)
    for k in sorted(ids, key=lambda k: instances[k].score):  # higher scores painted last: they win
        x = instances[k]
        rr0, cc0 = max(x.row_off, r0), max(x.col_off, c0)
        rr1, cc1 = min(x.box[2], r0 + h), min(x.box[3], c0 + w)
        if rr1 <= rr0 or cc1 <= cc0:
            continue
        m = x.mask[rr0 - x.row_off : rr1 - x.row_off, cc0 - x.col_off : cc1 - x.col_off]
        dst = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
        inst_map[dst][m] = k + 1
        cls_map[dst][m] = x.label
    inst_map[~valid] = INSTANCE_NODATA
    cls_map[~valid] = MASK_NODATA
    return inst_map, cls_map


def _box_grid(instances: list[SceneInstance], cell: int) -> dict[tuple[int, int], list[int]]:
    """Which instances' boxes touch each ``cell`` x ``cell`` square of the scene."""
    grid: dict[tuple[int, int], list[int]] = {}
    for n, x in enumerate(instances):
        r0, c0, r1, c1 = x.box
        for i in range(r0 // cell, (r1 - 1) // cell + 1):
            for j in range(c0 // cell, (c1 - 1) // cell + 1):
                grid.setdefault((i, j), []).append(n)
    return grid


def _block_valid(win: Window, tiles: tuple[Tile, ...], index: TileIndex, valids: list) -> np.ndarray:
    r0, c0, bh, bw = win
    valid = np.zeros((bh, bw), bool)
    for i in index.touching(win):  # every tile covering a pixel agrees on its validity
        t = tiles[i]
        rr0, cc0 = max(t.row_off, r0), max(t.col_off, c0)
        rr1, cc1 = min(t.row_off + t.height, r0 + bh), min(t.col_off + t.width, c0 + bw)
        valid[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = valids[i][rr0 - t.row_off : rr1 - t.row_off,
                                                                   cc0 - t.col_off : cc1 - t.col_off]
    return valid


def _write_rasters(task: dict[str, Any], merged: list[SceneInstance], tiles: tuple[Tile, ...], valids: list,
                   k: int) -> np.ndarray:
    """The class-map COG (and the instance-id COG) block by block; returns the class pixel counts."""
    h, w, bs = int(task["height"]), int(task["width"]), int(task["block_size"])
    index = TileIndex(tiles)
    cell = 256
    grid = _box_grid(merged, cell)
    counts = np.zeros(k, np.int64)
    for url in (task["mask_url"], task.get("instance_url")):
        if url:
            ensure_parent(url)
    cog = dict(crs=task["crs"] or None, transform=task["transform"], blocksize=bs,
               compress=task.get("compress", "deflate"), env=task.get("env"))
    with ExitStack() as stack:
        cls_w = stack.enter_context(CogBlockWriter(task["mask_url"], h, w, 1, "uint8", nodata=MASK_NODATA, **cog))
        inst_w = stack.enter_context(CogBlockWriter(task["instance_url"], h, w, 1, "uint32", nodata=INSTANCE_NODATA,
                                                    **cog)) if task.get("instance_url") else None
        for win in blocks(h, w, bs):
            r0, c0, bh, bw = win
            valid = _block_valid(win, tiles, index, valids)
            ids = sorted({n for i in range(r0 // cell, (r0 + bh - 1) // cell + 1)
                          for j in range(c0 // cell, (c0 + bw - 1) // cell + 1) for n in grid.get((i, j), ())})
            inst_map, cls_map = _paint(win, merged, ids, valid, k)
            cls_w.write(win, cls_map)
            if inst_w is not None:
                inst_w.write(win, inst_map)
            counts += np.bincount(cls_map[valid], minlength=k)[:k]
    return counts


def _instance_geometries(merged: list[SceneInstance], transform) -> tuple[list, list[int]]:
    """One polygon (or multipolygon) per instance, in map coordinates; the indices of those with one."""
    geoms, keep = [], []
    for n, x in enumerate(merged):
        parts = [g for g, _ in mask_to_polygons(x.mask.astype(np.uint8), transform, offset=(x.row_off, x.col_off))]
        if parts:
            geoms.append(shapely.union_all(parts) if len(parts) > 1 else parts[0])
            keep.append(n)
    return geoms, keep


def _write_polygons(task: dict[str, Any], merged: list[SceneInstance], storage: StorageOptions | None,
                    names: list[str]) -> dict[str, Any]:
    """``polygons_url``: one row per instance (``INSTANCE_POLYGON_SCHEMA``) in ``polygon_crs``."""
    import pyarrow.parquet as pq

    from segray.core.scene_polygons import reproject

    geoms, keep = _instance_geometries(merged, task["transform"])
    arr = np.array(geoms, dtype=object)
    area = shapely.area(arr) if len(arr) else np.zeros(0)
    src, dst = task["crs"] or None, task.get("polygon_crs")
    if src and dst:
        from rasterio.crs import CRS

        if CRS.from_user_input(src) != CRS.from_user_input(dst):
            arr = reproject(arr, src, dst)
    bounds = shapely.bounds(arr).reshape(-1, 4) if len(arr) else np.zeros((0, 4))
    sel = [merged[n] for n in keep]
    table = pa.table({
        "geometry": pa.array(shapely.to_wkb(arr, flavor="iso") if len(arr) else [], pa.binary()),
        "bbox": pa.StructArray.from_arrays([pa.array(bounds[:, i], pa.float64()) for i in range(4)], BBOX_FIELDS),
        "scene_id": pa.array([task["scene_id"]] * len(sel), pa.string()),
        "class_id": pa.array([x.label for x in sel], pa.int32()),
        "class_name": pa.array([names[x.label] if x.label < len(names) else str(x.label) for x in sel], pa.string()),
        "score": pa.array([x.score for x in sel], pa.float64()),
        "pixels": pa.array([x.pixels for x in sel], pa.int64()),
        "area": pa.array(np.asarray(area, np.float64), pa.float64()),
        "whole": pa.array([True] * len(sel), pa.bool_()),
        "instance_id": pa.array([n + 1 for n in keep], pa.int64()),
    }, schema=INSTANCE_POLYGON_SCHEMA)
    fs, path = pyarrow_fs(task["polygons_url"], storage)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)
    out: dict[str, Any] = {"num_polygons": table.num_rows}
    if len(arr):
        out["polygon_bbox"] = [*bounds[:, :2].min(axis=0).tolist(), *bounds[:, 2:].max(axis=0).tolist()]
    return out


def _merge_and_write(task: dict[str, Any], storage: StorageOptions | None) -> dict[str, Any]:
    k = max(int(task["num_classes"]), 2)
    raw, valids = load_scene_instances(task, storage)
    merged = merge_instances(raw, float(task.get("merge_ios", 0.5)))
    merged = [m for m in merged if m.pixels >= int(task.get("min_polygon_pixels", 0))]
    tiles = grid_tiles(int(task["vheight"]), int(task["vwidth"]), int(task["tile_size"]), int(task["overlap"]))
    counts = _write_rasters(task, merged, tiles, valids, k)
    result: dict[str, Any] = {"class_pixels": counts.tolist(), "valid_pixels": int(counts.sum()),
                              "mean_confidence": float(np.mean([x.score for x in merged])) if merged else None,
                              "num_instances": len(merged), "num_detections": len(raw), "num_tiles": len(tiles)}
    if task.get("polygons_url"):
        result.update(_write_polygons(task, merged, storage, list(task["class_names"])))
    return result


# --------------------------------------------------------------------------- the instance family


def _limits(cfg: SceneInferJobConfig) -> dict[str, Any]:
    return {"score_threshold": cfg.score_threshold, "max_detections": cfg.max_detections,
            "mask_threshold": cfg.mask_threshold}


INSTANCE_SCENES = SceneFamily(
    name="instance",
    predictor=TileInstances,
    predictor_kwargs=_limits,
    write_tiles=write_tile_instances,
    write_kwargs=lambda cfg, ckpt, env: {"storage": cfg.storage},
    stitch=merge_scene_instances,
    polygon_schema=INSTANCE_POLYGON_SCHEMA,
    polygon_types=("Polygon", "MultiPolygon"),  # an instance may be in parts
    instance_rasters=True,
    no_probabilities="instance checkpoints give instances, not class probabilities",
    no_tta="test-time augmentation averages semantic logits; instance checkpoints give detections",
)
