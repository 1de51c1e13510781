"""STAC items as scenes (segray.io.stac), on a static catalog of real per-band COGs built from the
Sentinel-2 chip in ../shared/data: the VRT stack against the assets read directly, the bad items'
reasons, the static selection rules, and the checks before Ray starts."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pystac
import pytest
import rasterio
from pydantic import ValidationError
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

import stac_archive as sa
from segray.config import InferJobConfig, SourceConfig, StacSourceConfig
from segray.io.preflight import PreflightError, first_scene
from segray.io.raster import open_info
from segray.io.sources import list_archive, list_samples
from segray.io.stac import FsspecStacIO, item_sample, stac_samples


@pytest.fixture(scope="module")
def catalog(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("stac")
    items = sa.build_items(shared_data, str(root / "cogs"))
    return sa.write_catalog(items, str(root / "catalog"), FsspecStacIO()), root


def _cfg(href: str, **kw) -> StacSourceConfig:
    return StacSourceConfig(**{"catalog": href, "assets": sa.ASSETS, **kw})


def test_each_item_is_one_scene_stacked_from_its_band_assets(catalog):
    href, root = catalog
    samples = {s.image_id: s for s in stac_samples(_cfg(href, query={"eo:cloud_cover": {"lt": 20}}))}
    assert sorted(samples) == sorted(sa.GOOD + list(sa.BROKEN))  # the cloudy item is filtered out
    for item_id, crs in (("spain-a", "EPSG:32630"), ("spain-b", "EPSG:32629")):
        s = samples[item_id]
        assert s.error is None and s.source.endswith(f"{item_id}.json") and s.source_path == s.source
        info = open_info(s.image)
        b04 = root / "cogs" / item_id / "B04.tif"
        with rasterio.open(b04) as ref:  # the grid is the first asset's: its CRS, size and transform
            assert (info.crs, info.height, info.width, info.count) == (crs, ref.height, ref.width, 5)
            assert info.transform == tuple(ref.transform)[:6]
            raw = ref.read(1)
        with rasterio.open(s.image) as vrt:
            stack = vrt.read()
            valid = vrt.read_masks(1) > 0
        # raster:bands scale applied, nodata (raw 0) kept as nodata
        np.testing.assert_allclose(stack[0][raw != 0], raw[raw != 0] * sa.SCALE, rtol=1e-6)
        assert np.array_equal(valid, raw != 0)
        # B11 is published at 20 m: GDAL resamples it (bilinear) onto the 10 m grid
        with rasterio.open(root / "cogs" / item_id / "B11.tif") as b11:
            assert b11.width < ref.width * 0.6
            with WarpedVRT(b11, crs=b11.crs, transform=ref.transform, width=ref.width, height=ref.height,
                           resampling=Resampling.bilinear) as up:
                expect = up.read(1).astype(np.float32) * sa.SCALE
        inner = (raw != 0) & (expect > 0)
        inner[:4], inner[-4:], inner[:, :4], inner[:, -4:] = False, False, False, False
        assert np.median(np.abs(stack[4][inner] - expect[inner])) < 2e-3
        assert np.corrcoef(stack[4][inner], expect[inner])[0, 1] > 0.98


def test_bad_items_carry_their_reason_kind(catalog):
    href, _ = catalog
    samples = {s.image_id: s for s in stac_samples(_cfg(href))}
    for item_id, kind in sa.BROKEN.items():
        assert samples[item_id].error.split(":")[0] == kind, samples[item_id].error
        assert samples[item_id].image == ""
    # assets in two CRSs cannot stack without warping every band: an error row, not a silent warp
    mixed = pystac.Item.from_file(samples["spain-a"].source)
    mixed.assets["B03"].href = str(pathlib.Path(href).parents[1] / "cogs" / "spain-b" / "B03.tif")
    error = item_sample(mixed, _cfg(href), {}).error
    assert error.startswith("crs: asset B03 is in EPSG:32629, asset B04 in EPSG:32630"), error


def test_static_selection_follows_the_api_rules(catalog):
    href, _ = catalog
    ids = lambda **kw: [s.image_id for s in stac_samples(_cfg(href, **kw))]  # noqa: E731
    assert ids(datetime="2019-09-20/..") == ["spain-b", "spain-cloudy"]
    assert ids(datetime="2019-09-18T10:50:00Z") == ["spain-a", "spain-gone", "spain-missing", "spain-notcog"]
    assert ids(bbox=[10.0, 40.0, 11.0, 41.0]) == []
    assert len(ids(bbox=[-0.8, 38.0, -0.7, 38.2])) == 6
    assert ids(query={"eo:cloud_cover": {"gte": 80}}) == ["spain-cloudy"]
    assert ids(max_items=2) == ["spain-a", "spain-b"]
    assert ids(collections=["other"]) == []


def test_nightly_versions_change_with_updated_or_asset_hrefs(catalog):
    href, _ = catalog
    entries = list_archive(SourceConfig(stac=_cfg(href)))
    by_id = {e.image_id: e for e in entries}
    assert by_id["spain-a"].url.endswith("spain-a.json") and by_id["spain-a"].size == 0
    # the same updated time, other asset hrefs: other versions
    assert len({by_id[i].version for i in ("spain-a", "spain-missing", "spain-notcog", "spain-gone")}) == 4
    d = json.loads(open(by_id["spain-a"].url).read())
    d["properties"]["updated"] = "2025-01-01T00:00:00Z"
    with open(by_id["spain-a"].url, "w") as f:
        json.dump(d, f)
    try:
        again = {e.image_id: e for e in list_archive(SourceConfig(stac=_cfg(href)))}
        assert again["spain-a"].version != by_id["spain-a"].version
        assert again["spain-b"].version == by_id["spain-b"].version
    finally:
        d["properties"]["updated"] = "2024-01-01T00:00:00Z"
        with open(by_id["spain-a"].url, "w") as f:
            json.dump(d, f)
    assert len(list_samples(SourceConfig(stac=_cfg(href), limit=3))) == 3


def test_wrong_stac_configs_fail_before_ray(catalog, tmp_path):
    href, _ = catalog
    with pytest.raises(ValidationError, match="exactly one of catalog, api"):
        StacSourceConfig(assets=["B04"])
    with pytest.raises(ValidationError, match="filter"):
        StacSourceConfig(catalog=href, assets=["B04"], filter="eo:cloud_cover < 20")
    with pytest.raises(ValidationError, match="asset_resampling"):
        StacSourceConfig(catalog=href, assets=["B04"], asset_resampling={"SCL": "nearest"})
    with pytest.raises(ValidationError, match="source.stac: STAC items are scenes"):
        InferJobConfig(source={"stac": {"catalog": href, "assets": ["B04"]}}, checkpoint="c", output="o")
    with pytest.raises(PreflightError, match=r"^source\.stac\.catalog: .*missing\.json not found$"):
        first_scene(_cfg(str(tmp_path / "missing.json")), None, "source.stac")
    with pytest.raises(PreflightError, match=r"^source\.stac\.api: http://127\.0\.0\.1:9/: connection refused$"):
        first_scene(StacSourceConfig(api="http://127.0.0.1:9/", assets=["B04"]), None, "source.stac")
    assert first_scene(_cfg(href), None, "source.stac").startswith("<VRTDataset")


def test_resolution_and_per_asset_resampling(catalog):
    href, root = catalog
    first = lambda **kw: stac_samples(_cfg(href, max_items=1, **kw))[0].image  # noqa: E731
    with rasterio.open(root / "cogs" / "spain-a" / "B04.tif") as b04:
        width, height, left, top = b04.width, b04.height, b04.bounds.left, b04.bounds.top
    coarse = open_info(first(resolution=20.0))  # the grid at 20 m: same origin and extent, half the pixels
    assert coarse.transform == (20.0, 0.0, left, 0.0, -20.0, top)
    assert (coarse.width, coarse.height) == (-(-width // 2), -(-height // 2))
    with rasterio.open(first(asset_resampling={"B11": "nearest"})) as vrt:
        b11 = vrt.read(5)
    with rasterio.open(root / "cogs" / "spain-a" / "B11.tif") as src:
        raw = src.read(1)
    values = set(np.unique((raw[raw != 0] * sa.SCALE).astype(np.float32)).tolist())
    assert set(np.unique(b11[b11 != 0]).tolist()) <= values  # nearest: only the asset's own values


def test_an_item_collection_or_one_item_lists_like_the_catalog(catalog, tmp_path):
    href, _ = catalog
    from_catalog = stac_samples(_cfg(href))
    items = [pystac.Item.from_file(s.source) for s in from_catalog]
    (tmp_path / "search.json").write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    listed = stac_samples(_cfg(str(tmp_path / "search.json")))
    assert [(s.image_id, s.image, s.error) for s in listed] == [(s.image_id, s.image, s.error) for s in from_catalog]
    one = stac_samples(_cfg(from_catalog[1].source))
    assert [(s.image_id, s.image) for s in one] == [(from_catalog[1].image_id, from_catalog[1].image)]
    west, south, east, north = items[0].bbox
    corner = {"type": "Polygon", "coordinates": [[[west, south], [west + 1e-4, south], [west, south + 1e-4],
                                                  [west, south]]]}
    assert "spain-a" in [s.image_id for s in stac_samples(_cfg(href, intersects=corner))]
    far = {"type": "Point", "coordinates": [10.0, 45.0]}
    assert stac_samples(_cfg(href, intersects=far)) == []
