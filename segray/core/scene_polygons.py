"""Polygons of class maps too large to hold in memory, built block by block.

``BlockPolygonizer`` takes the blocks of a scene's class map in row-major order. It
polygonises each block in *pixel* coordinates (integer pixel corners, so shared edges are
exact), emits at once the polygons that touch no interior block border, and keeps the others
pending. Pieces that meet across block borders are grouped by comparing pixel ids along the
borders; at the end of each block row the groups that cannot grow any more (they do not reach
the next row) are dissolved, once each, and emitted. Pending pieces belong to regions that
cross the current block-row border, so memory follows the scene's width, not its area.

Each polygon carries its pixel count and the sum of a per-pixel score (e.g. the predicted
class's probability), so merged polygons get an exact pixel-weighted mean score.

``geoparquet_metadata``/``POLYGON_SCHEMA`` describe the GeoParquet 1.1 files the scene
pipeline writes: WKB ``geometry``, a ``bbox`` covering column, one row per polygon.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import rasterio.features
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine
from shapely.geometry.base import BaseGeometry

from segray.core.polygons import mask_to_polygons
from segray.core.tiling import Window

_PIXELS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # identity: x = column, y = row


@dataclass
class Piece:
    """A polygon in scene pixel coordinates (x = column, y = row) with its statistics.

    ``whole`` is False for the pieces of a region too large to dissolve (``max_vertices``).
    """

    geom: BaseGeometry
    class_id: int
    pixels: float
    score_sum: float
    whole: bool = True

    @property
    def score(self) -> float:
        return self.score_sum / self.pixels if self.pixels else float("nan")


class BlockPolygonizer:
    """Polygons of a ``height x width`` class map fed block by block (see the module doc).

    Call ``add`` for the blocks of a row from left to right, then ``end_row``; rows from top
    to bottom. Both return the polygons that are complete (at least ``min_pixels`` pixels).

    Which pieces form one region is decided on pixels, not geometry: the piece ids along each
    block's left and top edges are compared with those of the neighbouring block (same class,
    4-connected), and a union-find joins them. A region's pieces are dissolved once, when it is
    complete. A region that grows past ``max_vertices`` (a class that percolates through the
    scene as one web with countless holes: dissolving it costs minutes per million vertices)
    is emitted as its per-block pieces, flagged ``whole=False``, and so is what later joins it.
    The same happens to the largest open regions while all pending pieces together hold more
    than ``max_pending_vertices`` (regions running the whole height of the scene would
    otherwise be held to its bottom): memory stays bounded whatever the prediction looks like.
    """

    def __init__(self, height: int, width: int, ignore: Sequence[int] = (0,), nodata: int | None = None,
                 min_pixels: int = 0, max_vertices: int = 100_000, max_pending_vertices: int | None = None,
                 top: int = 0) -> None:
        self.height, self.width, self.top = height, width, top
        self.ignore, self.nodata, self.min_pixels = tuple(ignore), nodata, min_pixels
        self.max_vertices = max_vertices
        self.max_pending_vertices = max_pending_vertices or 20 * max_vertices
        self._pieces: dict[int, Piece] = {}  # pending, by id
        self._parent: dict[int, int] = {}
        self._next = 0
        self._top = np.full(width, -1, np.int64)  # piece ids along the bottom edge of the previous block row
        self._bottom = np.full(width, -1, np.int64)  # ... being collected for the current row
        self._left: np.ndarray | None = None  # piece ids along the right edge of the previous block
        self._cut: set[int] = set()  # ids emitted as parts: what joins them is a part too
        self._cut_top: set[int] = set()  # ... of pieces on the band's top row
        self._band_top = np.full(width, -1, np.int64)  # piece ids along the band's top row (top > 0)
        self.max_pending = 0  # most pieces held at once (memory check)

    def _find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:  # path compression
            self._parent[i], i = root, self._parent[i]
        return root

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the pieces meeting across an edge (``a[k]`` and ``b[k]`` are neighbours)."""
        both = (a >= 0) & (b >= 0)
        for i, j in set(zip(a[both].tolist(), b[both].tolist())):
            if i in self._cut and j in self._pieces:
                self._pieces[j].whole = False
                continue
            if i not in self._pieces or j not in self._pieces:
                continue
            if self._pieces[i].class_id != self._pieces[j].class_id:
                continue
            ri, rj = self._find(i), self._find(j)
            if ri != rj:
                self._parent[max(ri, rj)] = min(ri, rj)

    def _keep(self, pieces: list[Piece]) -> list[Piece]:
        return [p for p in pieces if p.pixels >= self.min_pixels]

    def add(self, window: Window, class_map: np.ndarray, scores: np.ndarray | None = None) -> list[Piece]:
        r0, c0, h, w = window
        if class_map.shape != (h, w):
            raise ValueError(f"class map {class_map.shape} does not match window {window}")
        rows = mask_to_polygons(class_map, _PIXELS, ignore=self.ignore, nodata=self.nodata, offset=(r0, c0))
        ids = np.zeros((h, w), np.int32)
        if rows:  # which piece each pixel belongs to (pixel centres lie strictly inside pixel-edge polygons)
            ids = rasterio.features.rasterize(
                zip([g for g, _ in rows], range(1, len(rows) + 1)), out_shape=(h, w),
                transform=Affine(1, 0, c0, 0, 1, r0), fill=0, dtype="int32",
            )  # fmt: skip
        pixels = np.bincount(ids.ravel(), minlength=len(rows) + 1)[1:]
        sums = (np.bincount(ids.ravel(), weights=scores.astype(np.float64).ravel(), minlength=len(rows) + 1)[1:]
                if scores is not None else np.zeros(len(rows)))
        gid = np.full(len(rows) + 1, -1, np.int64)  # local id -> global id (pending pieces only)
        done: list[Piece] = []
        for k, ((geom, class_id), n, sm) in enumerate(zip(rows, pixels, sums), start=1):
            piece = Piece(geom, class_id, float(n), float(sm))
            x0, y0, x1, y1 = geom.bounds
            border = (x0 <= c0 and c0 > 0) or (x1 >= c0 + w and c0 + w < self.width) \
                or (y0 <= r0 and r0 > 0) or (y1 >= r0 + h and r0 + h < self.height)  # fmt: skip
            if not border:
                done.append(piece)
                continue
            gid[k] = self._next
            self._pieces[self._next] = piece
            self._parent[self._next] = self._next
            self._next += 1
        edge = gid[ids]  # -1 where no pending piece
        if c0 > 0 and self._left is not None:
            self._join(self._left, edge[:, 0])
        if r0 > 0:
            self._join(self._top[c0 : c0 + w], edge[0, :])
        if r0 == self.top > 0:
            self._band_top[c0 : c0 + w] = edge[0, :]
        self._left = edge[:, -1]
        self._bottom[c0 : c0 + w] = edge[-1, :]
        self.max_pending = max(self.max_pending, len(self._pieces))
        return self._keep(done)

    def end_row(self, row_stop: int) -> list[Piece]:
        """Emit the regions that end above ``row_stop`` (the next row's top) or grew too large."""
        last = row_stop >= self.height
        groups: dict[int, list[int]] = defaultdict(list)
        for i in self._pieces:
            groups[self._find(i)].append(i)
        done: list[Piece] = []
        self._cut = set()
        staying: list[tuple[int, list[int]]] = []  # (vertices, members) of open regions

        def cut(members: list[int]) -> None:  # per-block pieces, undissolved, flagged
            done.extend(Piece(p.geom, p.class_id, p.pixels, p.score_sum, False) for p in map(self._pieces.get, members))
            self._cut.update(i for i in members if self._pieces[i].geom.bounds[3] >= row_stop)
            self._cut_top.update(i for i in members if self._on_top(self._pieces[i]))
            for i in members:
                del self._pieces[i]

        for members in groups.values():
            pieces = [self._pieces[i] for i in members]
            open_ = (not last and any(p.geom.bounds[3] >= row_stop for p in pieces)) or any(map(self._on_top, pieces))
            vertices = int(sum(shapely.get_num_coordinates(p.geom) for p in pieces))
            if len(pieces) > 1 and vertices > self.max_vertices:  # dissolving a web of holes costs minutes
                cut(members)
            elif open_:
                staying.append((vertices, members))
            else:
                done.append(_dissolve(pieces))
                for i in members:
                    del self._pieces[i]
        held = sum(v for v, _ in staying)
        for vertices, members in sorted(staying, key=lambda vm: -vm[0]):  # largest first
            if held <= self.max_pending_vertices:
                break
            cut(members)
            held -= vertices
        self._parent = {i: self._find(i) for i in self._pieces}
        self._parent.update({r: r for r in set(self._parent.values())})
        self._top, self._bottom = self._bottom, np.full(self.width, -1, np.int64)
        self._left = None
        return self._keep(done)

    def finish(self) -> list[Piece]:
        return self.end_row(self.height)

    def _on_top(self, piece: Piece) -> bool:
        """Whether a piece reaches up to the top row of a band that is not the scene's first."""
        return self.top > 0 and piece.geom.bounds[1] <= self.top

    def band_edges(self) -> "BandEdges":
        """After the band's last ``end_row``: the regions still open (they reach the band's top or
        bottom border) as their block pieces, undissolved, and which region every pixel of the two
        border rows belongs to, for ``merge_bands`` to join them with the neighbouring bands'."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i in self._pieces:
            groups[self._find(i)].append(i)
        local = {root: k for k, root in enumerate(groups)}
        regions = [[self._pieces[i] for i in members] for members in groups.values()]

        def ids(edge: np.ndarray, cut: set[int]) -> np.ndarray:
            return np.array([local[self._find(i)] if i in self._pieces else CUT if i in cut else -1
                             for i in edge.tolist()], np.int64)

        return BandEdges(regions, ids(self._band_top, self._cut_top), ids(self._top, self._cut))


CUT = -2  # border id of a region emitted as flagged parts (what joins it is a part too); -1: none


@dataclass
class BandEdges:
    """A band's open regions (block pieces) and their index per column of its top and bottom rows."""

    regions: list[list[Piece]]
    top: np.ndarray
    bottom: np.ndarray


