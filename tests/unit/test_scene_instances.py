"""Instance scenes without Ray: detections from overlapping tiles merged into whole objects.

A "perfect detector" reports, per tile, every SpaceNet-4 building visible in it (cut by the tile
edge where it crosses one): merging must give back each of the 43 buildings exactly once, whole,
and their polygons must land on the GeoJSON footprints in EPSG:32616.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from PIL import Image

from segray.core.instances import encode_rle
from segray.infer.scene_instances import (
    INSTANCE_NODATA,
    SceneInstance,
    instance_blob_url,
    merge_instances,
    merge_scene_instances,
)
from segray.infer.scene_grid import MASK_NODATA, grid_tiles
from segray.io.fs import write_bytes

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spacenet4_atlanta_solaris"
ATLANTA_TRANSFORM = (0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)


@pytest.fixture(scope="module")
def buildings() -> np.ndarray:
    return np.array(Image.open(DATA / "instance_labels_derived.png")).astype(np.int64)  # 0, 1..43


def _perfect_detector(ids: np.ndarray, blob_dir: Path, tile: int, overlap: int, nodata: np.ndarray | None = None):
    h, w = ids.shape
    tiles = grid_tiles(h, w, tile, overlap)
    for i, t in enumerate(tiles):
        sub = ids[t.slices]
        labels, scores, counts = [], [], []
        for v in np.unique(sub[sub > 0]):
            labels.append(1)
            scores.append(round(0.5 + 0.01 * (v % 40) + 0.001 * i, 4))  # tiles disagree on the score
            counts.append(encode_rle(sub == v)["counts"])
        valid = np.ones(sub.shape, np.uint8) if nodata is None else (~nodata[t.slices]).astype(np.uint8)
        blob = {"labels": labels, "scores": scores, "counts": counts, "valid": encode_rle(valid)["counts"]}
        write_bytes(instance_blob_url(str(blob_dir), i), json.dumps(blob).encode())
    return tiles


def _task(tmp_path: Path, h: int, w: int, tile: int, overlap: int, **extra) -> dict:
    return dict(scene_id="atlanta", height=h, width=w, vheight=h, vwidth=w, tile_size=tile, overlap=overlap,
                blob_dir=str(tmp_path / "blobs"), crs="EPSG:32616", transform=list(ATLANTA_TRANSFORM), block_size=256,
                num_classes=2, class_names=["background", "building"], mask_url=str(tmp_path / "classes.tif"),
                instance_url=str(tmp_path / "instances.tif"), polygons_url=str(tmp_path / "polygons.parquet"),
                polygon_crs="EPSG:32616", merge_ios=0.5, **extra)


def test_buildings_cut_by_tiles_come_back_whole_once(tmp_path, buildings):
    tiles = _perfect_detector(buildings, tmp_path / "blobs", 256, 64)
    result = merge_scene_instances(_task(tmp_path, 900, 900, 256, 64))
    assert result["status"] == "ok", result["error"]
    assert result["num_detections"] > 43  # buildings in overlaps were seen by several tiles
    assert result["num_instances"] == 43 and result["num_tiles"] == len(tiles)
    with rasterio.open(tmp_path / "instances.tif") as ds:
        out = ds.read(1)
        assert ds.crs.to_epsg() == 32616 and tuple(ds.transform)[:6] == ATLANTA_TRANSFORM
        assert ds.nodata == INSTANCE_NODATA
    pairs = {(int(a), int(b)) for a, b in zip(buildings.ravel(), out.ravel())}
    truth_ids = {a for a, b in pairs if a}
    assert len(truth_ids) == 43
    for gt in truth_ids:  # a one-to-one match: each building is exactly one output instance
        got = {b for a, b in pairs if a == gt}
        assert len(got) == 1 and 0 not in got
        (inst,) = got
        np.testing.assert_array_equal(out == inst, buildings == gt)
    with rasterio.open(tmp_path / "classes.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), (buildings > 0).astype(np.uint8))
    table = pq.read_table(tmp_path / "polygons.parquet")
    assert table.num_rows == 43 and sorted(table.column("instance_id").to_pylist()) == list(range(1, 44))
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    truth = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in
                               json.loads((DATA / "geotiff_labels.geojson").read_text())["features"]])
    union = shapely.union_all(geoms)
    assert union.intersection(truth).area / union.union(truth).area > 0.9  # on the buildings, in metres
    np.testing.assert_allclose(table.column("area").to_numpy(), table.column("pixels").to_numpy() * 0.25)


def test_nodata_pixels_leave_instances_and_are_written_as_nodata(tmp_path, buildings):
    nodata = np.zeros(buildings.shape, bool)
    nodata[:, 400:450] = True  # a stripe through several buildings
    _perfect_detector(buildings, tmp_path / "blobs", 256, 64, nodata)
    result = merge_scene_instances(_task(tmp_path, 900, 900, 256, 64))
    assert result["status"] == "ok", result["error"]
    with rasterio.open(tmp_path / "instances.tif") as ds:
        out = ds.read(1)
    with rasterio.open(tmp_path / "classes.tif") as ds:
        cls = ds.read(1)
    np.testing.assert_array_equal(out == INSTANCE_NODATA, nodata)
    np.testing.assert_array_equal(cls == MASK_NODATA, nodata)
    assert result["valid_pixels"] == (~nodata).sum()


def test_merging_rules():
    def inst(label, score, r, c, mask, tile):
        return SceneInstance(label, score, r, c, np.asarray(mask, bool), {tile})

    whole = inst(1, 0.9, 10, 10, np.ones((10, 20)), tile=0)
    cut = inst(1, 0.6, 10, 20, np.ones((10, 10)), tile=1)  # the right half, seen by the next tile
    other_class = inst(2, 0.8, 10, 10, np.ones((10, 20)), tile=1)
    same_tile = inst(1, 0.7, 12, 12, np.ones((5, 5)), tile=0)  # overlaps `whole`, but the model kept both
    neighbour = inst(1, 0.5, 10, 30, np.ones((10, 5)), tile=1)  # touches, does not overlap
    merged = merge_instances([cut, other_class, whole, same_tile, neighbour])
    assert len(merged) == 4
    big = next(m for m in merged if m.label == 1 and m.pixels == 200)
    assert big.score == 0.9 and big.tiles == {0, 1} and big.box == (10, 10, 20, 30)
    assert sorted(m.pixels for m in merged) == [25, 50, 200, 200]
    # low overlap: two objects that only share a sliver stay apart
    a = inst(1, 0.9, 0, 0, np.ones((10, 10)), tile=0)
    b = inst(1, 0.8, 0, 8, np.ones((10, 10)), tile=1)
    assert len(merge_instances([a, b], merge_ios=0.5)) == 2 and len(merge_instances([a, b], merge_ios=0.2)) == 1
