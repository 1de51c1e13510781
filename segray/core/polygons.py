"""Class maps -> polygons in map coordinates -> GeoParquet 1.1.

For tiled scenes, polygonise each tile's core with the *scene* transform and the core's
``offset``: vertices are integer pixel corners mapped by the same affine arithmetic in every
tile, so edges shared across tile borders are bit-identical and ``merge_polygons`` dissolves
them exactly (no snapping tolerance needed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import rasterio.features
import shapely
from rasterio.crs import CRS
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

Row = tuple[BaseGeometry, int]  # (geometry in map coordinates, class id)


def mask_to_polygons(
    class_map: np.ndarray,
    transform,
    ignore: Sequence[int] = (0,),
    nodata: int | None = None,
    offset: tuple[int, int] = (0, 0),
) -> list[Row]:
    """Polygons of 4-connected regions of equal class, skipping ``ignore`` and ``nodata``.

    ``transform`` (affine a..f) maps scene pixels to map coordinates; ``offset`` is the
    ``(row_off, col_off)`` of ``class_map`` in the scene (a tile core's offset).
    """
    if class_map.ndim != 2:
        raise ValueError(f"class_map must be [H, W], got shape {class_map.shape}")
    if class_map.size and (class_map.min() < np.iinfo(np.int32).min or class_map.max() > np.iinfo(np.int32).max):
        raise ValueError("class ids must fit in int32")
    source = class_map.astype(np.int32, copy=False)  # a dtype GDAL's polygonizer accepts
    keep = ~np.isin(source, list(ignore) + ([nodata] if nodata is not None else []))
    a, b, c, d, e, f = tuple(transform)[:6]
    row_off, col_off = offset

    def to_map(xy: np.ndarray) -> np.ndarray:  # pixel corners (col, row) -> map (x, y)
        col, row = xy[:, 0] + col_off, xy[:, 1] + row_off
        return np.column_stack([a * col + b * row + c, d * col + e * row + f])

    return [
        (shapely.transform(shape(geom), to_map), int(value))
        for geom, value in rasterio.features.shapes(source, mask=keep, connectivity=4)
    ]


def merge_polygons(polys: Iterable[Row]) -> list[Row]:
    """Dissolve same-class polygons that touch or overlap (e.g. across tile borders) and
    split the result back into single polygons."""
    by_class: dict[int, list[BaseGeometry]] = defaultdict(list)
    for geom, class_id in polys:
        by_class[class_id].append(geom)
    return [
        (part, class_id)
        for class_id in sorted(by_class)
        for part in shapely.get_parts(shapely.union_all(by_class[class_id]))
    ]


def to_geoparquet(
    rows: Sequence[Row],
    path: str,
    crs: str | CRS | None,
    bbox: bool = True,
    filesystem: pa.fs.FileSystem | None = None,
) -> None:
    """Write ``(geometry, class_id)`` rows as GeoParquet 1.1: WKB ``geometry``, int32
    ``class_id``, optional per-row ``bbox`` covering column, CRS as PROJJSON (via GDAL)."""
    geoms = np.array([g for g, _ in rows], dtype=object)
    bounds = shapely.bounds(geoms).reshape(-1, 4)
    columns = {
        "geometry": pa.array(shapely.to_wkb(geoms, flavor="iso"), pa.binary()),
        "class_id": pa.array([c for _, c in rows], pa.int32()),
    }
    geo_column = {
        "encoding": "WKB",
        "geometry_types": sorted({g.geom_type for g in geoms}),
        "crs": CRS.from_user_input(crs).to_dict(projjson=True) if crs is not None else None,  # null: unknown
    }
    if len(rows):
        geo_column["bbox"] = [*np.nanmin(bounds[:, :2], axis=0).tolist(), *np.nanmax(bounds[:, 2:], axis=0).tolist()]
    if bbox:
        names = ("xmin", "ymin", "xmax", "ymax")
        columns["bbox"] = pa.StructArray.from_arrays([pa.array(bounds[:, i], pa.float64()) for i in range(4)], names)
        geo_column["covering"] = {"bbox": {n: ["bbox", n] for n in names}}
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": geo_column}}
    table = pa.table(columns).replace_schema_metadata({"geo": json.dumps(geo)})
    pq.write_table(table, path, filesystem=filesystem)
