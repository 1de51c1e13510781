"""The steps of scene segmentation as plain functions (no Ray here; ``scenes.py`` wires them).

A scene is never held whole by any step:

1. ``read_tiles``: a *chunk row* (one scene, a range of tile indices) -> one row per tile with
   its pixels, read windowed with rasterio (``float32 [C, T, T]``) and a ``valid`` mask.
2. ``TileProbabilities`` (actor): per-tile class probabilities, ``float16 [K, T, T]``
   (``K = 1`` for a one-logit binary model, else one channel per class). Nodata pixels are
   replaced by the band mean before normalisation, so they do not disturb their neighbours.
3. ``write_tiles``: each tile's probabilities (NaN where the input is nodata) become one
   ``.npy`` blob in the work area; the row keeps only small per-tile statistics.
4. ``stitch_scene`` (one task per scene): walks the output blocks, blends only the tiles
   touching each block (``tiling.stitch_window``, blobs through a small LRU), streams the class
   map (and probabilities) into COGs, counts classes, scores against ground truth read
   block-wise, and polygonises block by block (``BlockPolygonizer``). Its memory depends on
   the tile, block and class counts, not on the scene size.

Tiles come from ``tiling.tile_grid`` over a *virtual* extent that may exceed the scene by
less than ``align`` pixels, so that every tile offset is a multiple of the model's
downsampling factor (pooling grids line up: tiled == untiled away from tile edges). Pixels
beyond the scene are read as nodata and never written.

For an instance (Mask R-CNN) checkpoint the same rows and reads apply; steps 2-4 become
``scene_instances`` (per-tile detections, merged per scene across tile borders).
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from contextlib import ExitStack
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from segray.config import StorageOptions
from segray.core.metrics import confusion_matrix, metric_num_classes
from segray.core.scene_polygons import POLYGON_SCHEMA, BlockPolygonizer, Piece, polygon_table
from segray.core.tiling import Tile, Window, blocks, stitch_window, tile_grid
from segray.infer.steps import Predictor, same_shape_chunks
from segray.io.fs import join, pyarrow_fs, read_bytes, write_bytes
from segray.io.raster import CogBlockWriter, open_info, read_window

MASK_NODATA = 255  # class maps are uint8; 255 marks nodata
PROB_NODATA_U8 = 255  # uint8 probabilities are round(p * 254)
PROB_SCALE = 254.0


def limit_gdal_cache(mb: int | None) -> None:
    """Cap GDAL's block cache in this process (default 5% of RAM, filled by every block read or
    written: a worker's memory would grow with the data it has seen until that cap)."""
    if mb:
        from rasterio.env import set_gdal_config

        set_gdal_config("GDAL_CACHEMAX", int(mb) * 2**20)


def model_align(model_config: dict) -> int:
    """The factor tile offsets must be multiples of for pooling grids to line up."""
    name = model_config.get("name")
    if name == "unet":
        return 2 ** int(model_config.get("depth", 4))
    if name in ("fcn_resnet50", "deeplabv3_resnet50"):
        return 8  # output stride 8 (dilated ResNet)
    return 1


