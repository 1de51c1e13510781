"""Windowed reading, COG writing and polygonisation on real GeoTIFFs from ../shared/data."""

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import shape

from segray.config import StorageOptions
from segray.core.polygons import mask_to_polygons, merge_polygons, to_geoparquet
from segray.core.tiling import tile_grid
from segray.io.raster import (
    CogBlockWriter,
    gdal_env,
    gdal_path,
    is_cog,
    open_info,
    read_window,
    tile_dtype,
    write_cog,
)
from segray.testing.raster import make_test_cog, scene_pattern

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ATLANTA = DATA / "spacenet4_atlanta_solaris"
SPACENET_TIF = str(ATLANTA / "sample_geotiff.tif")
S2 = str(DATA / "sen1floods11_sample" / "Spain_7370579_S2Hand.tif")
LABEL = str(DATA / "sen1floods11_sample" / "Spain_7370579_LabelHand.tif")
ATLANTA_TRANSFORM = (0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
S2_TRANSFORM = (8.983152841195215e-05, 0.0, -0.7818936232976315, 0.0, -8.983152841195215e-05, 38.12881257139627)




def _read(path: str) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def label() -> np.ndarray:
    return _read(LABEL)[0]  # -1 nodata, 0 land, 1 water


@pytest.fixture(scope="module")
def footprints() -> np.ndarray:
    # 0/255 mask on the same 900x900 grid as sample_geotiff.tif (the mask file has no georeference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(ATLANTA / "sample_fp_mask_from_geojson.tif") as ds:
            return ds.read(1)


def test_open_info_reads_size_crs_transform():
    info = open_info(SPACENET_TIF)
    assert (info.height, info.width, info.count, info.dtype) == (900, 900, 1, "uint16")
    assert info.crs == "EPSG:32616" and info.transform == ATLANTA_TRANSFORM and info.nodata == 0
    assert info.bounds == (733601.0, 3724689.0, 733601.0 + 450, 3725139.0)
    s2 = open_info(S2)
    assert (s2.height, s2.width, s2.count, s2.dtype, s2.crs) == (512, 512, 13, "int16", "EPSG:4326")
    assert s2.transform == pytest.approx(S2_TRANSFORM)
    assert s2.block_shapes[0] == (512, 512) and s2.overviews == ()
    assert gdal_path("s3://bucket/scenes/a.tif") == "/vsis3/bucket/scenes/a.tif"


def test_gdal_env_from_storage_options(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.org")
    assert gdal_env() == {"AWS_S3_ENDPOINT": "s3.example.org", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}
    env = gdal_env(StorageOptions(endpoint_url="http://127.0.0.1:8333", key="k", secret="s", region="eu-west-1"))
    assert env == {
        "AWS_S3_ENDPOINT": "127.0.0.1:8333",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "eu-west-1",
    }
    assert open_info(SPACENET_TIF, env=env).width == 900  # keys go through an AWSSession, not Env options


def test_read_window_equals_slice_of_full_read():
    full = _read(S2)
    data, valid = read_window(S2, (100, 200, 64, 80), bands=[4, 3, 2])
    assert data.dtype == np.float32 and data.shape == (3, 64, 80)
    np.testing.assert_array_equal(data, full[[3, 2, 1], 100:164, 200:280])
    assert valid.all()  # the file's nodata is 0 and no S2 value is 0
    data, _ = read_window(S2, (0, 0, 512, 512))
    np.testing.assert_array_equal(data, full)


@pytest.mark.parametrize("dtype, sent", [("uint8", "uint8"), ("uint16", "uint16"), ("int16", "int16"),
                                         ("int32", "float32"), ("float32", "float32"), ("float64", "float32")])
def test_tiles_travel_in_the_files_own_small_integers(tmp_path, dtype, sent):
    """``tile_dtype``: 8- and 16-bit integers stay as they are (a quarter or half of float32's
    bytes between processes), other types become float32; read in it, the values are the same."""
    path = str(tmp_path / f"{dtype}.tif")
    values = (np.arange(3 * 40 * 50).reshape(3, 40, 50) % 200 + 7).astype(dtype)
    values[0, 5, 15] = 9  # the nodata value below, in one band
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=3, dtype=dtype, nodata=9) as dst:
        dst.write(values)
    info = open_info(path)
    assert tile_dtype([info]) == sent and tile_dtype([info], bands=[2]) == sent
    own, own_valid = read_window(path, (-4, 10, 30, 30), dtype=tile_dtype([info]))
    f32, f32_valid = read_window(path, (-4, 10, 30, 30))
    assert own.dtype == np.dtype(sent) and f32.dtype == np.float32
    np.testing.assert_array_equal(own.astype(np.float32), f32)
    np.testing.assert_array_equal(own_valid, f32_valid)
    assert not own_valid[:4].any() and not own_valid[9, 5] and own_valid[4:].sum() == 26 * 30 - 1
    if dtype.startswith("u"):  # a boundless fill the type cannot hold
        assert tile_dtype([info], fill=-5) == "float32"


def test_one_tile_type_for_all_scenes_of_a_job():
    """Ray Data joins tiles of several scenes into one batch: one type that holds them all."""
    spacenet, s2 = open_info(SPACENET_TIF), open_info(S2)  # uint16, int16 (13 bands)
    assert (tile_dtype([spacenet]), tile_dtype([s2]), tile_dtype([spacenet, spacenet])) == ("uint16", "int16", "uint16")
    assert tile_dtype([spacenet, s2]) == "float32"  # int32 would hold both: no smaller than float32
    assert tile_dtype([]) == "float32"


def test_nodata_mask_from_value_any_band_and_dataset_mask(tmp_path, label):
    # the label file has no nodata tag: -1 is nodata by convention, so override it
    _, valid = read_window(LABEL, (0, 0, 512, 512), nodata=-1)
    np.testing.assert_array_equal(valid, label != -1)
    assert (~valid).sum() == 99

    # a copy of three S2 bands with nodata=-1 tagged, -1 written in one band only: any band counts
    s2 = _read(S2)[:3]
    s2[1][label == -1] = -1
    with rasterio.open(S2) as src:
        profile = dict(src.profile, count=3, nodata=-1)
    tagged = str(tmp_path / "tagged.tif")
    with rasterio.open(tagged, "w", **profile) as dst:
        dst.write(s2)
    _, valid = read_window(tagged, (0, 0, 512, 512))
    np.testing.assert_array_equal(valid, label != -1)

    # an internal dataset mask (no nodata value)
    masked = str(tmp_path / "masked.tif")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "w", **dict(profile, nodata=None)) as dst:
        dst.write(_read(S2)[:3])
        dst.write_mask((label != -1).astype(np.uint8) * 255)
    data, valid = read_window(masked, (200, 100, 300, 400))
    np.testing.assert_array_equal(valid, label[200:500, 100:500] != -1)
    np.testing.assert_array_equal(data, _read(S2)[:3, 200:500, 100:500])


