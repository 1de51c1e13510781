"""Step 4 of semantic scenes, one row band at a time (``stitch_band``, a task per band): walks
the band's output blocks, blends only the tiles touching each block (``tiling.stitch_window``,
blobs through a small LRU), streams the class map (and probabilities) into the band's tiled
GTiff pieces, counts classes, scores against ground truth read block-wise, and polygonises block
by block (``BlockPolygonizer``; regions crossing the band's borders are handed on, open).
``scene_bands`` submits bands as their tiles come in and assembles the pieces. A band's memory
depends on the tile, block and class counts and the scene's width, not on the scene size.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
import torch

from segray.config import StorageOptions
from segray.core.metrics import confusion_matrix, metric_num_classes
from segray.core.scene_polygons import POLYGON_SCHEMA, BlockPolygonizer, Piece, polygon_table
from segray.core.tiling import Window, blocks
from segray.infer.scene_grid import (
    MASK_NODATA,
    PROB_NODATA_U8,
    PROB_SCALE,
    TileIndex,
    blob_url,
    ensure_parent,
    grid_tiles,
    label_mismatch,
)
from segray.infer.tile_blobs import tile_blobs
from segray.io.fs import join, pyarrow_fs, read_bytes
from segray.io.raster import CogBlockWriter, limit_gdal_cache, read_window, remap_labels


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


def band_rows(height: int, rows: int, block_size: int) -> list[tuple[int, int]]:
    """The scene's row bands ``(row_start, row_stop)``: ``rows`` rounded up to whole blocks
    (0: one band, the whole scene)."""
    step = -(-rows // block_size) * block_size if rows > 0 else height
    return [(r, min(r + step, height)) for r in range(0, height, max(step, 1))]


def piece_url(task: dict[str, Any], kind: str, band: int, ext: str = "tif") -> str:
    """Where band ``band`` of a scene writes its ``kind`` ("mask", "prob", "polygons"): one name
    per band, so a retried task replaces what a killed attempt left."""
    return join(task.get("band_dir") or task["blob_dir"].rstrip("/") + "-bands", f"{kind}-{band:05d}.{ext}")


def stitch_band(task: dict[str, Any], band: int, storage: StorageOptions | None = None) -> dict[str, Any]:
    """Blend one row band of a scene's tile blobs block by block into its pieces; never raises.

    ``task`` holds the scene (``url``, ``label``, ``height``, ``width``, ``vheight``, ``vwidth``,
    ``crs``, ``transform``, ``blob_dir``, ``band_dir``), the grid (``tile_size``, ``overlap``,
    ``blend``, ``margin``, ``block_size``, ``band_rows``), the model (``num_classes``,
    ``class_names``) and the outputs (``prob_url``/``prob_dtype``, ``polygons_url``/
    ``polygon_crs``/``min_polygon_pixels``, ``label_values``, ``label_nodata``, ``env``,
    ``gdal_cache_mb``). The band's class map (and probabilities) go to ``piece_url`` as tiled
    GTiffs, its finished polygons to a Parquet piece; the regions crossing its top or bottom row
    come back as ``edges`` (``BandEdges``) with the raw statistics, for ``scene_bands.assemble``.
    """
    t0 = time.perf_counter()
    limit_gdal_cache(task.get("gdal_cache_mb"))
    result: dict[str, Any] = {"band": band, "status": "ok", "error": None, "num_polygons": 0, "polygon_bbox": None,
                              "tile_loads": 0, "max_pending_polygons": 0, "edges": None}
    try:
        result.update(_stitch_band(task, band, storage))
    except Exception as exc:  # the scene becomes an error row; its pieces are never assembled
        result.update(status="error", error=f"stitch: {type(exc).__name__}: {exc}")
    result["stitch_s"] = time.perf_counter() - t0
    return result


class _BlockStats:
    """Class counts, confidence and (with ground truth) the confusion matrix, block by block."""

    def __init__(self, task: dict[str, Any], k: int) -> None:
        self.task, self.k = task, k
        self.label = task.get("label") or ""
        self.counts = np.zeros(k, np.int64)
        self.conf_sum = 0.0
        self.cm = torch.zeros(k, k, dtype=torch.long) if self.label else None

    def add(self, win: Window, pred: np.ndarray, conf: np.ndarray, valid: np.ndarray) -> None:
        self.counts += np.bincount(pred[valid], minlength=self.k)
        self.conf_sum += float(conf[valid].sum(dtype=np.float64))
        if self.cm is not None:
            t = self.task
            lab, lab_ok = read_window(self.label, win, bands=[1], nodata=t.get("label_nodata"), env=t.get("env"))
            keep = valid & lab_ok
            target = remap_labels(lab[0][keep], t.get("label_values"))
            self.cm += confusion_matrix(torch.from_numpy(pred[keep]), torch.from_numpy(target), self.k)

    def raw(self) -> dict[str, Any]:
        """What bands add up: class counts, the confidence sum, the confusion matrix."""
        return {"class_pixels": self.counts.tolist(), "confidence_sum": self.conf_sum,
                "confusion": self.cm.flatten().tolist() if self.cm is not None else None}


def scene_stats(bands: list[dict[str, Any]]) -> dict[str, Any]:
    """A scene's statistics from its bands' ``raw`` ones."""
    counts = np.sum([b["class_pixels"] for b in bands], axis=0, dtype=np.int64)
    valid_pixels = int(counts.sum())
    cms = [b["confusion"] for b in bands if b["confusion"] is not None]
    return {"class_pixels": counts.tolist(), "valid_pixels": valid_pixels,
            "mean_confidence": sum(b["confidence_sum"] for b in bands) / valid_pixels if valid_pixels else None,
            "confusion": np.sum(cms, axis=0, dtype=np.int64).tolist() if cms else None}


def _rasters(stack: ExitStack, task: dict[str, Any], band: int, rows: tuple[int, int],
             w: int) -> tuple[CogBlockWriter, CogBlockWriter | None]:
    """The band's class-map piece writer and (when asked) its probabilities piece writer, entered
    on ``stack``: tiled GTiffs, georeferenced where the band lies, copied as they are."""
    a, b, c, d, e, f = task["transform"][:6]
    r0, r1 = rows
    piece = dict(crs=task["crs"] or None, transform=[a, b, c + b * r0, d, e, f + e * r0],
                 blocksize=int(task["block_size"]), env=task.get("env"), cog=False)
    ensure_parent(piece_url(task, "mask", band))
    mask_w = stack.enter_context(CogBlockWriter(piece_url(task, "mask", band), r1 - r0, w, 1, "uint8",
                                                nodata=MASK_NODATA, **piece))
    prob_w = None
    if task.get("prob_url"):
        u8 = task.get("prob_dtype", "uint8") == "uint8"
        prob_w = stack.enter_context(CogBlockWriter(
            piece_url(task, "prob", band), r1 - r0, w, int(task["num_classes"]), "uint8" if u8 else "float32",
            nodata=PROB_NODATA_U8 if u8 else float("nan"), **piece))
    return mask_w, prob_w


def _write_probabilities(prob_w: CogBlockWriter, win: Window, probs: np.ndarray, valid: np.ndarray,
                         dtype: str) -> None:
    if dtype == "uint8":
        q = np.rint(np.nan_to_num(probs, nan=0.0) * PROB_SCALE).astype(np.uint8)
        prob_w.write(win, np.where(valid, q, PROB_NODATA_U8))
    else:
        prob_w.write(win, probs)


def _polygonizer(task: dict[str, Any], h: int, w: int, top: int) -> BlockPolygonizer | None:
    if not task.get("polygons_url"):
        return None
    return BlockPolygonizer(h, w, ignore=(0,), nodata=MASK_NODATA, min_pixels=int(task.get("min_polygon_pixels", 0)),
                            max_vertices=int(task.get("polygon_max_vertices", 100_000)),
                            max_pending_vertices=task.get("polygon_max_pending_vertices"), top=top)


def _stitch_band(task: dict[str, Any], band: int, storage: StorageOptions | None) -> dict[str, Any]:
    h, w = int(task["height"]), int(task["width"])
    vh, vw, bs = int(task["vheight"]), int(task["vwidth"]), int(task["block_size"])
    r0, r1 = rows = band_rows(h, int(task.get("band_rows", 0)), bs)[band]
    tiles = grid_tiles(vh, vw, int(task["tile_size"]), int(task["overlap"]))
    index = TileIndex(tiles)
    blobs = tile_blobs(task)
    cache = TileCache(lambda i: blobs.decode(read_bytes(blob_url(task["blob_dir"], i, blobs.ext), storage)),
                      index.cache_capacity(h, w, bs))
    stats = _BlockStats(task, metric_num_classes(int(task["num_classes"])))
    if stats.label and band == 0:
        why = label_mismatch(stats.label, h, w, task["transform"], task.get("env"))
        if why:
            raise ValueError(why)
    poly = _polygonizer(task, h, w, top=r0)
    poly_out = PolygonSink(task, piece_url(task, "polygons", band, "parquet"), storage) if poly else None
    with ExitStack() as stack:
        mask_w, prob_w = _rasters(stack, task, band, rows, w)
        if poly_out:
            stack.enter_context(poly_out)
        windows = [(r + r0, c, bh, bw) for r, c, bh, bw in blocks(r1 - r0, w, bs)]  # r0: a whole block multiple
        for n, win in enumerate(windows):
            b = blobs.block(win, ((tiles[i], cache.get(i)) for i in index.touching(win)))
            cmap = np.where(b.valid, b.pred, MASK_NODATA).astype(np.uint8)
            local = (win[0] - r0, *win[1:])
            mask_w.write(local, cmap)
            if prob_w is not None:
                _write_probabilities(prob_w, local, b.probs, b.valid, task.get("prob_dtype", "uint8"))
            stats.add(win, b.pred, b.conf, b.valid)
            if poly:
                poly_out.add(poly.add(win, cmap, b.conf))
                if n + 1 == len(windows) or windows[n + 1][0] != win[0]:  # the block row ends
                    poly_out.add(poly.end_row(win[0] + win[2]))
    out = {**stats.raw(), "tile_loads": cache.loads, "num_tiles": len(tiles)}
    if poly_out:
        out.update(num_polygons=poly_out.count, polygon_bbox=poly_out.bbox, max_pending_polygons=poly.max_pending,
                   edges=poly.band_edges(), polygons_url=poly_out.url)
    return out


class PolygonSink:
    """Streams finished polygons of one scene into a Parquet file, one row group per chunk of
    at most ``CHUNK`` polygons or ``CHUNK_VERTICES`` vertices (pieces of a web can be huge).
    Small chunks on purpose: this task and the driver (which copies row group by row group into
    polygons.parquet) each hold one chunk, so a chunk bounds their memory whatever the scene."""

    CHUNK, CHUNK_VERTICES = 2_000, 100_000

    def __init__(self, task: dict[str, Any], url: str, storage: StorageOptions | None) -> None:
        self.task, self.url, self.storage = task, url, storage
        self._buf: list[Piece] = []
        self._vertices = 0
        self.count = 0
        self.bbox: list[float] | None = None
        self._writer = None

    def __enter__(self) -> "PolygonSink":
        import pyarrow.parquet as pq

        fs, path = pyarrow_fs(self.url, self.storage)
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
