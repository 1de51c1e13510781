"""The steps of scene segmentation as plain functions (no Ray here; ``scenes.py`` wires them).

A scene is never held whole by any step:

1. ``read_tiles``: a *chunk row* (one scene, a range of tile indices) -> one row per tile with
   its pixels, read windowed with rasterio (``[C, T, T]`` in the job's one type: the scenes' own
   8- or 16-bit integers, else float32; the actor converts) and a ``valid`` mask.
2. ``TileProbabilities`` (actor): per-tile class probabilities, ``float16 [K, T, T]``
   (``K = 1`` for a one-logit binary model, else one channel per class). Nodata pixels are
   replaced by the band mean before normalisation, so they do not disturb their neighbours.
3. ``write_tiles``: each tile's probabilities (NaN where the input is nodata) become one
   ``.npy`` blob in the work area; the row keeps only small per-tile statistics.
4. ``stitch_band`` (one task per row band, in ``scene_stitch``, submitted as soon as the band's
   tiles are in): blends the tile blobs block by block into the band's pieces, statistics and
   polygons; ``scene_bands.assemble`` (one task per scene) makes the COGs with GDAL and joins
   the polygons across band borders.

The tile grid (virtual extent, ``grid_tiles``, ``TileIndex``, blob names) is ``scene_grid``;
its names are importable from here too. ``SEMANTIC_SCENES`` bundles steps 2-4 for the
semantic family. For an instance (Mask R-CNN) checkpoint the same rows and reads apply;
steps 2-4 become ``scene_instances`` (per-tile detections, merged per scene across tile borders).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segray.config import SceneInferJobConfig, StorageOptions
from segray.core.metrics import confusion_matrix, metric_num_classes
from segray.core.scene_polygons import POLYGON_SCHEMA
from segray.core.tiling import Tile, Window
from segray.infer.scene_family import SceneFamily
from segray.infer.scene_grid import blob_url, class_map, grid_tiles
from segray.infer.scene_bands import assemble_refs, stitch_scene
from segray.infer.scene_stitch import stitch_band
from segray.infer.steps import Predictor, same_shape_chunks
from segray.infer.tile_blobs import tile_blobs
from segray.io.fs import write_bytes
from segray.io.raster import limit_gdal_cache, read_window, remap_labels

__all__ = ["SEMANTIC_SCENES", "TILE_SCHEMA", "TileProbabilities", "model_align", "read_tiles", "tile_row",
           "write_tiles"]


def model_align(model_config: dict) -> int:
    """The factor tile offsets must be multiples of for pooling grids to line up (the registry's align)."""
    from segray.core.models import tile_align

    return tile_align(model_config)


# --------------------------------------------------------------------------- 1. read


def _placeholder(bands: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((max(bands, 1), 1, 1), dtype), np.zeros((1, 1), np.uint8)


def read_tiles(
    batch: dict[str, Any],
    tile_size: int,
    overlap: int,
    bands: list[int] | None = None,
    nodata: float | None = None,
    env: dict | None = None,
    gdal_cache_mb: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Chunk rows (scene fields + ``tile_start``/``tile_stop``) -> one row per tile with pixels.

    ``bands`` are 1-based (GDAL). Pixels are ``dtype``, the job's one type
    (:func:`segray.io.raster.tile_dtype`). A tile that cannot be read becomes an error row.
    """
    limit_gdal_cache(gdal_cache_mb)
    out: dict[str, list] = {k: [] for k in (
        "scene_id", "url", "label", "blob_dir", "crs", "transform", "height", "width", "tile_index",
        "row_off", "col_off", "tile_height", "tile_width", "core_row_off", "core_col_off", "core_height",
        "core_width", "pixels", "valid", "status", "error", "read_ms")}  # fmt: skip
    for i in range(len(batch["scene_id"])):
        tiles = grid_tiles(int(batch["vheight"][i]), int(batch["vwidth"][i]), tile_size, overlap)
        h, w = int(batch["height"][i]), int(batch["width"][i])
        nbands = len(bands) if bands else int(batch["bands"][i])
        for j in range(int(batch["tile_start"][i]), int(batch["tile_stop"][i])):
            t0 = time.perf_counter()
            tile = tiles[j]
            status, error = "ok", ""
            try:
                pixels, valid = read_window(str(batch["url"][i]), tile.window, bands=bands, nodata=nodata, env=env,
                                            dtype=dtype)
                valid = valid.astype(np.uint8)
            except Exception as exc:  # a bad read is an error row; the scene is reported, the job goes on
                (pixels, valid), status = _placeholder(nbands, dtype), "error"
                error = f"read: {type(exc).__name__}: {exc}"
            # the core, clipped to the real scene (cores partition the virtual extent)
            r0, c0 = tile.core_row_off, tile.core_col_off
            r1, c1 = min(r0 + tile.core_height, h), min(c0 + tile.core_width, w)
            for key in ("scene_id", "url", "label", "blob_dir", "crs"):
                out[key].append(batch[key][i])
            out["transform"].append(np.asarray(batch["transform"][i], np.float64))
            out["height"].append(h)
            out["width"].append(w)
            out["tile_index"].append(j)
            out["row_off"].append(tile.row_off)
            out["col_off"].append(tile.col_off)
            out["tile_height"].append(tile.height)
            out["tile_width"].append(tile.width)
            out["core_row_off"].append(r0)
            out["core_col_off"].append(c0)
            out["core_height"].append(max(r1 - r0, 0))
            out["core_width"].append(max(c1 - c0, 0))
            out["pixels"].append(pixels)
            out["valid"].append(valid)
            out["status"].append(status)
            out["error"].append(error)
            out["read_ms"].append((time.perf_counter() - t0) * 1000)
    return out


# --------------------------------------------------------------------------- 2. predict


class TileProbabilities(Predictor):
    """The checkpoint's model as per-tile class probabilities (``float16 [K, h, w]``)."""

    def __init__(self, checkpoint: str, storage: StorageOptions | None = None, device: str | None = None,
                 amp: bool = True, max_batch: int = 8, tta: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(checkpoint, storage, device, amp, max_batch, tta=tta)
        self.channels = self.model_cfg.num_classes  # 1 = binary (sigmoid), else softmax over classes

    @torch.inference_mode()
    def probabilities(self, images: list[np.ndarray], valid: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Same-shape tiles go through the model together; nodata pixels are set to the band mean."""
        results: list[np.ndarray | None] = [None] * len(images)
        for chunk in same_shape_chunks(images, self.max_batch):
            x = torch.from_numpy(np.stack([images[i] for i in chunk]).astype(np.float32, copy=False))
            if valid is not None:
                ok = torch.from_numpy(np.stack([np.asarray(valid[i], bool) for i in chunk]))[:, None]
                x = torch.where(ok, x, self.mean)
            logits = self.logits(x)  # the runtime normalises; TTA (core.tta) when configured
            probs = torch.sigmoid(logits) if self.channels == 1 else torch.softmax(logits, dim=1)
            probs = probs.to(torch.float16).cpu().numpy()
            for j, i in enumerate(chunk):
                results[i] = probs[j]
        return results  # type: ignore[return-value]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        status, error, todo = self.usable(batch, what="tile")
        probs: list[np.ndarray] = [np.zeros((self.channels, 1, 1), np.float16)] * len(status)
        got = self.probabilities([batch["pixels"][i] for i in todo], [batch["valid"][i] for i in todo])
        for i, p in zip(todo, got):
            probs[i] = p
        out = {k: v for k, v in batch.items() if k != "pixels"}  # drop pixels early: memory
        ms = (time.perf_counter() - t0) * 1000 / max(len(status), 1)
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object), probs=probs,
                   predict_ms=np.full(len(status), ms))
        return out


# --------------------------------------------------------------------------- 3. write tiles

TILE_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("tile_index", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("row_off", pa.int32()),
        ("col_off", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("core_row_off", pa.int32()),
        ("core_col_off", pa.int32()),
        ("core_height", pa.int32()),
        ("core_width", pa.int32()),
        ("crs", pa.string()),
        ("transform", pa.list_(pa.float64())),  # of the tile window
        ("bounds", pa.list_(pa.float64())),  # of the core: left, bottom, right, top
        ("valid_fraction", pa.float64()),  # of the core
        ("class_pixels", pa.list_(pa.int64())),  # of the core, valid pixels only
        ("class_fractions", pa.list_(pa.float64())),
        ("mean_confidence", pa.float64()),
        ("has_ground_truth", pa.bool_()),
        ("confusion", pa.list_(pa.int64())),  # of the core
        ("blob", pa.string()),
        ("read_ms", pa.float64()),
        ("predict_ms", pa.float64()),
    ]
)


def _bounds(transform, window: Window) -> list[float]:
    a, b, c, d, e, f = tuple(transform)[:6]
    r, col, h, w = window
    xs = [a * x + b * y + c for x, y in ((col, r), (col + w, r), (col, r + h), (col + w, r + h))]
    ys = [d * x + e * y + f for x, y in ((col, r), (col + w, r), (col, r + h), (col + w, r + h))]
    return [min(xs), min(ys), max(xs), max(ys)]


def tile_row(batch: dict[str, Any], i: int, status: str, error: str | None) -> dict[str, Any]:
    """A ``TILE_SCHEMA`` row's identity and place: the tile's window, its core, and the core's
    CRS, transform and bounds in map coordinates (the tile's own transform, shifted)."""
    tr, tc = int(batch["row_off"][i]), int(batch["col_off"][i])
    core = (int(batch["core_row_off"][i]), int(batch["core_col_off"][i]),
            int(batch["core_height"][i]), int(batch["core_width"][i]))
    a, b, c, d, e, f = transform = [float(v) for v in batch["transform"][i]]
    return {"scene_id": str(batch["scene_id"][i]), "tile_index": int(batch["tile_index"][i]), "status": status,
            "error": error or None, "row_off": tr, "col_off": tc, "height": int(batch["tile_height"][i]),
            "width": int(batch["tile_width"][i]), "core_row_off": core[0], "core_col_off": core[1],
            "core_height": core[2], "core_width": core[3], "crs": str(batch["crs"][i]) or None,
            "transform": [a, b, a * tc + b * tr + c, d, e, d * tc + e * tr + f], "bounds": _bounds(transform, core)}


def _core_stats(probs: np.ndarray, valid: np.ndarray, tile: Tile, k: int, label: str, label_values,
                label_nodata, env) -> dict[str, Any]:
    """A tile core's class counts, confidence and (with ground truth) confusion matrix."""
    pred, conf = class_map(probs[(slice(None), *tile.core_slices)].astype(np.float32))
    ok = valid[tile.core_slices]
    counts = np.bincount(pred[ok], minlength=k)
    stats = dict(valid_fraction=float(ok.mean()), class_pixels=counts.tolist(),
                 class_fractions=(counts / max(counts.sum(), 1)).tolist(),
                 mean_confidence=float(conf[ok].mean()) if ok.any() else None, confusion=None)
    if label:
        lab, lab_ok = read_window(label, tile.core, bands=[1], nodata=label_nodata, env=env)
        keep = ok & lab_ok
        cm = confusion_matrix(torch.from_numpy(pred[keep]), torch.from_numpy(remap_labels(lab[0][keep], label_values)), k)
        stats["confusion"] = cm.flatten().tolist()
    return stats


def write_tiles(
    batch: dict[str, Any],
    num_classes: int,
    storage: StorageOptions | None = None,
    tile_stats: bool = False,
    label_values: dict[int, int] | None = None,
    label_nodata: int | None = None,
    env: dict | None = None,
    gdal_cache_mb: int | None = None,
    blend: str = "cosine",
    probabilities: str | None = None,
) -> pa.Table:
    """Probabilities -> one blob per tile (``tile_blobs``: the whole tile's probabilities, or its
    core's class map when ``blend`` is "core"; ``probabilities``: the dtype they are written in,
    None when not written); rows of ``TILE_SCHEMA``.

    With ``tile_stats``, each row also gets its core's class counts, confidence and, when the
    scene has ground truth, its confusion matrix (read windowed from the label raster).
    """
    limit_gdal_cache(gdal_cache_mb)
    k = metric_num_classes(num_classes)
    blobs = tile_blobs({"blend": blend, "prob_url": probabilities is not None, "prob_dtype": probabilities})
    rows: dict[str, list] = {f.name: [] for f in TILE_SCHEMA}
    for i in range(len(batch["status"])):
        status, error = str(batch["status"][i]), str(batch["error"][i] or "")
        tile_index = int(batch["tile_index"][i])
        url = blob_url(str(batch["blob_dir"][i]), tile_index, blobs.ext)
        r0, c0 = int(batch["core_row_off"][i]), int(batch["core_col_off"][i])
        ch, cw = int(batch["core_height"][i]), int(batch["core_width"][i])
        tr, tc = int(batch["row_off"][i]), int(batch["col_off"][i])
        stats: dict[str, Any] = dict.fromkeys(("valid_fraction", "class_pixels", "class_fractions",
                                               "mean_confidence", "confusion"))
        has_gt = False
        if status == "ok":
            try:
                probs, valid = np.asarray(batch["probs"][i], np.float16), np.asarray(batch["valid"][i], bool)
                place = Tile(tr, tc, int(batch["tile_height"][i]), int(batch["tile_width"][i]), r0, c0, ch, cw)
                write_bytes(url, blobs.encode(probs, valid, place), storage)
                if tile_stats and ch and cw:
                    stats.update(_core_stats(probs, valid, place, k, str(batch["label"][i] or ""), label_values,
                                             label_nodata, env))
                    has_gt = stats["confusion"] is not None
            except Exception as exc:
                status, error = "error", f"write: {type(exc).__name__}: {exc}"
        for key, v in {**tile_row(batch, i, status, error), **stats}.items():
            rows[key].append(v)
        rows["has_ground_truth"].append(has_gt)
        rows["blob"].append(url if status == "ok" else None)
        rows["read_ms"].append(float(batch["read_ms"][i]))
        rows["predict_ms"].append(float(batch["predict_ms"][i]))
    return pa.Table.from_pydict(rows, schema=TILE_SCHEMA)


# --------------------------------------------------------------------------- the semantic family


def _write_kwargs(cfg: SceneInferJobConfig, ckpt, env: dict) -> dict[str, Any]:
    return {"num_classes": ckpt.num_classes, "storage": cfg.storage,
            "tile_stats": cfg.per_tile_rows, "label_values": cfg.label_values, "label_nodata": cfg.label_nodata,
            "env": env, "gdal_cache_mb": cfg.gdal_cache_mb, "blend": cfg.blend,
            "probabilities": cfg.probabilities_dtype if cfg.write_probabilities else None}


SEMANTIC_SCENES = SceneFamily(
    name="semantic",
    predictor=TileProbabilities,
    predictor_kwargs=lambda cfg: {"tta": list(cfg.tta)},
    write_tiles=write_tiles,
    write_kwargs=_write_kwargs,
    stitch=stitch_scene,
    band=stitch_band,
    assemble=assemble_refs,
    polygon_schema=POLYGON_SCHEMA,
    polygon_types=("Polygon",),
)