def test_boundless_window_at_the_scene_edge():
    full = _read(S2)[:2].astype(np.float32)
    data, valid = read_window(S2, (-10, 490, 40, 40), bands=[1, 2], fill=-5)
    np.testing.assert_array_equal(valid[10:, :22], True)
    assert not valid[:10].any() and not valid[:, 22:].any()
    np.testing.assert_array_equal(data[:, 10:, :22], full[:, :30, 490:])
    assert (data[:, :10] == -5).all() and (data[:, :, 22:] == -5).all()
    data, valid = read_window(S2, (600, 600, 8, 8))  # entirely outside
    assert not valid.any() and (data == 0).all()
    with pytest.raises(ValueError, match="boundless"):
        read_window(S2, (-10, 490, 40, 40), boundless=False)


def test_write_cog_round_trip_is_a_valid_cog(tmp_path):
    with rasterio.open(S2) as src:
        s2, crs, transform = src.read(), src.crs, src.transform
    out = str(tmp_path / "s2_cog.tif")
    write_cog(out, s2, crs, transform, nodata=-1, blocksize=128)
    with rasterio.open(out) as ds:
        assert ds.crs == crs and ds.transform == transform and ds.nodata == -1
        assert ds.profile["tiled"] and ds.block_shapes[0] == (128, 128)
        assert ds.overviews(1) == [2, 4]  # halved until the image fits one 128 block
        assert ds.compression.value == "DEFLATE"
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # IFDs + ghost area before the data
        np.testing.assert_array_equal(ds.read(), s2)
    assert is_cog(out) and not is_cog(S2)  # the source is a plain GeoTIFF

    probs = np.random.default_rng(0).random((600, 400), dtype=np.float32)  # [H, W] -> one band
    out = str(tmp_path / "probs.tif")
    write_cog(out, probs, "EPSG:32616", ATLANTA_TRANSFORM, blocksize=128, resampling="average")
    info = open_info(out)
    assert (info.count, info.dtype, info.crs, info.transform) == (1, "float32", "EPSG:32616", ATLANTA_TRANSFORM)
    assert info.overviews == (2, 4, 8) and is_cog(out)  # 75x50 is the first level within one block
    np.testing.assert_array_equal(read_window(out, (0, 0, 600, 400))[0][0], probs)
    with rasterio.open(out) as ds:  # 'average' overviews: mean of 2x2 pixels
        expected = probs.reshape(300, 2, 200, 2).mean((1, 3))
        np.testing.assert_allclose(ds.read(1, out_shape=(300, 200)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="blocksize"):
        write_cog(out, probs, "EPSG:32616", ATLANTA_TRANSFORM, blocksize=100)


def test_cog_block_writer_streams_a_generated_scene(tmp_path):
    out = str(tmp_path / "scene.tif")
    info = make_test_cog(out, 3000, 2500, 4, "uint16", blocksize=512)
    assert (info.height, info.width, info.count, info.dtype, info.crs) == (3000, 2500, 4, "uint16", "EPSG:32616")
    assert info.block_shapes[0] == (512, 512) and info.overviews == (2, 4, 8) and is_cog(out)
    for window in [(0, 0, 512, 512), (1000, 700, 300, 900), (2900, 2400, 100, 100)]:
        data, valid = read_window(out, window, bands=[1, 4])
        np.testing.assert_array_equal(data, scene_pattern(window, 4)[[0, 3]])
        assert valid.all()
    with rasterio.open(out) as ds:  # overviews carry the scene, not an empty file
        assert ds.read(1, out_shape=(375, 313)).std() > 100


def test_cog_block_writer_checks_blocks_and_writes_nothing_on_error(tmp_path):
    out = tmp_path / "never.tif"
    with pytest.raises(ValueError, match="does not match"):
        with CogBlockWriter(str(out), 100, 100, 2, "uint8", "EPSG:32616", ATLANTA_TRANSFORM) as writer:
            writer.write((0, 0, 50, 50), np.zeros((2, 50, 50)))
            writer.write((50, 0, 50, 50), np.zeros((3, 50, 50)))
    assert not out.exists()


def _iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


def test_polygons_land_on_spacenet_buildings(footprints):
    rows = mask_to_polygons(footprints, ATLANTA_TRANSFORM, ignore=(0,))
    assert {c for _, c in rows} == {255} and all(g.is_valid for g, _ in rows)
    labels = json.loads((ATLANTA / "geotiff_labels.geojson").read_text())["features"]
    truth = shapely.union_all([shape(f["geometry"]) for f in labels])
    assert _iou(shapely.union_all([g for g, _ in rows]), truth) > 0.9  # map coordinates, EPSG:32616
    assert abs(len(rows) - len(labels)) <= 3  # 43 buildings; touching ones rasterise together


@pytest.mark.parametrize(
    "transform",  # exact binary fractions (UTM 0.5 m) and inexact ones (degrees), where per-tile
    # transforms would round shared edges differently; scene transform + offset keeps them identical
    [ATLANTA_TRANSFORM, S2_TRANSFORM],
)
def test_polygons_crossing_tile_borders_merge_into_one(footprints, transform):
    whole = mask_to_polygons(footprints, transform)
    pieces = []
    for tile in tile_grid(900, 900, 256, 64):
        r, c, h, w = tile.core
        pieces += mask_to_polygons(footprints[r : r + h, c : c + w], transform, offset=(r, c))
    assert len(pieces) > len(whole)  # some buildings were cut by core borders
    merged = merge_polygons(pieces)
    assert len(merged) == len(whole)
    key = lambda g: (round(g.centroid.x, 9), round(g.centroid.y, 9))  # noqa: E731
    for (a, _), (b, _) in zip(sorted(merged, key=lambda r: key(r[0])), sorted(whole, key=lambda r: key(r[0]))):
        assert a.symmetric_difference(b).area <= 1e-9 * b.area


def test_geoparquet_has_wkb_and_geo_metadata(tmp_path, footprints):
    rows = merge_polygons(mask_to_polygons((footprints > 0).astype(np.uint8), ATLANTA_TRANSFORM))
    path = str(tmp_path / "buildings.parquet")
    to_geoparquet(rows, path, "EPSG:32616")
    table = pq.read_table(path)
    assert table.column_names == ["geometry", "class_id", "bbox"] and table.num_rows == len(rows)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert col["crs"]["type"] == "ProjectedCRS" and col["crs"]["id"] == {"authority": "EPSG", "code": 32616}
    assert CRS.from_user_input(json.dumps(col["crs"])).to_epsg() == 32616  # PROJJSON round-trips
    assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    assert all(a.equals_exact(b, 0) for a, (b, _) in zip(geoms, rows))
    assert table.column("class_id").to_pylist() == [1] * len(rows)
    bbox = table.column("bbox").combine_chunks()
    np.testing.assert_array_equal(bbox.field("xmin").to_numpy(), shapely.bounds(geoms)[:, 0])
    assert col["bbox"] == pytest.approx([*shapely.total_bounds(geoms)])
