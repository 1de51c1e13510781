"""What a predicted tile leaves in the work area for stitching, and how blocks are made from it:
one object per representation, chosen by the ``blend`` setting (``tile_blobs(task)``).

- ``StripTiles`` (``blend: cosine | linear``): float16 class probabilities (NaN where nodata)
  of the strips other tiles overlap, blended there (``tiling.stitch_window``); the rest of the
  tile, which blends to the tile's own prediction, as its class map and confidence. ``2 K``
  bytes per strip pixel, 3 per other pixel: ~2.1 MB for a 512² tile of 5 classes with 128 px
  overlaps (the whole tile's probabilities were 2.6 MB), less with narrower overlaps.
- ``CoreTiles`` (``blend: core``): only the tile's core (cores partition the scene), as its class
  map and confidence (uint8 each, deflated), plus the core's probabilities when they are written.
  Each output pixel comes from the one tile whose core holds it: exact when ``margin`` covers the
  model's receptive field (core pixels are ``overlap / 2 > margin`` from every inner tile edge),
  well under a byte per scene pixel. The confidence is kept to 1/254 (the uint8 probabilities'
  own step), so mean confidences and polygon scores differ from blending by at most that.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from segray.core.tiling import Tile, Window, stitch_window
from segray.infer.scene_grid import MASK_NODATA, PROB_SCALE, class_map


@dataclass
class Block:
    """One output block: class ids (int64), confidence, the valid mask and (if kept) probabilities."""

    pred: np.ndarray
    conf: np.ndarray
    valid: np.ndarray
    probs: np.ndarray | None  # float32 [K, h, w], NaN where nodata


class StripTiles:
    """Blending, with only the overlap strips' probabilities: the pixels no other tile covers
    (``Tile.alone_slices``) blend to the tile's own prediction, so they travel as its class map
    and confidence; the strips around them carry float16 probabilities (NaN where nodata)."""

    ext = "npz"

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task  # the grid, read when stitching
        self.probs = bool(task.get("prob_url"))

    def encode(self, probs: np.ndarray, valid: np.ndarray, tile: Tile) -> bytes:
        p = np.array(probs, dtype=np.float16)  # writable copy
        p[:, ~valid] = np.nan
        rs, cs = tile.alone_slices
        arrays = {"alone": np.array([rs.start, rs.stop, cs.start, cs.stop], np.int32),
                  "top": p[:, : rs.start], "bottom": p[:, rs.stop :], "left": p[:, rs, : cs.start],
                  "right": p[:, rs, cs.stop :]}
        if self.probs or len(p) == 1:  # written out, or 2 bytes against 3: the alone part's probabilities
            arrays["alone_probs"] = p[:, rs, cs]
        else:
            arrays.update(_class_map_u8(p[:, rs, cs]))
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # float16 barely deflates: stored, so encode and decode stay cheap
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, np.ndarray]:
        """The tile's strips as one float16 array of the tile's shape (NaN where alone), and its
        alone part: decoded once per tile, reused by every block it touches."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        if "alone_probs" in d:
            d.update(_class_map_u8(d["alone_probs"]))
        r0, r1, c0, c1 = (int(v) for v in d["alone"])
        k, h, w = d["top"].shape[0], d["top"].shape[1] + (r1 - r0) + d["bottom"].shape[1], d["top"].shape[2]
        full = np.full((k, h, w), np.nan, np.float16)
        full[:, :r0], full[:, r1:], full[:, r0:r1, :c0], full[:, r0:r1, c1:] = d["top"], d["bottom"], d["left"], d["right"]
        return {"strips": full, "alone": (r0, r1, c0, c1), "classes": d["classes"], "confidence": d["confidence"],
                "alone_probs": d.get("alone_probs") if self.probs else None}

    def block(self, window: Window, tiles: Iterable[tuple[Tile, dict[str, Any]]]) -> Block:
        t, tiles = self.task, list(tiles)
        probs = stitch_window(window, ((tile, d["strips"]) for tile, d in tiles), int(t["vheight"]), int(t["vwidth"]),
                              int(t["overlap"]), t["blend"], int(t["margin"]))
        valid = ~np.isnan(probs[0])  # so far: the strips; alone pixels are NaN (one tile, no strip)
        pred, conf = class_map(np.nan_to_num(probs, nan=0.0))
        for tile, d in tiles:
            r0, r1, c0, c1 = d["alone"]
            part = _overlap(window, (tile.row_off + r0, tile.col_off + c0, r1 - r0, c1 - c0))
            if part is None:
                continue
            dst, src = part
            classes = d["classes"][src]
            pred[dst], conf[dst], valid[dst] = classes, d["confidence"][src], classes != MASK_NODATA
            if d["alone_probs"] is not None:
                probs[(slice(None), *dst)] = d["alone_probs"][(slice(None), *src)]
        probs[:, ~valid] = np.nan
        return Block(np.where(valid, pred, 0).astype(np.int64), conf.astype(np.float32), valid, probs)


