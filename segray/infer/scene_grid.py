"""The tile grid of a scene, shared by every scene step (semantic and instance): the virtual
extent, the grid's tiles and which touch a window, the work-area blob names, and the class map
of per-pixel probabilities.

Tiles come from ``tiling.tile_grid`` over a *virtual* extent that may exceed the scene by
less than ``align`` pixels, so that every tile offset is a multiple of the model's
downsampling factor (pooling grids line up: tiled == untiled away from tile edges). Pixels
beyond the scene are read as nodata and never written.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from segray.core.tiling import Tile, Window, tile_grid
from segray.io.fs import join
from segray.io.raster import open_info

MASK_NODATA = 255  # class maps are uint8; 255 marks nodata
PROB_NODATA_U8 = 255  # uint8 probabilities are round(p * 254)
PROB_SCALE = 254.0


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


def blob_url(blob_dir: str, tile_index: int, ext: str = "npy") -> str:
    return join(blob_dir, f"{tile_index:07d}.{ext}")


def class_map(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class ids int64, confidence of the chosen class) from ``[K, h, w]`` probabilities."""
    if probs.shape[0] == 1:
        p = probs[0]
        pred = p > 0.5
        return pred.astype(np.int64), np.where(pred, p, 1 - p)
    return probs.argmax(axis=0), probs.max(axis=0)


def ensure_parent(url: str) -> None:
    """GDAL creates files, not folders: make a local output's folder first."""
    import os

    if "://" not in url or url.startswith("file://"):
        os.makedirs(os.path.dirname(os.path.abspath(url.removeprefix("file://"))), exist_ok=True)
