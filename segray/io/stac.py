"""STAC catalogs and APIs as a source of scenes (``source.stac``): one ``Sample`` per item.

An item's band assets (one COG each, maybe at different resolutions) become one scene through a
GDAL VRT on one grid, the first asset's or ``resolution``: GDAL resamples the other assets (each
source's ``resampling``), applies ``raster:bands`` scale/offset, skips source nodata, and reads
only the windows asked for. The VRT is XML text, which GDAL opens as a dataset name, so every
reader of scenes (tile reads, chips, headers) takes an item as it takes a GeoTIFF. An item that
cannot become a scene keeps its reason in ``Sample.error`` ("kind: message"; kinds
``missing_asset``, ``not_cog``, ``unreadable``, ``crs``) and becomes an error row downstream.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional
from xml.sax.saxutils import escape

import pystac
from pystac.stac_io import DefaultStacIO
from rasterio.crs import CRS

from segray.config import StacSourceConfig, StorageOptions
from segray.io.fs import Sample, get_fs, write_bytes
from segray.io.raster import RasterInfo, gdal_env, gdal_path, is_cog, open_info
from segray.io.stac_search import search_items

__all__ = ["FsspecStacIO", "item_sample", "stac_samples", "search_items"]

_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


class FsspecStacIO(DefaultStacIO):
    """pystac's reads and writes through fsspec: s3:// with the run's storage options."""

    def __init__(self, storage: StorageOptions | None = None):
        super().__init__()
        self.storage = storage

    def read_text_from_href(self, href: str) -> str:
        if href.startswith(("http://", "https://")):
            return super().read_text_from_href(href)
        fs, path = get_fs(href, self.storage)
        return fs.cat_file(path).decode("utf-8")

    def write_text_to_href(self, href: str, txt: str) -> None:
        write_bytes(href, txt.encode("utf-8"), self.storage)


class ItemError(Exception):
    """Why an item is no scene; ``str()`` is the row's ``error`` ("kind: message")."""


@dataclass(frozen=True)
class Band:
    key: str
    url: str
    info: RasterInfo
    scale: float
    offset: float
    nodata: Optional[float]
    resampling: str


@dataclass(frozen=True)
class Grid:
    crs: str
    transform: tuple[float, ...]  # affine a, b, c, d, e, f (north-up: b = d = 0)
    width: int
    height: int


def _number(v) -> Optional[float]:
    return None if v is None else float(v)  # STAC writes "nan" / "inf" as strings, float() reads both


def asset_url(asset: pystac.Asset) -> str:
    """An absolute href as written (an API's items name local paths too), else resolved from the item."""
    if "://" in asset.href or asset.href.startswith("/"):
        return asset.href
    return asset.get_absolute_href() or asset.href


def _band(item: pystac.Item, key: str, cfg: StacSourceConfig, env: dict) -> Band:
    asset = item.assets[key]
    url = asset_url(asset)
    try:
        cog = is_cog(url, env)
        info = open_info(url, env)
    except Exception as exc:
        raise ItemError(f"unreadable: asset {key} ({url}): {str(exc).splitlines()[0][:200]}") from None
    if not cog:
        raise ItemError(f"not_cog: asset {key} ({url}) is not a cloud-optimised GeoTIFF")
    if info.count != 1:
        raise ItemError(f"unreadable: asset {key} ({url}) has {info.count} bands, one per asset expected")
    rb = (asset.extra_fields.get("raster:bands") or [{}])[0]
    nodata = _number(rb.get("nodata", info.nodata))
    return Band(key, url, info, float(rb.get("scale", 1.0)), float(rb.get("offset", 0.0)), nodata,
                cfg.asset_resampling.get(key, cfg.resampling))


def _grid(first: RasterInfo, resolution: float | None) -> Grid:
    a, b, c, d, e, f = first.transform
    if b or d:
        raise ItemError(f"crs: asset grid of {first.path} is rotated; only north-up grids stack")
    if not first.crs:
        raise ItemError(f"crs: asset {first.path} has no CRS")
    if resolution is None:
        return Grid(first.crs, first.transform, first.width, first.height)
    width = math.ceil(round(first.width * a / resolution, 6))
    height = math.ceil(round(first.height * -e / resolution, 6))
    return Grid(first.crs, (resolution, 0.0, c, 0.0, -resolution, f), width, height)


def _dtype(bands: list[Band]) -> str:
    scaled = any(b.scale != 1.0 or b.offset != 0.0 for b in bands)
    dtypes = {b.info.dtype for b in bands}
    if scaled or len(dtypes) > 1 or next(iter(dtypes)) not in _GDAL_TYPES:
        return "Float32"
    return _GDAL_TYPES[next(iter(dtypes))]


