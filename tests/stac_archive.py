"""A STAC archive built from the real Sentinel-2 chip in ``../shared/data``, for the STAC tests.

The 13-band chip (EPSG:4326) is reprojected into two UTM zones (two items in two CRSs) and split
into one COG per band, as Sentinel-2 is published: B02/B03/B04/B08 at 10 m, B11 at 20 m, int16
with ``raster:bands`` scale 0.0001 and nodata 0. Broken items: one lacks an asset, one's asset
is a striped GeoTIFF (no COG), one's asset href points at nothing.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pystac
import rasterio
from pystac.extensions.eo import EOExtension
from rasterio.io import MemoryFile
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds

from segray.io.fs import write_bytes
from segray.io.raster import gdal_env, write_cog

S2 = "sen1floods11_sample/Spain_7370579_S2Hand.tif"
LABEL = "sen1floods11_sample/Spain_7370579_LabelHand.tif"
BAND_INDEX = {"B02": 2, "B03": 3, "B04": 4, "B08": 8, "B11": 12}  # 1-based, in the chip's band order
ASSETS = ["B04", "B03", "B02", "B08", "B11"]
COARSE = {"B11"}  # published at 20 m
SCALE = 0.0001
COLLECTION = "s2-spain"
GOOD = ["spain-a", "spain-b"]  # the items that segment
BROKEN = {"spain-missing": "missing_asset", "spain-notcog": "not_cog", "spain-gone": "unreadable"}


def _reproject(src, index: int, crs: str, res: float, resampling) -> tuple[np.ndarray, object]:
    transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds,
                                                           resolution=res)
    out = np.zeros((height, width), np.int16)
    reproject(rasterio.band(src, index), out, dst_transform=transform, dst_crs=crs, resampling=resampling,
              src_nodata=src.nodata, dst_nodata=0)
    return out, transform


def scene_bands(shared: Path, crs: str) -> dict[str, tuple[np.ndarray, object]]:
    """{asset key: (int16 array, transform)} of the chip in ``crs``; the label as 'label'."""
    out = {}
    with rasterio.open(shared / S2) as src:
        for key, index in BAND_INDEX.items():
            out[key] = _reproject(src, index, crs, 20.0 if key in COARSE else 10.0, Resampling.bilinear)
    with rasterio.open(shared / LABEL) as src:  # -1 is the label's nodata; 0 water-free, 1 water
        label, transform = _reproject(src, 1, crs, 10.0, Resampling.nearest)
        out["label"] = (np.where(label < 0, 255, label).astype(np.uint8), transform)
    return out


def _write_striped(url: str, array: np.ndarray, crs: str, transform, storage) -> None:
    profile = dict(driver="GTiff", height=array.shape[0], width=array.shape[1], count=1, dtype=array.dtype,
                   crs=crs, transform=transform, nodata=0, tiled=False)
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(array, 1)
        write_bytes(url, mem.read(), storage)


def _asset(href: str, key: str) -> pystac.Asset:
    bands = [{"nodata": 0, "scale": SCALE, "offset": 0.0, "data_type": "int16"}] if key != "label" else \
        [{"nodata": 255, "data_type": "uint8"}]
    return pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"], extra_fields={"raster:bands": bands})


def make_item(item_id: str, hrefs: dict[str, str], crs: str, bands: dict, when: dt.datetime, cloud: float,
              updated: str = "2024-01-01T00:00:00Z") -> pystac.Item:
    arr, transform = bands["B04"]
    h, w = arr.shape
    west, south, east, north = transform_bounds(crs, "EPSG:4326", *rasterio.transform.array_bounds(h, w, transform))
    geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                    [west, south]]]}
    item = pystac.Item(item_id, geometry, [west, south, east, north], when,
                       {"updated": updated, "proj:code": crs}, collection=COLLECTION)
    for key, href in hrefs.items():
        item.add_asset(key, _asset(href, key))
    EOExtension.ext(item, add_if_missing=True).cloud_cover = cloud
    return item


def write_scene(prefix: str, bands: dict, crs: str, env: dict) -> dict[str, str]:
    """One COG per band (and the label) under ``prefix``; returns {asset key: href}."""
    hrefs = {}
    if "://" not in prefix:
        Path(prefix).mkdir(parents=True, exist_ok=True)
    for key, (array, transform) in bands.items():
        hrefs[key] = f"{prefix}/{key}.tif"
        write_cog(hrefs[key], array, crs, transform, nodata=255 if key == "label" else 0, blocksize=128,
                  resampling="nearest" if key == "label" else "average", env=env)
    return hrefs


def build_items(shared: Path, root: str, storage=None) -> list[pystac.Item]:
    """The archive's items, their COGs written under ``root`` (local or s3://)."""
    env = gdal_env(storage)
    when = dt.datetime(2019, 9, 18, 10, 50, tzinfo=dt.timezone.utc)
    a_bands, b_bands = scene_bands(shared, "EPSG:32630"), scene_bands(shared, "EPSG:32629")
    a = write_scene(f"{root}/spain-a", a_bands, "EPSG:32630", env)
    b = write_scene(f"{root}/spain-b", b_bands, "EPSG:32629", env)
    notcog = f"{root}/spain-notcog/B04.tif"
    if "://" not in root:
        Path(notcog).parent.mkdir(parents=True, exist_ok=True)
    _write_striped(notcog, a_bands["B04"][0], "EPSG:32630", a_bands["B04"][1], storage)
    items = [make_item("spain-a", a, "EPSG:32630", a_bands, when, 5.0),
             make_item("spain-b", b, "EPSG:32629", b_bands, when + dt.timedelta(days=5), 10.0),
             make_item("spain-missing", {k: v for k, v in a.items() if k != "B08"}, "EPSG:32630", a_bands, when, 3.0),
             make_item("spain-notcog", {**a, "B04": notcog}, "EPSG:32630", a_bands, when, 4.0),
             make_item("spain-gone", {**a, "B04": f"{root}/nowhere/B04.tif"}, "EPSG:32630", a_bands, when, 6.0),
             make_item("spain-cloudy", a, "EPSG:32630", a_bands, when + dt.timedelta(days=10), 85.0)]
    return items


def write_catalog(items: list[pystac.Item], root: str, stac_io) -> str:
    """A static catalog (Catalog > Collection > Items) at ``root``; returns the catalog's href."""
    catalog = pystac.Catalog("spain", "Sentinel-2 over Spain, per-band COGs")
    collection = pystac.Collection(COLLECTION, "Sentinel-2 L1C chips", pystac.Extent(
        pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[None, None]])))
    catalog.add_child(collection)
    for item in items:
        collection.add_item(item.clone())
    catalog.normalize_hrefs(root)
    catalog.save(pystac.CatalogType.ABSOLUTE_PUBLISHED, stac_io=stac_io)
    return f"{root}/catalog.json"


def stac_validator_ok(d: dict) -> tuple[bool, list]:
    """stac-validator on one STAC object, core schemas only, from pystac's local copies: this
    machine cannot fetch schemas, and the extension schemas exist only online."""
    from pystac.validation import local_validator
    from stac_validator.validate import StacValidate

    base = Path(local_validator.__file__).parent / "jsonschemas"
    version = local_validator.VERSION
    schema_map = {url: str(base / (f"stac-spec/v{version}" if "stacspec" in url else "geojson") / url.rsplit("/", 1)[1])
                  for url in local_validator.get_local_schema_cache()}
    validator = StacValidate(core=True, schema_map=schema_map)
    return validator.validate_dict(d), validator.message
