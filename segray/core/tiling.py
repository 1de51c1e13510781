"""Tiling with overlap and seam-free stitching for scenes larger than one model input.

Windows are ``(row_off, col_off, height, width)`` tuples in scene pixels, the same order as
``segray.io.raster.read_window``. Predictions are ``[K, h, w]`` per tile.

Why blending needs a margin: a fully-convolutional model sees zero padding at every tile
edge, so its outputs within its receptive-field radius of an *interior* tile edge differ from
the untiled prediction. ``margin`` gives those pixels a weight of ``EPS`` (not 0, so the weight
sum never vanishes); the cosine/linear ramp then spans ``overlap - 2 * margin`` pixels, where
two neighbouring tiles' ramps sum to 1. With ``margin >= radius`` and ``overlap > 2 * margin``
the stitched result equals the untiled prediction up to float rounding and ``EPS``.

Streaming (memory per output block, not per scene): predict every tile once, then for each
output block from ``blocks(height, width, block_size)`` gather ``tiles_touching(tiles, block)``
with their predictions and call ``stitch_window(block, ...)``. Blocks aligned to the output
COG's block size are written exactly once. Weights depend only on a tile's position, so every
block computes the same blend as a whole-scene ``Stitcher``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Literal

import numpy as np
import torch

Window = tuple[int, int, int, int]
BlendKind = Literal["cosine", "linear", "uniform"]

EPS = 1e-6  # weight of untrusted edge pixels: negligible, but keeps weight sums positive


@dataclass(frozen=True)
class Tile:
    """A tile window in the scene plus the core region (scene coordinates) it owns.

    Cores partition the scene (split at the middle of each overlap), so per-tile outputs
    cropped to ``core_slices`` (e.g. class maps or polygons) abut without duplicates.
    """

    row_off: int
    col_off: int
    height: int
    width: int
    core_row_off: int
    core_col_off: int
    core_height: int
    core_width: int

    @property
    def window(self) -> Window:
        return (self.row_off, self.col_off, self.height, self.width)

    @property
    def core(self) -> Window:
        return (self.core_row_off, self.core_col_off, self.core_height, self.core_width)

    @property
    def slices(self) -> tuple[slice, slice]:
        """Scene slices of the tile: ``scene[..., *tile.slices]``."""
        return (slice(self.row_off, self.row_off + self.height), slice(self.col_off, self.col_off + self.width))

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Slices of the core inside the tile's own array."""
        r, c = self.core_row_off - self.row_off, self.core_col_off - self.col_off
        return (slice(r, r + self.core_height), slice(c, c + self.core_width))

    @property
    def alone_slices(self) -> tuple[slice, slice]:
        """Slices (of the tile's own array) holding only pixels no other tile of the grid covers.
        Cores split each overlap at its middle, so a neighbour reaches at most ``2 * inset + 1``
        px into the tile where its core is ``inset`` px in from that edge (a core clipped to the
        scene only makes the bound looser); empty where neighbours cover everything."""
        top, left = self.core_row_off - self.row_off, self.core_col_off - self.col_off
        bottom = self.row_off + self.height - self.core_row_off - self.core_height
        right = self.col_off + self.width - self.core_col_off - self.core_width

        def span(start_inset: int, end_inset: int, n: int) -> slice:
            a = 2 * start_inset + 1 if start_inset else 0
            b = n - (2 * end_inset + 1 if end_inset else 0)
            return slice(a, max(a, b))

        return span(top, bottom, self.height), span(left, right, self.width)