def _band_xml(i: int, band: Band, grid: Grid, dtype: str) -> str:
    src, (ga, _, gc, _, ge, gf) = band.info, grid.transform
    sa, _, sc, _, se, sf = src.transform
    dst = dict(xOff=(sc - gc) / ga, yOff=(gf - sf) / -ge, xSize=src.width * sa / ga, ySize=src.height * se / ge)
    parts = [f'<VRTRasterBand dataType="{dtype}" band="{i}">', f"<Description>{escape(band.key)}</Description>"]
    if band.nodata is not None:  # scaled like the data: the one value that raw nodata maps to
        parts.append(f"<NoDataValue>{band.nodata * band.scale + band.offset!r}</NoDataValue>")
    parts += [f'<ComplexSource resampling="{band.resampling}">',
              f'<SourceFilename relativeToVRT="0">{escape(gdal_path(band.url))}</SourceFilename>',
              "<SourceBand>1</SourceBand>",
              f'<SrcRect xOff="0" yOff="0" xSize="{src.width}" ySize="{src.height}"/>',
              "<DstRect " + " ".join(f'{k}="{v!r}"' for k, v in dst.items()) + "/>"]
    if band.nodata is not None:
        parts.append(f"<NODATA>{band.nodata!r}</NODATA>")
    if band.scale != 1.0 or band.offset != 0.0:
        parts.append(f"<ScaleOffset>{band.offset!r}</ScaleOffset><ScaleRatio>{band.scale!r}</ScaleRatio>")
    parts.append("</ComplexSource></VRTRasterBand>")
    return "".join(parts)


def vrt_xml(grid: Grid, bands: list[Band]) -> str:
    """The VRT that stacks ``bands`` on ``grid`` (GDAL resamples, scales and masks per source)."""
    a, b, c, d, e, f = grid.transform
    dtype = _dtype(bands)
    return "".join([f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">',
                    f"<SRS>{escape(CRS.from_string(grid.crs).to_wkt())}</SRS>",
                    f"<GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>",
                    *(_band_xml(i, band, grid, dtype) for i, band in enumerate(bands, 1)), "</VRTDataset>"])


def item_href(item: pystac.Item) -> str:
    return item.get_self_href() or f"{item.collection_id or ''}/{item.id}"


def item_version(item: pystac.Item, cfg: StacSourceConfig) -> str:
    """What changes when the item does: its ``updated`` time (else ``datetime``) and asset hrefs."""
    keys = [*cfg.assets, *([cfg.label_asset] if cfg.label_asset else [])]
    hrefs = [item.assets[k].href if k in item.assets else None for k in keys]
    stamp = item.properties.get("updated") or item.properties.get("datetime")
    return hashlib.sha1(json.dumps([stamp, hrefs]).encode()).hexdigest()[:16]


def item_sample(item: pystac.Item, cfg: StacSourceConfig, env: dict) -> Sample:
    """The scene of one item: a VRT over its band assets, or the reason it cannot be one."""
    base = dict(image_id=item.id, source=item_href(item), version=item_version(item, cfg))
    label = item.assets.get(cfg.label_asset) if cfg.label_asset else None
    mask = asset_url(label) if label is not None else None
    try:
        missing = [k for k in cfg.assets if k not in item.assets]
        if missing:
            raise ItemError(f"missing_asset: item {item.id} has no asset {missing[0]!r} "
                            f"(has {sorted(item.assets)})")
        bands = [_band(item, key, cfg, env) for key in cfg.assets]
        grid = _grid(bands[0].info, cfg.resolution)
        other = next((b for b in bands if b.info.crs != grid.crs), None)
        if other is not None:
            raise ItemError(f"crs: asset {other.key} is in {other.info.crs}, asset {bands[0].key} in {grid.crs}")
        return Sample(image=vrt_xml(grid, bands), mask=mask, **base)
    except ItemError as exc:
        return Sample(image="", mask=mask, error=str(exc), **base)


def stac_samples(cfg: StacSourceConfig, storage: StorageOptions | None = None, threads: int = 8) -> list[Sample]:
    """Every item the catalog or search gives, in a stable order (collection, id), as a Sample;
    asset headers are read a few items at a time (headers only, never pixels)."""
    items = search_items(cfg, FsspecStacIO(storage))
    env = gdal_env(storage)
    with ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        return list(pool.map(lambda item: item_sample(item, cfg, env), items))
