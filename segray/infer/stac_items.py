"""STAC output of a scenes run (``stac/``): a Collection with one Item per segmented scene.

Each Item's assets are the scene's mask COG (and its probabilities COG where written), with
the projection, raster (classes as ``classification:classes``) and file (checksum, size)
extensions; the run's polygons GeoParquet is a Collection asset. bbox, geometry, datetime
and properties come from the source STAC item, with a ``derived_from`` link to it; a scene
that is no STAC item gets its footprint from its bounds and the run's time. Written before
the commit, so ``_SUCCESS`` publishes the catalog with the rest; asset hrefs are relative,
so the output folder moves as a whole.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

import pystac
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds

from segray.infer.scene_grid import MASK_NODATA
from segray.infer.scene_layout import POLYGONS
from segray.io.fs import Sample, exists, get_fs, join, remove_tree
from segray.io.stac import FsspecStacIO

STAC = "stac"
_CARRIED = ("start_datetime", "end_datetime", "platform", "constellation", "instruments", "gsd", "eo:cloud_cover")


def _multihash(url: str, storage) -> tuple[str, int]:
    """(sha2-256 multihash hex, size) of a file, read in 8 MiB pieces (masks of huge scenes)."""
    fs, path = get_fs(url, storage)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return "1220" + h.hexdigest(), size


def _source_item(sample: Sample, stac_io) -> pystac.Item | None:
    if sample.version is None or not sample.source:  # not from a STAC catalog
        return None
    return pystac.Item.from_file(sample.source, stac_io=stac_io)


def _footprint(row: dict[str, Any]) -> tuple[list[float], dict]:
    w, s, e, n = transform_bounds(row["crs"], "EPSG:4326", *row["bounds"]) if row["crs"] else row["bounds"]
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    return [w, s, e, n], {"type": "Polygon", "coordinates": [ring]}


def _classes(names: list[str]) -> list[Classification]:
    return [Classification.create(value=i, description=name, name=re.sub(r"[^0-9A-Za-z_-]", "_", name) or f"c{i}")
            for i, name in enumerate(names)]


def _add_asset(item: pystac.Item, key: str, url: str, title: str, data_type: DataType, nodata: float, storage,
               classes: list[Classification] | None = None) -> None:
    item.add_asset(key, pystac.Asset(url, title=title, media_type=pystac.MediaType.COG, roles=["data"]))
    asset = item.assets[key]  # extensions need the asset's owner
    RasterExtension.ext(asset, add_if_missing=True).bands = [RasterBand.create(data_type=data_type, nodata=nodata)]
    if classes is not None:
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    checksum, size = _multihash(url, storage)
    file = FileExtension.ext(asset, add_if_missing=True)
    file.checksum, file.size = checksum, size


def scene_item(row: dict[str, Any], sample: Sample, cfg, class_names: list[str], stac_io) -> pystac.Item:
    """The STAC Item of one segmented scene (its row in scenes.parquet, its input Sample)."""
    source = _source_item(sample, stac_io)
    if source is not None:
        bbox, geometry, when = source.bbox, source.geometry, source.datetime
        props = {k: source.properties[k] for k in _CARRIED if k in source.properties}
    else:
        (bbox, geometry), when, props = _footprint(row), dt.datetime.now(dt.timezone.utc), {}
    item = pystac.Item(row["scene_id"], geometry, bbox, when, props)
    item.properties["segray:model_name"], item.properties["segray:checkpoint_id"] = row["model_name"], row["checkpoint_id"]
    _add_asset(item, "mask", row["mask_path"], "class map", DataType.UINT8, MASK_NODATA, cfg.storage,
               _classes(class_names))
    if row.get("probabilities_path"):
        u8 = cfg.probabilities_dtype == "uint8"
        _add_asset(item, "probabilities", row["probabilities_path"], "class probabilities",
                   DataType.UINT8 if u8 else DataType.FLOAT32, 255 if u8 else float("nan"), cfg.storage)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    if row["crs"]:
        proj.code = row["crs"] if row["crs"].upper().startswith("EPSG:") else None
        if proj.code is None:
            proj.wkt2 = row["crs"]
    proj.shape, proj.transform, proj.bbox = [row["height"], row["width"]], list(row["transform"]), list(row["bounds"])
    if source is not None:
        item.add_link(pystac.Link("derived_from", source.get_self_href() or sample.source,
                                  media_type=pystac.MediaType.GEOJSON, title=f"source item {source.id}"))
    return item


def _collection(items: list[pystac.Item], cfg) -> pystac.Collection:
    boxes = [i.bbox for i in items]
    times = [i.datetime for i in items if i.datetime is not None]
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                               max(b[3] for b in boxes)]] if boxes else [[-180.0, -90.0, 180.0, 90.0]]),
        pystac.TemporalExtent([[min(times), max(times)] if times else [None, None]]))
    collection = pystac.Collection("segray-masks", f"segray segment-scenes output of {cfg.checkpoint}", extent,
                                   title="segmentation masks", license="other")
    if cfg.polygons:
        collection.add_asset("polygons", pystac.Asset(join(cfg.output, POLYGONS), title="polygons",
                                                      media_type="application/vnd.apache.parquet", roles=["data"]))
    return collection


def write_stac_items(cfg, samples: list[Sample], rows: list[dict[str, Any]], class_names: list[str]) -> int:
    """``stac/collection.json`` and ``stac/<scene>/<scene>.json`` for every ok row; returns their number."""
    stac_io = FsspecStacIO(cfg.storage)
    root = join(cfg.output, STAC)
    if exists(root, cfg.storage):  # a killed attempt's items: scenes not ok this time must not stay listed
        remove_tree(root, cfg.storage)
    by_id = {s.image_id: s for s in samples}
    items = [scene_item(r, by_id[r["scene_id"]], cfg, class_names, stac_io) for r in rows if r["status"] == "ok"]
    collection = _collection(items, cfg)
    for item in items:
        collection.add_item(item)
    collection.normalize_hrefs(root)
    collection.make_all_asset_hrefs_relative()
    collection.save(pystac.CatalogType.SELF_CONTAINED, stac_io=stac_io)
    return len(items)