def virtual_size(size: int, tile_size: int, align: int) -> int:
    """Smallest extent >= size whose last tile offset (extent - tile_size) is a multiple of ``align``."""
    if size <= tile_size or align <= 1:
        return size
    return tile_size + -(-(size - tile_size) // align) * align


@lru_cache(maxsize=64)
def grid_tiles(vheight: int, vwidth: int, tile_size: int, overlap: int) -> tuple[Tile, ...]:
    return tuple(tile_grid(vheight, vwidth, tile_size, overlap))


class TileIndex:
    """Which tiles of a regular ``tile_grid`` touch a window: by offsets, not a scan of all tiles."""

    def __init__(self, tiles: tuple[Tile, ...]) -> None:
        self.tiles = tiles
        self.row_offs = np.array(sorted({t.row_off for t in tiles}))
        self.col_offs = np.array(sorted({t.col_off for t in tiles}))
        self.th, self.tw = tiles[0].height, tiles[0].width
        self._pos = {(t.row_off, t.col_off): i for i, t in enumerate(tiles)}

    def _rows(self, r0: int, h: int) -> np.ndarray:
        return self.row_offs[(self.row_offs < r0 + h) & (self.row_offs + self.th > r0)]

    def _cols(self, c0: int, w: int) -> np.ndarray:
        return self.col_offs[(self.col_offs < c0 + w) & (self.col_offs + self.tw > c0)]

    def touching(self, window: Window) -> list[int]:
        r0, c0, h, w = window
        return [self._pos[(int(r), int(c))] for r in self._rows(r0, h) for c in self._cols(c0, w)]

    def cache_capacity(self, height: int, width: int, block_size: int) -> int:
        """Tiles an LRU must hold so that a row-major block walk reads each tile once per block row."""
        most_rows = max(len(self._rows(r, min(block_size, height - r))) for r in range(0, height, block_size))
        most_cols = max(len(self._cols(c, min(block_size, width - c))) for c in range(0, width, block_size))
        return most_rows * (most_cols + 1)


def remap_labels(label: np.ndarray, values: dict[int, int] | None) -> np.ndarray:
    """Ground-truth values (read as float32) -> int64 class ids through ``values``."""
    out = label.astype(np.int64)
    if values:
        src = out.copy()
        for k, v in values.items():
            out[src == int(k)] = int(v)
    return out


def label_mismatch(label_url: str, height: int, width: int, transform, env: dict | None) -> str | None:
    """Why a ground-truth raster does not line up with its scene (None if it does).

    A label without georeferencing (identity transform) is taken as pixel-aligned.
    """
    info = open_info(label_url, env)
    if (info.height, info.width) != (height, width):
        return f"ground truth {label_url} is {info.height}x{info.width}, scene is {height}x{width}"
    ident = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if info.crs is not None and tuple(info.transform) != ident:
        scale = max(abs(transform[0]), abs(transform[4]), 1e-12)
        if any(abs(a - b) > 1e-6 * scale for a, b in zip(info.transform, transform)):
            return f"ground truth {label_url} has transform {info.transform}, scene has {tuple(transform)}"
    return None


# --------------------------------------------------------------------------- 1. read


def _placeholder(bands: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((max(bands, 1), 1, 1), np.float32), np.zeros((1, 1), np.uint8)


def read_tiles(
    batch: dict[str, Any],
    tile_size: int,
    overlap: int,
    bands: list[int] | None = None,
    nodata: float | None = None,
    env: dict | None = None,
    gdal_cache_mb: int | None = None,
) -> dict[str, Any]:
    """Chunk rows (scene fields + ``tile_start``/``tile_stop``) -> one row per tile with pixels.

    ``bands`` are 1-based (GDAL). A tile that cannot be read becomes an error row.
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
                pixels, valid = read_window(str(batch["url"][i]), tile.window, bands=bands, nodata=nodata, env=env)
                valid = valid.astype(np.uint8)
            except Exception as exc:  # a bad read is an error row; the scene is reported, the job goes on
                (pixels, valid), status, error = _placeholder(nbands), "error", f"read: {type(exc).__name__}: {exc}"
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
                 amp: bool = True, max_batch: int = 8) -> None:
        super().__init__(checkpoint, storage, device, amp, max_batch)
        self.channels = self.model_cfg.num_classes  # 1 = binary (sigmoid), else softmax over classes

    @torch.inference_mode()
    def probabilities(self, images: list[np.ndarray], valid: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Same-shape tiles go through the model together; nodata pixels are set to the band mean."""
        results: list[np.ndarray | None] = [None] * len(images)
        for chunk in same_shape_chunks(images, self.max_batch):
            x = torch.from_numpy(np.stack([images[i] for i in chunk]))
            if valid is not None:
                ok = torch.from_numpy(np.stack([np.asarray(valid[i], bool) for i in chunk]))[:, None]
                x = torch.where(ok, x, self.mean)
            x = ((x - self.mean) / self.std).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(x).float()
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


def blob_url(blob_dir: str, tile_index: int) -> str:
    return join(blob_dir, f"{tile_index:07d}.npy")


def class_map(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class ids int64, confidence of the chosen class) from ``[K, h, w]`` probabilities."""
    if probs.shape[0] == 1:
        p = probs[0]
        pred = p > 0.5
        return pred.astype(np.int64), np.where(pred, p, 1 - p)
    return probs.argmax(axis=0), probs.max(axis=0)


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


def write_tiles(
    batch: dict[str, Any],
    num_classes: int,
    storage: StorageOptions | None = None,
    tile_stats: bool = False,
    label_values: dict[int, int] | None = None,
    label_nodata: int | None = None,
    env: dict | None = None,
    gdal_cache_mb: int | None = None,
) -> pa.Table:
    """Probabilities -> one ``.npy`` blob per tile (NaN where nodata); rows of ``TILE_SCHEMA``.

    With ``tile_stats``, each row also gets its core's class counts, confidence and, when the
    scene has ground truth, its confusion matrix (read windowed from the label raster).
    """
    limit_gdal_cache(gdal_cache_mb)
    k = metric_num_classes(num_classes)
    rows: dict[str, list] = {f.name: [] for f in TILE_SCHEMA}
    for i in range(len(batch["status"])):
        status, error = str(batch["status"][i]), str(batch["error"][i] or "")
        tile_index = int(batch["tile_index"][i])
        url = blob_url(str(batch["blob_dir"][i]), tile_index)
        r0, c0 = int(batch["core_row_off"][i]), int(batch["core_col_off"][i])
        ch, cw = int(batch["core_height"][i]), int(batch["core_width"][i])
        tr, tc = int(batch["row_off"][i]), int(batch["col_off"][i])
        stats: dict[str, Any] = dict.fromkeys(("valid_fraction", "class_pixels", "class_fractions",
                                               "mean_confidence", "confusion"))
        has_gt = False
        if status == "ok":
            try:
                probs = np.array(batch["probs"][i], dtype=np.float16)  # writable copy
                valid = np.asarray(batch["valid"][i], bool)
                probs[:, ~valid] = np.nan
                buf = io.BytesIO()
                np.save(buf, probs, allow_pickle=False)
                write_bytes(url, buf.getvalue(), storage)
                if tile_stats and ch and cw:
                    core = (slice(r0 - tr, r0 - tr + ch), slice(c0 - tc, c0 - tc + cw))
                    pred, conf = class_map(probs[(slice(None), *core)].astype(np.float32))
                    ok = valid[core]
                    counts = np.bincount(pred[ok], minlength=k)
                    stats.update(valid_fraction=float(ok.mean()), class_pixels=counts.tolist(),
                                 class_fractions=(counts / max(counts.sum(), 1)).tolist(),
                                 mean_confidence=float(conf[ok].mean()) if ok.any() else None)
                    label = str(batch["label"][i] or "")
                    if label:
                        lab, lab_ok = read_window(label, (r0, c0, ch, cw), bands=[1], nodata=label_nodata, env=env)
                        keep = ok & lab_ok
                        cm = confusion_matrix(torch.from_numpy(pred[keep]),
                                              torch.from_numpy(remap_labels(lab[0][keep], label_values)), k)
                        stats["confusion"], has_gt = cm.flatten().tolist(), True
            except Exception as exc:
                status, error = "error", f"write: {type(exc).__name__}: {exc}"
        for key, v in {**tile_row(batch, i, status, error), **stats}.items():
            rows[key].append(v)
        rows["has_ground_truth"].append(has_gt)
        rows["blob"].append(url if status == "ok" else None)
        rows["read_ms"].append(float(batch["read_ms"][i]))
        rows["predict_ms"].append(float(batch["predict_ms"][i]))
    return pa.Table.from_pydict(rows, schema=TILE_SCHEMA)


# --------------------------------------------------------------------------- 4. stitch


class TileCache:
    """LRU of loaded tile blobs; counts loads (each tile should load about once per block row)."""

    def __init__(self, load: Callable[[int], np.ndarray], capacity: int) -> None:
        self.load, self.capacity = load, max(capacity, 1)
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self.loads = 0

    def get(self, key: int) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self.load(key)
        self.loads += 1
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


def _ensure_parent(url: str) -> None:
    """GDAL creates files, not folders: make a local output's folder first."""
    import os

    if "://" not in url or url.startswith("file://"):
        os.makedirs(os.path.dirname(os.path.abspath(url.removeprefix("file://"))), exist_ok=True)


def _load_blob(url: str, storage: StorageOptions | None) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(url, storage)), allow_pickle=False)