def _axis(size: int, tile_size: int, stride: int) -> tuple[list[int], list[tuple[int, int]], int]:
    """Tile offsets, core (start, stop) per tile and tile length along one axis."""
    if size <= tile_size:
        return [0], [(0, size)], size
    offsets = list(range(0, size - tile_size + 1, stride))
    if offsets[-1] != size - tile_size:  # shift the last tile back so it ends at the border
        offsets.append(size - tile_size)
    # split each overlap in the middle: tile i owns [cuts[i], cuts[i + 1])
    cuts = [0] + [(nxt + cur + tile_size) // 2 for cur, nxt in zip(offsets, offsets[1:])] + [size]
    return offsets, list(zip(cuts, cuts[1:])), tile_size


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> list[Tile]:
    """Row-major tiles of ``tile_size`` with stride ``tile_size - overlap`` covering the scene.

    The last row/column is shifted back to end at the border, so every tile is full size when
    the scene is at least ``tile_size``; a smaller axis gives one tile of the scene's size
    (pad it with ``pad_to`` for the model, crop the prediction with ``crop_to``).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"scene must be non-empty, got {height}x{width}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile_size ({tile_size}), got {overlap}")
    stride = tile_size - overlap
    rows, row_cores, th = _axis(height, tile_size, stride)
    cols, col_cores, tw = _axis(width, tile_size, stride)
    return [
        Tile(r, c, th, tw, r0, c0, r1 - r0, c1 - c0)
        for r, (r0, r1) in zip(rows, row_cores)
        for c, (c0, c1) in zip(cols, col_cores)
    ]


def pad_to(array: np.ndarray | torch.Tensor, size: int | tuple[int, int], value: float = 0.0):
    """Pad the last two axes at the bottom/right up to ``size`` with a constant ``value``."""
    h, w = (size, size) if isinstance(size, int) else size
    ph, pw = h - array.shape[-2], w - array.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"array {tuple(array.shape[-2:])} is larger than {(h, w)}")
    if isinstance(array, torch.Tensor):
        return torch.nn.functional.pad(array, (0, pw, 0, ph), value=value)
    return np.pad(array, [(0, 0)] * (array.ndim - 2) + [(0, ph), (0, pw)], constant_values=value)


def crop_to(array: np.ndarray | torch.Tensor, height: int, width: int):
    """Inverse of ``pad_to``: keep the top-left ``height x width`` of the last two axes."""
    return array[..., :height, :width]


def _ramp(n: int, overlap: int, kind: BlendKind, margin: int, start: bool, end: bool) -> np.ndarray:
    """1-D weights of length ``n``, falling off at the ``start``/``end`` sides that are interior."""
    if kind not in ("cosine", "linear", "uniform"):
        raise ValueError(f"kind must be 'cosine', 'linear' or 'uniform', got {kind!r}")
    if margin < 0 or (margin and overlap <= 2 * margin):
        raise ValueError(f"need margin >= 0 and overlap > 2 * margin, got overlap={overlap}, margin={margin}")
    idx = np.arange(n, dtype=np.float64)
    dist = np.full(n, np.inf)  # distance to the nearest interior edge
    if start:
        dist = np.minimum(dist, idx)
    if end:
        dist = np.minimum(dist, n - 1 - idx)
    if kind == "uniform" or overlap == 0:
        w = np.ones(n)
    else:
        # x runs 0 -> 1 over the overlap minus both margins, so facing ramps sum to 1
        x = np.clip((dist - margin) / max(overlap - 2 * margin - 1, 1), 0.0, 1.0)
        w = np.sin(0.5 * np.pi * x) ** 2 if kind == "cosine" else x
    w[dist < margin] = 0.0
    return w


@lru_cache(maxsize=64)
def _weights(h: int, w: int, overlap: int, kind: BlendKind, margin: int, sides: tuple[bool, ...]) -> np.ndarray:
    top, bottom, left, right = sides
    rows, cols = _ramp(h, overlap, kind, margin, top, bottom), _ramp(w, overlap, kind, margin, left, right)
    out = np.maximum(np.outer(rows, cols), EPS).astype(np.float32)
    out.flags.writeable = False  # shared through the cache
    return out


def blend_weights(tile_size: int, overlap: int, kind: BlendKind = "cosine", margin: int = 0) -> np.ndarray:
    """``float32 [T, T]`` weights of an interior tile: 1 inside, falling to ``EPS`` toward
    every edge over ``overlap`` pixels, the outer ``margin`` of which stay at ``EPS``."""
    return _weights(tile_size, tile_size, overlap, kind, margin, (True, True, True, True))


def tile_weights(
    tile: Tile, scene_h: int, scene_w: int, overlap: int, kind: BlendKind = "cosine", margin: int = 0
) -> np.ndarray:
    """Blend weights for ``tile``, keeping full weight on sides that touch the scene edge
    (no neighbour will cover those pixels)."""
    sides = (
        tile.row_off > 0,
        tile.row_off + tile.height < scene_h,
        tile.col_off > 0,
        tile.col_off + tile.width < scene_w,
    )
    return _weights(tile.height, tile.width, overlap, kind, margin, sides)


def _intersect(a: Window, b: Window) -> Window | None:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (r0, c0, r1 - r0, c1 - c0) if r1 > r0 and c1 > c0 else None


class Stitcher:
    """Weighted average of overlapping tile predictions over ``window`` (default: the scene).

    Memory is ``(K + 1) * h * w`` float32 for the window, so a whole-scene Stitcher suits scenes
    that fit in memory; for larger ones stitch per block with ``stitch_window``.
    """

    def __init__(
        self,
        num_channels: int,
        height: int,
        width: int,
        overlap: int,
        kind: BlendKind = "cosine",
        margin: int = 0,
        window: Window | None = None,
    ) -> None:
        self.height, self.width, self.overlap, self.kind, self.margin = height, width, overlap, kind, margin
        self.window = window or (0, 0, height, width)
        if _intersect(self.window, (0, 0, height, width)) != self.window:
            raise ValueError(f"window {self.window} is not inside the {height}x{width} scene")
        h, w = self.window[2:]
        self._sum = np.zeros((num_channels, h, w), np.float32)
        self._weight = np.zeros((h, w), np.float32)

    def add(self, tile: Tile, values: np.ndarray | torch.Tensor) -> None:
        """Accumulate ``values [K, tile.height, tile.width]`` (crop padded predictions first)."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (self._sum.shape[0], tile.height, tile.width):
            raise ValueError(f"values {values.shape} != {(self._sum.shape[0], tile.height, tile.width)} (K, tile h, w)")
        part = _intersect(tile.window, self.window)
        if part is None:
            return
        r, c, h, w = part
        src = (slice(r - tile.row_off, r - tile.row_off + h), slice(c - tile.col_off, c - tile.col_off + w))
        dst = (slice(r - self.window[0], r - self.window[0] + h), slice(c - self.window[1], c - self.window[1] + w))
        weight = tile_weights(tile, self.height, self.width, self.overlap, self.kind, self.margin)[src]
        self._sum[(slice(None), *dst)] += values[(slice(None), *src)] * weight
        self._weight[dst] += weight

    def result(self) -> np.ndarray:
        """``float32 [K, h, w]``: weighted sum / weight; fails if a pixel got no tile."""
        if not self._weight.all():
            raise ValueError("some pixels of the window are covered by no added tile")
        return self._sum / self._weight


def blocks(height: int, width: int, block_size: int) -> list[Window]:
    """Non-overlapping row-major output blocks (the last row/column truncated at the border)."""
    return [
        (r, c, min(block_size, height - r), min(block_size, width - c))
        for r in range(0, height, block_size)
        for c in range(0, width, block_size)
    ]


def tiles_touching(tiles: Iterable[Tile], window: Window) -> list[Tile]:
    """The tiles whose window intersects ``window``: all a block needs to be stitched."""
    return [t for t in tiles if _intersect(t.window, window) is not None]


def stitch_window(
    window: Window,
    tiles_with_values: Iterable[tuple[Tile, np.ndarray | torch.Tensor]],
    height: int,
    width: int,
    overlap: int,
    kind: BlendKind = "cosine",
    margin: int = 0,
) -> np.ndarray:
    """Stitch one output ``window`` of a ``height x width`` scene from the tiles touching it.

    Gives the same values as the whole-scene ``Stitcher`` restricted to ``window``.
    """
    stitcher = None
    for tile, values in tiles_with_values:
        if stitcher is None:
            stitcher = Stitcher(len(values), height, width, overlap, kind, margin, window)
        stitcher.add(tile, values)
    if stitcher is None:
        raise ValueError(f"no tiles given for window {window}")
    return stitcher.result()