class BandMerger:
    """Joins the open regions of row bands fed top to bottom (``add``), as ``BlockPolygonizer``
    joins block rows: same class, 4-connected across each border, each joined region dissolved
    once when it can grow no further, or emitted as its block pieces flagged ``whole=False`` past
    ``max_vertices``. Only the regions open at the current border are held, at most
    ``max_pending_vertices`` vertices of them (the largest are emitted in parts past that). For
    regions under the budgets, the result is what one polygonizer over the whole scene emits."""

    def __init__(self, max_vertices: int = 100_000, min_pixels: int = 0,
                 max_pending_vertices: int | None = None) -> None:
        self.max_vertices, self.min_pixels = max_vertices, min_pixels
        self.max_pending_vertices = max_pending_vertices or 20 * max_vertices
        self._open: list[list[Piece]] = []  # regions reaching the last band's bottom row
        self._bottom: np.ndarray | None = None  # their index per column of that row (-1, CUT)

    def add(self, band: BandEdges) -> list[Piece]:
        """The next band's open regions; returns the regions now complete."""
        regions, n = self._open + band.regions, len(self._open)
        parent = list(range(len(regions)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        if self._bottom is not None:
            for i, j in set(zip(self._bottom.tolist(), band.top.tolist())):
                if i == CUT and j >= 0 or j == CUT and i >= 0:  # what joins a region cut in parts is a part too
                    for p in regions[n + j if i == CUT else i]:
                        p.whole = False
                elif i >= 0 and j >= 0 and regions[i][0].class_id == regions[n + j][0].class_id:
                    a, b = find(i), find(n + j)
                    parent[max(a, b)] = min(a, b)
        groups: dict[int, list[Piece]] = defaultdict(list)
        for i, region in enumerate(regions):
            groups[find(i)].extend(region)
        below = {find(n + j) for j in set(band.bottom.tolist()) if j >= 0}  # groups reaching the next band
        done: list[Piece] = []
        staying: list[tuple[int, int]] = []  # (vertices, root)
        for root, ps in groups.items():
            vertices = int(sum(shapely.get_num_coordinates(p.geom) for p in ps))
            if len(ps) > 1 and vertices > self.max_vertices:
                done.extend(Piece(p.geom, p.class_id, p.pixels, p.score_sum, False) for p in ps)
            elif root in below:
                staying.append((vertices, root))
            else:
                done.append(_dissolve(ps))
        held, cut = sum(v for v, _ in staying), set()
        for vertices, root in sorted(staying, key=lambda vr: -vr[0]):  # largest first
            if held <= self.max_pending_vertices:
                break
            done.extend(Piece(p.geom, p.class_id, p.pixels, p.score_sum, False) for p in groups[root])
            cut.add(root)
            held -= vertices
        keep = [root for _, root in staying if root not in cut]
        index = {root: k for k, root in enumerate(keep)}  # a group cut in parts is CUT along the border
        self._open = [groups[root] for root in keep]
        self._bottom = np.array([index.get(find(n + j), CUT) if j >= 0 else (CUT if j == CUT else -1)
                                 for j in band.bottom.tolist()], np.int64)
        return [p for p in done if p.pixels >= self.min_pixels]

    def finish(self) -> list[Piece]:
        """The regions still open after the last band (none, when its bottom is the scene's)."""
        done = [_dissolve(ps) for ps in self._open]
        self._open, self._bottom = [], None
        return [p for p in done if p.pixels >= self.min_pixels]


def _dissolve(ps: list[Piece]) -> Piece:
    geom = ps[0].geom if len(ps) == 1 else shapely.union_all([p.geom for p in ps])
    return Piece(geom, ps[0].class_id, sum(p.pixels for p in ps), sum(p.score_sum for p in ps),
                 all(p.whole for p in ps))


def merge_bands(bands: Sequence[BandEdges], max_vertices: int = 100_000, min_pixels: int = 0) -> list[Piece]:
    """``BandMerger`` over a list of bands, top to bottom."""
    merger = BandMerger(max_vertices, min_pixels)
    return [p for band in bands for p in merger.add(band)] + merger.finish()


# --------------------------------------------------------------------------- map coordinates, GeoParquet


def to_map(geoms: Sequence[BaseGeometry], transform) -> np.ndarray:
    """Pixel-space geometries -> map coordinates with the scene's affine ``transform``."""
    a, b, c, d, e, f = tuple(transform)[:6]

    def fn(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])

    return shapely.transform(np.asarray(geoms, dtype=object), fn)


def reproject(geoms: np.ndarray, src_crs: str, dst_crs: str) -> np.ndarray:
    """Reproject geometries with GDAL (rasterio.warp), x/y in the CRS's GIS order."""
    from rasterio.warp import transform_geom

    if not len(geoms):
        return geoms
    out = transform_geom(src_crs, dst_crs, [shapely.geometry.mapping(g) for g in geoms])
    return np.array([shapely.geometry.shape(g) for g in out], dtype=object)


BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
POLYGON_SCHEMA = pa.schema(
    [
        ("geometry", pa.binary()),
        ("bbox", pa.struct([(n, pa.float64()) for n in BBOX_FIELDS])),
        ("scene_id", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("score", pa.float64()),
        ("pixels", pa.int64()),
        ("area", pa.float64()),
        ("whole", pa.bool_()),  # False: a per-block piece of a region too large to dissolve (polygon_max_vertices)
    ]
)


def crs_projjson(crs: str | None) -> dict | None:
    return CRS.from_user_input(crs).to_dict(projjson=True) if crs else None


def geoparquet_metadata(crs: str | None, bbox: Sequence[float] | None = None,
                        geometry_types: Sequence[str] = ("Polygon",)) -> dict[bytes, bytes]:
    """Schema metadata of a GeoParquet 1.1 file (``crs`` None -> null, i.e. unknown)."""
    column: dict = {
        "encoding": "WKB",
        "geometry_types": sorted(geometry_types),
        "crs": crs_projjson(crs),
        "covering": {"bbox": {n: ["bbox", n] for n in BBOX_FIELDS}},
    }
    if bbox is not None:
        column["bbox"] = [float(v) for v in bbox]
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    return {b"geo": json.dumps(geo).encode()}


def polygon_table(pieces: Sequence[Piece], transform, scene_id: str, class_names: Sequence[str],
                  src_crs: str | None = None, dst_crs: str | None = None) -> pa.Table:
    """Rows of ``POLYGON_SCHEMA`` (no file metadata) from pixel-space pieces.

    ``area`` is in the scene CRS's units (before any reprojection to ``dst_crs``).
    """
    geoms = to_map([p.geom for p in pieces], transform)
    area = shapely.area(geoms) if len(geoms) else np.zeros(0)
    if src_crs and dst_crs and CRS.from_user_input(src_crs) != CRS.from_user_input(dst_crs):
        geoms = reproject(geoms, src_crs, dst_crs)
    bounds = shapely.bounds(geoms).reshape(-1, 4) if len(geoms) else np.zeros((0, 4))
    names = list(class_names)
    return pa.table(
        {
            "geometry": pa.array(shapely.to_wkb(geoms, flavor="iso") if len(geoms) else [], pa.binary()),
            "bbox": pa.StructArray.from_arrays([pa.array(bounds[:, i], pa.float64()) for i in range(4)], BBOX_FIELDS),
            "scene_id": pa.array([scene_id] * len(pieces), pa.string()),
            "class_id": pa.array([p.class_id for p in pieces], pa.int32()),
            "class_name": pa.array([names[p.class_id] if 0 <= p.class_id < len(names) else str(p.class_id)
                                    for p in pieces], pa.string()),
            "score": pa.array([p.score for p in pieces], pa.float64()),
            "pixels": pa.array([int(round(p.pixels)) for p in pieces], pa.int64()),
            "area": pa.array(np.asarray(area, np.float64), pa.float64()),
            "whole": pa.array([p.whole for p in pieces], pa.bool_()),
        },
        schema=POLYGON_SCHEMA,
    )
