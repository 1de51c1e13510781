"""What a predicted tile leaves in the work area for stitching, and how blocks are made from it:
one object per representation, chosen by the ``blend`` setting (``tile_blobs(task)``).

- ``BlendedTiles`` (``blend: cosine | linear``): the whole tile's float16 class probabilities
  (NaN where nodata), blended over the overlaps (``tiling.stitch_window``). ``2 K`` bytes per
  tile pixel: ~2.6 MB for a 512² tile of 5 classes.
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


class BlendedTiles:
    """Whole tiles' float16 probabilities, blended where tiles overlap."""

    ext = "npy"

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task  # the grid, read when stitching (writing needs none of it)

    def encode(self, probs: np.ndarray, valid: np.ndarray, tile: Tile) -> bytes:
        probs = np.array(probs, dtype=np.float16)  # writable copy
        probs[:, ~valid] = np.nan
        buf = io.BytesIO()
        np.save(buf, probs, allow_pickle=False)
        return buf.getvalue()

    def decode(self, data: bytes) -> Any:
        return np.load(io.BytesIO(data), allow_pickle=False)

    def block(self, window: Window, tiles: Iterable[tuple[Tile, Any]]) -> Block:
        t = self.task
        probs = stitch_window(window, tiles, int(t["vheight"]), int(t["vwidth"]), int(t["overlap"]), t["blend"],
                              int(t["margin"]))
        valid = ~np.isnan(probs[0])
        pred, conf = class_map(np.nan_to_num(probs, nan=0.0))
        return Block(pred, conf, valid, probs)


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
            cr, cc, ch, cw = tile.core
            a0, b0 = max(r0, cr), max(c0, cc)
            a1, b1 = min(r0 + h, cr + ch), min(c0 + w, cc + cw)
            if a1 <= a0 or b1 <= b0:
                continue
            dst, src = np.s_[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0], np.s_[a0 - cr : a1 - cr, b0 - cc : b1 - cc]
            classes[dst], conf[dst] = core["classes"][src], core["confidence"][src] / PROB_SCALE
            if "probs" in core:
                if probs is None:
                    probs = np.full((len(core["probs"]), h, w), np.nan, np.float32)
                probs[(slice(None), *dst)] = core["probs"][(slice(None), *src)] / (PROB_SCALE if self.u8 else 1.0)
        valid = classes != MASK_NODATA
        if probs is not None:
            probs[:, ~valid] = np.nan
        return Block(np.where(valid, classes, 0).astype(np.int64), conf, valid, probs)


def tile_blobs(task: dict[str, Any]) -> BlendedTiles | CoreTiles:
    """The representation the run's ``blend`` setting asks for."""
    return CoreTiles(task) if task["blend"] == "core" else BlendedTiles(task)