def _class_map_u8(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Class map (uint8, nodata where NaN) and float16 confidence of float16 probabilities: what
    blending gives where one tile alone covers a pixel."""
    pred, conf = class_map(np.nan_to_num(probs.astype(np.float32), nan=0.0))
    return {"classes": np.where(np.isnan(probs[0]), MASK_NODATA, pred).astype(np.uint8),
            "confidence": conf.astype(np.float16)}


def _overlap(window: Window, rect: Window) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """(slices in ``window``, slices in ``rect``) of their intersection, None when they do not meet."""
    r0, c0, h, w = window
    a0, b0 = max(r0, rect[0]), max(c0, rect[1])
    a1, b1 = min(r0 + h, rect[0] + rect[2]), min(c0 + w, rect[1] + rect[3])
    if a1 <= a0 or b1 <= b0:
        return None
    return (np.s_[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0], np.s_[a0 - rect[0] : a1 - rect[0], b0 - rect[1] : b1 - rect[1]])


class CoreTiles:
    """Tiles' cores only: class map and confidence as uint8 (probabilities only when written)."""

    ext = "npz"

    def __init__(self, task: dict[str, Any]) -> None:
        self.probs = bool(task.get("prob_url"))
        self.u8 = task.get("prob_dtype", "uint8") == "uint8"

    def encode(self, probs: np.ndarray, valid: np.ndarray, tile: Tile) -> bytes:
        core = (slice(None), *tile.core_slices)
        p, ok = np.asarray(probs)[core].astype(np.float32), np.asarray(valid, bool)[tile.core_slices]
        pred, conf = class_map(p)
        arrays = {"classes": np.where(ok, pred, MASK_NODATA).astype(np.uint8),
                  "confidence": np.rint(conf * PROB_SCALE).astype(np.uint8)}
        if self.probs:  # uint8 output: the output's own rounding, done once here
            arrays["probs"] = np.rint(p * PROB_SCALE).astype(np.uint8) if self.u8 else p.astype(np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def block(self, window: Window, tiles: Iterable[tuple[Tile, dict[str, np.ndarray]]]) -> Block:
        r0, c0, h, w = window
        classes = np.full((h, w), MASK_NODATA, np.uint8)
        conf = np.zeros((h, w), np.float32)
        probs = None
        for tile, core in tiles:
            part = _overlap(window, tile.core)
            if part is None:
                continue
            dst, src = part
            classes[dst], conf[dst] = core["classes"][src], core["confidence"][src] / PROB_SCALE
            if "probs" in core:
                if probs is None:
                    probs = np.full((len(core["probs"]), h, w), np.nan, np.float32)
                probs[(slice(None), *dst)] = core["probs"][(slice(None), *src)] / (PROB_SCALE if self.u8 else 1.0)
        valid = classes != MASK_NODATA
        if probs is not None:
            probs[:, ~valid] = np.nan
        return Block(np.where(valid, classes, 0).astype(np.int64), conf, valid, probs)


def tile_blobs(task: dict[str, Any]) -> StripTiles | CoreTiles:
    """The representation the run's ``blend`` setting asks for."""
    return CoreTiles(task) if task["blend"] == "core" else StripTiles(task)
