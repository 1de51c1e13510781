"""Synthetic GeoTIFF/COG scenes for tests and benchmarks: real files, written by GDAL.

Every pixel is a function of its coordinates (:func:`scene_pattern`), so any window can be
regenerated to check what a pipeline read or wrote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segray.core.tiling import Window, blocks
from segray.io.raster import CogBlockWriter, RasterInfo, open_info


def scene_pattern(window: Window, count: int, dtype: str = "uint16") -> np.ndarray:
    """Deterministic image-like values of a synthetic scene in ``window`` (``[count, h, w]``):
    any window can be regenerated to check what was read."""
    row_off, col_off, h, w = window
    r = np.arange(row_off, row_off + h, dtype=np.int64)[:, None]
    c = np.arange(col_off, col_off + w, dtype=np.int64)[None, :]
    base = ((r // 16) * 7 + (c // 16) * 13) % 64 * 40 + (r * 31 + c * 17) % 97  # patches + texture
    values = np.stack([(base + 300 * b) % 4096 for b in range(count)])
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (values / 4096).astype(dt)
    return (values % (int(np.iinfo(dt).max) + 1)).astype(dt)


def make_test_cog(
    url: str,
    height: int,
    width: int,
    count: int,
    dtype: str = "uint16",
    crs: str = "EPSG:32616",
    transform=(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0),
    nodata: float | None = None,
    blocksize: int = 512,
    env: dict[str, Any] | None = None,
) -> RasterInfo:
    """Write ``scene_pattern`` as a COG block by block (never whole in memory)."""
    with CogBlockWriter(url, height, width, count, dtype, crs, transform, nodata, blocksize, env=env) as writer:
        for window in blocks(height, width, blocksize):
            writer.write(window, scene_pattern(window, count, dtype))
    return open_info(url, env)