def stitch_scene(task: dict[str, Any], storage: StorageOptions | None = None) -> dict[str, Any]:
    """Blend one scene's tile blobs block by block into its outputs; never raises.

    ``task`` holds the scene (``url``, ``label``, ``height``, ``width``, ``vheight``, ``vwidth``,
    ``crs``, ``transform``, ``blob_dir``), the grid (``tile_size``, ``overlap``, ``blend``,
    ``margin``, ``block_size``), the model (``num_classes``, ``class_names``) and the outputs
    (``mask_url``, ``prob_url``/``prob_dtype``, ``polygons_url``/``polygon_crs``/
    ``min_polygon_pixels``, ``label_values``, ``label_nodata``, ``compress``, ``env``,
    ``gdal_cache_mb``).
    Returns the scene's statistics (``status``/``error``, class pixels, confusion, ...).
    """
    t0 = time.perf_counter()
    limit_gdal_cache(task.get("gdal_cache_mb"))
    result: dict[str, Any] = {"scene_id": task["scene_id"], "status": "ok", "error": None, "num_polygons": 0,
                              "polygon_bbox": None, "stitch_s": 0.0, "tile_loads": 0, "max_pending_polygons": 0}
    try:
        result.update(_stitch(task, storage))
    except Exception as exc:  # the scene becomes an error row; nothing half-written stays behind
        result.update(status="error", error=f"stitch: {type(exc).__name__}: {exc}")
    result["stitch_s"] = time.perf_counter() - t0
    return result


