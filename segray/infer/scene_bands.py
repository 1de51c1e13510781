"""A semantic scene stitched in row bands: which tiles each band needs (``BandTiles``, so the
driver submits a band the moment they are predicted), and ``assemble``, the scene's last step:
GDAL turns the bands' pieces into the COGs (``raster.mosaic_cog``), the regions crossing band
borders are joined and dissolved band by band (``scene_polygons.BandMerger``), statistics are
added up.

Each band's pieces have one name per band (``scene_stitch.piece_url``): a band task that dies
and is retried rewrites its own pieces, and ``assemble`` reads exactly one result per band, so
a retry never duplicates a block or a polygon. ``stitch_scene`` runs the same steps in one
process (tests, small scenes).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Iterable, Iterator

import numpy as np

from segray.config import StorageOptions
from segray.core.scene_polygons import BandMerger
from segray.infer.scene_grid import MASK_NODATA, PROB_NODATA_U8, ensure_parent, grid_tiles
from segray.infer.scene_stitch import PolygonSink, band_rows, piece_url, scene_stats, stitch_band
from segray.io.raster import limit_gdal_cache, mosaic_cog


class BandTiles:
    """For one scene: its row bands, how many tiles each needs, and the bands a tile feeds."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.rows = band_rows(int(task["height"]), int(task.get("band_rows", 0)), int(task["block_size"]))
        tiles = grid_tiles(int(task["vheight"]), int(task["vwidth"]), int(task["tile_size"]), int(task["overlap"]))
        self._tile_rows = [(t.row_off, t.row_off + t.height) for t in tiles]
        self.needs = [0] * len(self.rows)
        for r0, r1 in self._tile_rows:
            for k in self._bands(r0, r1):
                self.needs[k] += 1

    def _bands(self, r0: int, r1: int) -> range:
        step = self.rows[0][1] - self.rows[0][0]
        return range(min(r0 // step, len(self.rows)), min(-(-r1 // step), len(self.rows)))

    def bands_of(self, tile_index: int) -> range:
        """The bands whose blocks blend this tile (its rows overlap theirs)."""
        return self._bands(*self._tile_rows[tile_index])


def assemble(task: dict[str, Any], storage: StorageOptions | None = None,
             bands: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """The scene's outputs from its bands' results, taken one at a time in band order (so only
    the regions open at one border are held); never raises."""
    t0 = time.perf_counter()
    limit_gdal_cache(task.get("gdal_cache_mb"))
    result: dict[str, Any] = {"scene_id": task["scene_id"], "status": "ok", "error": None, "num_polygons": 0,
                              "polygon_bbox": None, "tile_loads": 0, "max_pending_polygons": 0, "stitch_s": 0.0}
    waited = [0.0]
    try:
        result.update(_assemble(task, _timed(bands, waited), storage, result))
    except Exception as exc:  # the scene becomes an error row; the commit never lists it
        result.update(status="error", error=str(exc) if str(exc).startswith("band ") else
                      f"stitch: {type(exc).__name__}: {exc}")
    result["assemble_s"] = time.perf_counter() - t0 - waited[0]  # its own work, not the wait for bands
    result["stitch_s"] += result["assemble_s"]  # with the bands' own: task-seconds
    return result


def _timed(bands: Iterable[dict[str, Any]], waited: list[float]) -> Iterator[dict[str, Any]]:
    """The band results, the time spent waiting for each added to ``waited[0]``."""
    it = iter(bands)
    while True:
        t = time.perf_counter()
        try:
            band = next(it)
        except StopIteration:
            return
        finally:
            waited[0] += time.perf_counter() - t
        yield band


def assemble_refs(task: dict[str, Any], storage: StorageOptions | None, refs: list) -> dict[str, Any]:
    """``assemble`` on Ray: the band results' references, fetched one by one (not all at once)."""
    import ray

    return assemble(task, storage, (ray.get(ref) for ref in refs))


def _assemble(task: dict[str, Any], bands: Iterable[dict[str, Any]], storage: StorageOptions | None,
              result: dict[str, Any]) -> dict[str, Any]:
    h, w = int(task["height"]), int(task["width"])
    rows = band_rows(h, int(task.get("band_rows", 0)), int(task["block_size"]))
    polygons = _Polygons(task, storage) if task.get("polygons_url") else None
    stats = []
    with polygons or nullcontext():
        for k, band in enumerate(bands):
            if band["status"] != "ok":
                raise RuntimeError(f"band {band['band']}: {band['error']}")
            result["stitch_s"] += band.get("stitch_s", 0.0)
            if polygons:
                polygons.add(band)
            stats.append({key: band[key] for key in ("class_pixels", "confidence_sum", "confusion", "tile_loads",
                                                     "num_tiles")})
            result["num_bands"] = k + 1
    if len(stats) != len(rows):
        raise RuntimeError(f"{len(stats)} band results for {len(rows)} bands")
    for url in (task["mask_url"], task.get("prob_url")):
        if url:
            ensure_parent(url)
    cog = dict(height=h, width=w, crs=task["crs"] or None, transform=task["transform"],
               blocksize=int(task["block_size"]), compress=task.get("compress", "deflate"), env=task.get("env"))
    mosaic_cog(task["mask_url"], [(piece_url(task, "mask", k), r0) for k, (r0, _) in enumerate(rows)], count=1,
               dtype="uint8", nodata=MASK_NODATA, resampling="nearest", **cog)
    if task.get("prob_url"):
        u8 = task.get("prob_dtype", "uint8") == "uint8"
        mosaic_cog(task["prob_url"], [(piece_url(task, "prob", k), r0) for k, (r0, _) in enumerate(rows)],
                   count=int(task["num_classes"]), dtype="uint8" if u8 else "float32",
                   nodata=PROB_NODATA_U8 if u8 else float("nan"), resampling="average", **cog)
    out = {**scene_stats(stats), "tile_loads": sum(b["tile_loads"] for b in stats), "num_tiles": stats[0]["num_tiles"]}
    return {**out, **(polygons.finish() if polygons else {})}


class _Polygons:
    """The scene's polygons: each band's finished ones stay in its piece; the regions open at band
    borders are joined band by band (``BandMerger``) into one more piece, written as they finish."""

    def __init__(self, task: dict[str, Any], storage) -> None:
        self.merger = BandMerger(int(task.get("polygon_max_vertices", 100_000)), int(task.get("min_polygon_pixels", 0)))
        self.sink = PolygonSink(task, piece_url(task, "polygons-joined", 0, "parquet"), storage)
        self.parts: list[tuple[str, int, list[float] | None]] = []
        self.max_pending = 0

    def __enter__(self) -> "_Polygons":
        self.sink.__enter__()
        return self

    def add(self, band: dict[str, Any]) -> None:
        self.parts.append((band["polygons_url"], band["num_polygons"], band["polygon_bbox"]))
        self.max_pending = max(self.max_pending, band["max_pending_polygons"])
        self.sink.add(self.merger.add(band["edges"]))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.sink.add(self.merger.finish())
        self.sink.__exit__(exc_type, exc, tb)

    def finish(self) -> dict[str, Any]:
        """After the ``with``: what the scene's row and the driver need (the sink is flushed)."""
        parts = [*self.parts, (self.sink.url, self.sink.count, self.sink.bbox)]
        boxes = np.array([bb for _, n, bb in parts if n], np.float64).reshape(-1, 4)
        bbox = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()] if len(boxes) else None
        return {"num_polygons": sum(n for _, n, _ in parts), "polygon_bbox": bbox,
                "polygon_parts": [url for url, n, _ in parts if n], "max_pending_polygons": self.max_pending}


def stitch_scene(task: dict[str, Any], storage: StorageOptions | None = None) -> dict[str, Any]:
    """Every band of a scene, then ``assemble``, in this process (what the tasks do on Ray)."""
    rows = band_rows(int(task["height"]), int(task.get("band_rows", 0)), int(task["block_size"]))
    return assemble(task, storage, (stitch_band(task, k, storage) for k in range(len(rows))))