def _stitch(task: dict[str, Any], storage: StorageOptions | None) -> dict[str, Any]:
    h, w = int(task["height"]), int(task["width"])
    vh, vw, bs = int(task["vheight"]), int(task["vwidth"]), int(task["block_size"])
    overlap, blend, margin = int(task["overlap"]), task["blend"], int(task["margin"])
    num_classes, env = int(task["num_classes"]), task.get("env")
    k = metric_num_classes(num_classes)
    tiles = grid_tiles(vh, vw, int(task["tile_size"]), overlap)
    index = TileIndex(tiles)
    cache = TileCache(lambda i: _load_blob(blob_url(task["blob_dir"], i), storage),
                      index.cache_capacity(h, w, bs))
    label = task.get("label") or ""
    if label:
        why = label_mismatch(label, h, w, task["transform"], env)
        if why:
            raise ValueError(why)
    counts = np.zeros(k, np.int64)
    conf_sum = 0.0
    cm = torch.zeros(k, k, dtype=torch.long) if label else None
    poly = (BlockPolygonizer(h, w, ignore=(0,), nodata=MASK_NODATA, min_pixels=int(task.get("min_polygon_pixels", 0)),
                             max_vertices=int(task.get("polygon_max_vertices", 100_000)),
                             max_pending_vertices=task.get("polygon_max_pending_vertices"))
            if task.get("polygons_url") else None)
    poly_out = _PolygonSink(task, storage) if poly else None
    cog = dict(crs=task["crs"] or None, transform=task["transform"], blocksize=bs, compress=task.get("compress", "deflate"),
               env=env)
    for url in (task["mask_url"], task.get("prob_url")):
        if url:
            _ensure_parent(url)
    with ExitStack() as stack:
        mask_w = stack.enter_context(CogBlockWriter(task["mask_url"], h, w, 1, "uint8", nodata=MASK_NODATA,
                                                    resampling="nearest", **cog))
        prob_w = None
        if task.get("prob_url"):
            u8 = task.get("prob_dtype", "uint8") == "uint8"
            prob_w = stack.enter_context(CogBlockWriter(
                task["prob_url"], h, w, num_classes, "uint8" if u8 else "float32",
                nodata=PROB_NODATA_U8 if u8 else float("nan"), resampling="average", **cog))
        if poly_out:
            stack.enter_context(poly_out)
        windows = blocks(h, w, bs)
        for n, win in enumerate(windows):
            probs = stitch_window(win, ((tiles[i], cache.get(i)) for i in index.touching(win)),
                                  vh, vw, overlap, blend, margin)
            valid = ~np.isnan(probs[0])
            pred, conf = class_map(np.nan_to_num(probs, nan=0.0))
            cmap = np.where(valid, pred, MASK_NODATA).astype(np.uint8)
            mask_w.write(win, cmap)
            if prob_w is not None:
                if task.get("prob_dtype", "uint8") == "uint8":
                    q = np.rint(np.nan_to_num(probs, nan=0.0) * PROB_SCALE).astype(np.uint8)
                    prob_w.write(win, np.where(valid, q, PROB_NODATA_U8))
                else:
                    prob_w.write(win, probs)
            counts += np.bincount(pred[valid], minlength=k)
            conf_sum += float(conf[valid].sum(dtype=np.float64))
            if cm is not None:
                lab, lab_ok = read_window(label, win, bands=[1], nodata=task.get("label_nodata"), env=env)
                keep = valid & lab_ok
                target = remap_labels(lab[0][keep], task.get("label_values"))
                cm += confusion_matrix(torch.from_numpy(pred[keep]), torch.from_numpy(target), k)
            if poly:
                poly_out.add(poly.add(win, cmap, conf))
                row_ends = n + 1 == len(windows) or windows[n + 1][0] != win[0]
                if row_ends:
                    poly_out.add(poly.end_row(win[0] + win[2]))
    valid_pixels = int(counts.sum())
    out = {
        "class_pixels": counts.tolist(),
        "valid_pixels": valid_pixels,
        "mean_confidence": conf_sum / valid_pixels if valid_pixels else None,
        "confusion": cm.flatten().tolist() if cm is not None else None,
        "tile_loads": cache.loads,
        "num_tiles": len(tiles),
    }
    if poly_out:
        out.update(num_polygons=poly_out.count, polygon_bbox=poly_out.bbox, max_pending_polygons=poly.max_pending)
    return out


class _PolygonSink:
    """Streams finished polygons of one scene into a Parquet file, one row group per chunk of
    at most ``CHUNK`` polygons or ``CHUNK_VERTICES`` vertices (pieces of a web can be huge).
    Small chunks on purpose: this task and the driver (which copies row group by row group into
    polygons.parquet) each hold one chunk, so a chunk bounds their memory whatever the scene."""

    CHUNK, CHUNK_VERTICES = 2_000, 100_000

    def __init__(self, task: dict[str, Any], storage: StorageOptions | None) -> None:
        self.task, self.storage = task, storage
        self._buf: list[Piece] = []
        self._vertices = 0
        self.count = 0
        self.bbox: list[float] | None = None
        self._writer = None

    def __enter__(self) -> "_PolygonSink":
        import pyarrow.parquet as pq

        fs, path = pyarrow_fs(self.task["polygons_url"], self.storage)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        self._writer = pq.ParquetWriter(path, POLYGON_SCHEMA, filesystem=fs)
        return self

    def add(self, pieces: list[Piece]) -> None:
        import shapely

        self._buf.extend(pieces)
        if pieces:
            self._vertices += int(shapely.get_num_coordinates([p.geom for p in pieces]).sum())
        if len(self._buf) >= self.CHUNK or self._vertices >= self.CHUNK_VERTICES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        t = self.task
        table = polygon_table(self._buf, t["transform"], t["scene_id"], t["class_names"],
                              src_crs=t["crs"] or None, dst_crs=t.get("polygon_crs"))
        self._buf, self._vertices = [], 0
        self.count += table.num_rows
        b = table.column("bbox").combine_chunks()
        lo = [float(np.min(b.field(n).to_numpy())) for n in ("xmin", "ymin")]
        hi = [float(np.max(b.field(n).to_numpy())) for n in ("xmax", "ymax")]
        if self.bbox is None:
            self.bbox = lo + hi
        else:
            self.bbox = [min(self.bbox[0], lo[0]), min(self.bbox[1], lo[1]),
                         max(self.bbox[2], hi[0]), max(self.bbox[3], hi[1])]
        self._writer.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
        finally:
            self._writer.close()
