"""Scene segmentation steps without Ray: tile grid alignment, block stitching vs an untiled pass,
edge tiles, small scenes, nodata, block-wise polygons, chips and configs."""

from __future__ import annotations

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

from segray.config import (
    ConfigError,
    DataConfig,
    SceneInferJobConfig,
    TrainJobConfig,
    build_config,
    load_config,
)
from segray.core.polygons import mask_to_polygons, to_geoparquet
from segray.core.scene_polygons import BlockPolygonizer, geoparquet_metadata, merge_bands, polygon_table, to_map
from segray.core.tiling import blocks, tile_grid, tiles_touching
from segray.data.chips import chip_rows, chip_windows, read_chips, read_vector_labels
from segray.infer.scene_grid import MASK_NODATA, TileIndex, grid_tiles, virtual_size
from segray.infer.scene_steps import TileProbabilities, read_tiles, write_tiles
from segray.infer.scene_bands import stitch_scene
from segray.io.raster import CogBlockWriter, is_cog, open_info, tile_dtype
from segray.testing.raster import make_test_cog, scene_pattern
from scenes_util import make_checkpoint, read_all, untiled_probabilities

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
ATLANTA = DATA / "spacenet4_atlanta_solaris"
ATLANTA_TRANSFORM = (0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
S2 = DATA / "sen1floods11_sample" / "Spain_7370579_S2Hand.tif"
LABEL = DATA / "sen1floods11_sample" / "Spain_7370579_LabelHand.tif"
MEAN, STD = [1200.0, 1500.0, 1800.0, 2100.0], [900.0, 900.0, 900.0, 900.0]

# Float16 per-tile probabilities are the only loss: half an ulp below 1 is 2.4e-4, and a blend
# is a convex combination, so stitched vs untiled differ by at most that (+ float32 conv noise).
PROB_ATOL = 5e-4
RADIUS = 22  # receptive-field radius of the depth-2 U-Net (6 * 2**2 - 2 px)


@pytest.fixture(scope="module")
def footprints() -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(ATLANTA / "sample_fp_mask_from_geojson.tif") as ds:
            return ds.read(1)


def run_steps(scene: str, checkpoint: str, tmp: Path, tile: int = 256, overlap: int = 64, margin: int = 24,
              align: int = 4, block: int = 256, label: str = "", nodata=None, blend: str = "cosine",
              probabilities: str | None = "float32", **task) -> dict:
    """read_tiles -> TileProbabilities -> write_tiles -> stitch_scene, in this process."""
    info = open_info(scene)
    vh, vw = virtual_size(info.height, tile, align), virtual_size(info.width, tile, align)
    n = len(grid_tiles(vh, vw, tile, overlap))
    chunk = dict(scene_id="s", url=scene, label=label, blob_dir=str(tmp / "blobs"), crs=info.crs or "",
                 transform=list(info.transform), height=info.height, width=info.width, bands=info.count,
                 vheight=vh, vwidth=vw, tile_start=0, tile_stop=n)
    tiles = read_tiles({k: [v] for k, v in chunk.items()}, tile, overlap, nodata=nodata)
    predictor = TileProbabilities(checkpoint)
    written = write_tiles(predictor(tiles), predictor.model_cfg.num_classes, tile_stats=True, blend=blend,
                          probabilities=probabilities)
    assert written.column("status").to_pylist() == ["ok"] * n
    stitch = dict(chunk, tile_size=tile, overlap=overlap, blend=blend, margin=margin, block_size=block,
                  num_classes=predictor.model_cfg.num_classes, class_names=predictor.class_names,
                  prob_dtype=probabilities or "uint8", polygon_crs=info.crs, **task)
    result = stitch_scene(dict(stitch, mask_url=str(tmp / "mask.tif"),
                               prob_url=str(tmp / "prob.tif") if probabilities else None,
                               polygons_url=str(tmp / "polygons.parquet")))
    assert result["status"] == "ok", result["error"]
    result["tiles"], result["task"] = written, stitch
    result["blob_bytes"] = sum(f.stat().st_size for f in (tmp / "blobs").iterdir())
    return result


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize("size,tile,overlap,align", [(900, 256, 64, 4), (333, 256, 64, 4), (5001, 512, 128, 16),
                                                     (100, 256, 64, 8), (256, 256, 64, 16), (257, 256, 0, 32)])
def test_virtual_extent_aligns_every_tile_offset(size, tile, overlap, align):
    v = virtual_size(size, tile, align)
    assert size <= v < size + align
    tiles = tile_grid(v, v, tile, overlap)
    offsets = sorted({t.row_off for t in tiles})
    assert all(o % align == 0 for o in offsets)  # pooling grids of all tiles line up
    assert offsets[-1] + min(tile, v) == v  # the last tile ends at the virtual border


def test_tile_index_finds_the_same_tiles_as_a_scan():
    tiles = grid_tiles(1000, 1300, 256, 64)
    index = TileIndex(tiles)
    for win in blocks(1000, 1300, 128) + [(0, 0, 1000, 1300), (190, 190, 5, 5)]:
        assert [tiles[i] for i in index.touching(win)] == tiles_touching(tiles, win)


# --------------------------------------------------------------------------- stitching


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A generated 700 x 900, 4-band uint16 COG and a checkpoint whose classes all occur in it."""
    root = tmp_path_factory.mktemp("scene")
    url = str(root / "scene.tif")
    make_test_cog(url, 700, 900, 4, "uint16", blocksize=256)
    image = scene_pattern((0, 0, 700, 900), 4).astype(np.float32)
    ckpt = str(root / "ckpt.pt")
    model = make_checkpoint(ckpt, 4, 3, MEAN, STD, depth=2, calibrate_on=image)
    return url, ckpt, model, image


def test_stitched_scene_equals_untiled_prediction(scene, tmp_path):
    url, ckpt, model, image = scene
    result = run_steps(url, ckpt, tmp_path)
    expected = untiled_probabilities(model, image, MEAN, STD)
    probs, meta = read_all(str(tmp_path / "prob.tif"))
    mask, mmeta = read_all(str(tmp_path / "mask.tif"))
    # Tile offsets are multiples of 4 (= 2**depth) and margin 24 >= radius 22: exact everywhere,
    # the scene border included (edge tiles see the same zero padding as the untiled pass).
    assert np.abs(probs - expected).max() <= PROB_ATOL
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * PROB_ATOL  # argmax cannot flip within the tolerance
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(mask[0][decided], expected.argmax(0)[decided])
    assert (mask[0] == expected.argmax(0)).mean() > 0.995
    assert len(np.unique(mask)) == 3  # a scene with every class: the test can see seams
    for meta_ in (meta, mmeta):
        assert meta_["crs"] == CRS.from_epsg(32616) and tuple(meta_["transform"])[:6] == open_info(url).transform
    assert mmeta["nodata"] == MASK_NODATA and mmeta["block_shapes"] == [(256, 256)] and mmeta["overviews"] == [2, 4]
    assert is_cog(str(tmp_path / "mask.tif")) and is_cog(str(tmp_path / "prob.tif"))
    # statistics add up, and each tile blob was loaded at most once per block row it touches
    counts = np.bincount(mask.ravel(), minlength=3)
    assert result["class_pixels"] == counts.tolist() and result["valid_pixels"] == 700 * 900
    assert result["tile_loads"] <= 2 * result["num_tiles"]


def _polygon_rows(parts: list[str]) -> list[tuple]:
    rows = []
    for part in parts:
        t = pq.read_table(part)
        geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
        rows += [(_key(g), c, n, g) for g, c, n in zip(geoms, t.column("class_id").to_pylist(),
                                                          t.column("pixels").to_pylist())]
    return sorted(rows, key=lambda r: r[:3])


@pytest.mark.parametrize("band_rows,block,num_bands,blend", [(256, 256, 3, "cosine"), (128, 128, 6, "linear"),
                                                             (100, 128, 6, "cosine"), (256, 128, 3, "core")])
def test_stitching_in_row_bands_equals_one_band(scene, tmp_path, band_rows, block, num_bands, blend):
    """Bands are stitched independently, pieces joined by GDAL and polygons merged across band
    borders: the same class map and probabilities byte for byte (tolerance 0: each block is
    blended from the same tiles in the same order either way), the same polygons."""
    url, ckpt, _, _ = scene
    one = run_steps(url, ckpt, tmp_path / "one", block=block, min_polygon_pixels=3, blend=blend)
    out = tmp_path / "bands"
    task = dict(one["task"], band_rows=band_rows, mask_url=str(out / "mask.tif"), prob_url=str(out / "prob.tif"),
                polygons_url=str(out / "polygons.parquet"), band_dir=str(out / "pieces"))
    banded = stitch_scene(task)
    assert banded["status"] == "ok", banded["error"]
    assert banded["num_bands"] == num_bands and one["num_bands"] == 1
    for name in ("mask.tif", "prob.tif"):
        a, meta_a = read_all(str(tmp_path / "one" / name))
        b, meta_b = read_all(str(out / name))
        np.testing.assert_array_equal(a, b)
        assert repr(meta_a) == repr(meta_b) and is_cog(str(out / name))  # repr: nodata NaN != NaN
        with rasterio.open(tmp_path / "one" / name) as da, rasterio.open(out / name) as db:
            np.testing.assert_array_equal(da.read(1, out_shape=(175, 225)), db.read(1, out_shape=(175, 225)))
    for key in ("class_pixels", "valid_pixels", "num_tiles"):
        assert banded[key] == one[key]
    assert banded["mean_confidence"] == pytest.approx(one["mean_confidence"], rel=1e-9)
    single, multi = _polygon_rows(one["polygon_parts"]), _polygon_rows(banded["polygon_parts"])
    assert len(multi) == len(single) == banded["num_polygons"] == one["num_polygons"] > 20
    for (k1, c1, n1, g1), (k2, c2, n2, g2) in zip(single, multi):
        assert (k1, c1, n1) == (k2, c2, n2) and g1.equals(g2)
    assert banded["polygon_bbox"] == pytest.approx(one["polygon_bbox"])


def test_band_polygonizers_cut_a_percolating_region_without_gaps_or_overlaps():
    """A class that percolates through every band as one web of holes, past polygon_max_vertices:
    where it is cut into parts depends on where the cuts fall, so bands and one pass may cut it
    differently, but its parts cover exactly its pixels (none twice, none lost), all flagged
    ``whole=False``; the regions under the budget stay identical."""
    rng = np.random.default_rng(3)
    cmap = (rng.random((300, 320)) < 0.7).astype(np.uint8)  # class 1 percolates (> 0.593), countless holes
    cmap[:, 150:170] = 2  # a column of another class through every band: one whole region
    cmap[:, 149] = cmap[:, 170] = 0
    kw = dict(nodata=MASK_NODATA, max_vertices=2_000)
    whole = _feed(BlockPolygonizer(*cmap.shape, **kw), cmap, np.ones(cmap.shape), 64)
    emitted, edges = [], []
    for r0 in range(0, 300, 128):
        poly = BlockPolygonizer(*cmap.shape, top=r0, **kw)
        wins = [b for b in blocks(*cmap.shape, 64) if r0 <= b[0] < r0 + 128]
        for n, (r, c, h, w) in enumerate(wins):
            emitted += poly.add((r, c, h, w), cmap[r : r + h, c : c + w], np.ones((h, w)))
            if n + 1 == len(wins) or wins[n + 1][0] != r:
                emitted += poly.end_row(r + h)
        edges.append(poly.band_edges())
    banded = emitted + merge_bands(edges, max_vertices=2_000)
    for pieces in (whole, banded):
        parts = [p for p in pieces if not p.whole]
        assert len(parts) > 10 and {p.class_id for p in parts} == {1}
        for k in (1, 2):
            mine = [p for p in pieces if p.class_id == k]
            assert sum(p.pixels for p in mine) == sum(p.geom.area for p in mine) == (cmap == k).sum()
        column = [p for p in pieces if p.class_id == 2]
        assert len(column) == 1 and column[0].whole and column[0].pixels == 300 * 20


def test_core_class_maps_are_exact_and_under_a_byte_per_pixel(scene, tmp_path):
    """``blend: core``: tiles pass on their cores' class maps only; with margin 24 >= the 22 px
    receptive-field radius the mask is the untiled argmax wherever it is decided, like blending,
    from far less intermediate data. Confidence travels as uint8: mean confidence within 1/508."""
    url, ckpt, model, image = scene
    blended = run_steps(url, ckpt, tmp_path / "blended", probabilities=None)
    core = run_steps(url, ckpt, tmp_path / "core", blend="core", probabilities=None)
    expected = untiled_probabilities(model, image, MEAN, STD)
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * PROB_ATOL
    mask, _ = read_all(str(tmp_path / "core" / "mask.tif"))
    np.testing.assert_array_equal(mask[0][decided], expected.argmax(0)[decided])
    other, _ = read_all(str(tmp_path / "blended" / "mask.tif"))
    assert (mask == other).mean() > 0.999 and core["class_pixels"] != [0, 0, 0]
    assert core["mean_confidence"] == pytest.approx(blended["mean_confidence"], abs=1 / 508)
    per_px = core["blob_bytes"] / (700 * 900)  # measured 0.42 bytes; blended 12.5 (float16 x 3 classes x overlap)
    assert per_px < 1.0 and blended["blob_bytes"] / (700 * 900) > 10 * per_px
    # with probabilities written, the cores' float16 probabilities travel too: as exact as blending
    run_steps(url, ckpt, tmp_path / "core_p", blend="core")
    probs, _ = read_all(str(tmp_path / "core_p" / "prob.tif"))
    assert np.abs(probs - expected).max() <= PROB_ATOL


def test_band_polygonizers_merge_to_the_whole_scene_polygonizer():
    """Polygonizers over row bands, their open regions joined by ``merge_bands``: the same polygons
    as one polygonizer over the scene, on a noisy map with regions crossing every band border."""
    rng = np.random.default_rng(2)
    cmap = np.kron(rng.integers(0, 3, (40, 50)), np.ones((7, 7), np.int64))[:270, :333].astype(np.uint8)
    cmap[5:260, 100:103] = 2  # runs through every band
    cmap[120:140, 0:333] = 1  # a region as wide as the scene on a band border
    cmap[50:60, 50:60] = MASK_NODATA
    scores = rng.random(cmap.shape)
    whole = _feed(BlockPolygonizer(*cmap.shape, nodata=MASK_NODATA, min_pixels=5), cmap, scores, 64)
    emitted, edges = [], []
    for r0 in range(0, 270, 128):
        r1 = min(r0 + 128, 270)
        poly = BlockPolygonizer(*cmap.shape, nodata=MASK_NODATA, min_pixels=5, top=r0)
        for n, (r, c, h, w) in enumerate(wins := [b for b in blocks(*cmap.shape, 64) if r0 <= b[0] < r1]):
            emitted += poly.add((r, c, h, w), cmap[r : r + h, c : c + w], scores[r : r + h, c : c + w])
            if n + 1 == len(wins) or wins[n + 1][0] != r:
                emitted += poly.end_row(r + h)
        edges.append(poly.band_edges())
    assert all(len(e.regions) for e in edges)  # regions do cross band borders
    joined = merge_bands(edges, min_pixels=5)
    banded = emitted + joined
    key = lambda p: (_key(p.geom), p.class_id, p.pixels)  # noqa: E731
    assert sorted(map(key, banded)) == sorted(map(key, whole))
    for a, b in zip(sorted(banded, key=key), sorted(whole, key=key)):
        assert a.geom.equals(b.geom) and a.score_sum == pytest.approx(b.score_sum) and a.whole == b.whole


def test_small_scene_is_one_tile_equal_to_untiled(tmp_path):
    url = str(tmp_path / "small.tif")
    make_test_cog(url, 100, 150, 4, "uint16", blocksize=128)
    image = scene_pattern((0, 0, 100, 150), 4).astype(np.float32)
    model = make_checkpoint(str(tmp_path / "c.pt"), 4, 3, MEAN, STD, calibrate_on=image)
    result = run_steps(url, str(tmp_path / "c.pt"), tmp_path)
    assert result["num_tiles"] == 1
    probs, meta = read_all(str(tmp_path / "prob.tif"))
    assert probs.shape == (3, 100, 150) and meta["block_shapes"] == [(256, 256)] * 3
    assert np.abs(probs - untiled_probabilities(model, image, MEAN, STD)).max() <= PROB_ATOL


def test_edge_tiles_of_an_unaligned_scene_with_nodata(tmp_path):
    """333 x 517: the last tiles reach past the scene (virtual extent 336 x 520); a nodata block."""
    h, w = 333, 517
    image = scene_pattern((0, 0, h, w), 4)
    image[:, 100:160, 200:300] = 0  # nodata (the file's tag)
    url = str(tmp_path / "odd.tif")
    with CogBlockWriter(url, h, w, 4, "uint16", "EPSG:32616", ATLANTA_TRANSFORM, nodata=0, blocksize=128) as wr:
        for win in blocks(h, w, 128):
            r, c, bh, bw = win
            wr.write(win, image[:, r : r + bh, c : c + bw])
    nodata = (image == 0).any(axis=0)  # the block, and the pattern's own zeros: any band at nodata
    assert nodata.sum() > 60 * 100
    filled = np.where(nodata, np.asarray(MEAN, np.float32)[:, None, None], image.astype(np.float32))
    model = make_checkpoint(str(tmp_path / "c.pt"), 4, 3, MEAN, STD, calibrate_on=filled)
    result = run_steps(url, str(tmp_path / "c.pt"), tmp_path, block=128)
    mask, meta = read_all(str(tmp_path / "mask.tif"))
    probs, _ = read_all(str(tmp_path / "prob.tif"))
    assert mask.shape == (1, h, w) and tuple(meta["transform"])[:6] == ATLANTA_TRANSFORM
    np.testing.assert_array_equal(mask[0] == MASK_NODATA, nodata)  # nodata in, nodata out
    assert np.isnan(probs[:, nodata]).all() and not np.isnan(probs[:, ~nodata]).any()
    assert result["valid_pixels"] == h * w - nodata.sum()
    # nodata is filled with the band mean before the model, as in `filled`; the virtual extent
    # differs from the untiled pass's replicate padding only within the radius of the border
    expected = untiled_probabilities(model, filled, MEAN, STD)
    inner = (slice(None), slice(0, h - RADIUS - 4), slice(0, w - RADIUS - 4))
    ok = ~nodata[inner[1:]]
    assert np.abs(probs[inner][:, ok] - expected[inner][:, ok]).max() <= PROB_ATOL
    tiles = result["tiles"]
    cores = sum(r * c for r, c in zip(tiles.column("core_height").to_pylist(), tiles.column("core_width").to_pylist()))
    assert cores == h * w  # tile cores, clipped to the scene, partition it


def test_metrics_skip_label_nodata_sen1floods11(tmp_path):
    """Real Sen1Floods11 S2 (13 bands int16) against LabelHand: its -1 pixels are not scored."""
    with rasterio.open(S2) as ds:
        image = ds.read().astype(np.float32)
    with rasterio.open(LABEL) as ds:
        label = ds.read(1)
    mean, std = image.reshape(13, -1).mean(1).tolist(), image.reshape(13, -1).std(1).tolist()
    make_checkpoint(str(tmp_path / "c.pt"), 13, 2, mean, std, calibrate_on=image)
    result = run_steps(str(S2), str(tmp_path / "c.pt"), tmp_path, label=str(LABEL), label_nodata=-1)
    cm = np.asarray(result["confusion"]).reshape(2, 2)
    assert cm.sum() == (label != -1).sum() == 512 * 512 - 99
    np.testing.assert_array_equal(cm.sum(1), [(label == 0).sum(), (label == 1).sum()])
    mask, meta = read_all(str(tmp_path / "mask.tif"))
    assert meta["crs"].to_epsg() == 4326 and tuple(meta["transform"])[:6] == open_info(str(S2)).transform
    assert (mask != MASK_NODATA).all()  # the S2 file tags nodata 0 but has no such pixel
    # per-tile rows score their cores, which partition the scene: they add up to the scene's matrix
    # (up to argmax ties, as cores use the tile's own prediction and the scene the blended one)
    tile_cm = np.sum([np.asarray(c).reshape(2, 2) for c in result["tiles"].column("confusion").to_pylist()], axis=0)
    assert tile_cm.sum() == cm.sum() and np.abs(tile_cm - cm).max() <= 1e-3 * cm.sum()


# --------------------------------------------------------------------------- polygons


def _feed(poly: BlockPolygonizer, cmap: np.ndarray, scores: np.ndarray, block: int):
    out = []
    wins = blocks(*cmap.shape, block)
    for n, (r, c, h, w) in enumerate(wins):
        out += poly.add((r, c, h, w), cmap[r : r + h, c : c + w], scores[r : r + h, c : c + w])
        if n + 1 == len(wins) or wins[n + 1][0] != r:
            out += poly.end_row(r + h)
    return out


def _key(g):
    return (round(g.centroid.x, 6), round(g.centroid.y, 6), round(g.area, 6))


def test_block_polygons_equal_whole_scene_polygons_on_spacenet(footprints):
    cmap = (footprints > 0).astype(np.uint8)
    scores = np.random.default_rng(0).random(cmap.shape)
    poly = BlockPolygonizer(*cmap.shape)
    pieces = _feed(poly, cmap, scores, 128)
    whole = mask_to_polygons(cmap, (1, 0, 0, 0, 1, 0))
    assert len(pieces) == len(whole) > 30
    for p, (g, _) in zip(sorted(pieces, key=lambda p: _key(p.geom)), sorted(whole, key=lambda r: _key(r[0]))):
        assert p.geom.equals_exact(g.normalize(), 0) or p.geom.symmetric_difference(g).area == 0
        assert p.pixels == g.area
        inside = shapely.contains_xy(g, *np.meshgrid(np.arange(900) + 0.5, np.arange(900) + 0.5))
        assert p.score == pytest.approx(scores[inside].mean())  # pixel-weighted over the merged pieces
    assert poly.max_pending < len(pieces)


def test_block_polygons_of_a_noisy_multiclass_map_merge_exactly():
    rng = np.random.default_rng(1)
    cmap = np.kron(rng.integers(0, 4, (40, 50)), np.ones((7, 7), np.int64))[:270, :333].astype(np.uint8)
    cmap[5:200, 100:103] = 3  # a long thin object through several blocks
    cmap[50:60, 50:60] = MASK_NODATA
    pieces = _feed(BlockPolygonizer(*cmap.shape, nodata=MASK_NODATA), cmap, np.ones(cmap.shape), 128)
    whole = mask_to_polygons(cmap, (1, 0, 0, 0, 1, 0), nodata=MASK_NODATA)
    assert sorted(_key(p.geom) + (p.class_id,) for p in pieces) == sorted(_key(g) + (c,) for g, c in whole)
    for k in (1, 2, 3):
        assert sum(p.pixels for p in pieces if p.class_id == k) == (cmap == k).sum()
    big = _feed(BlockPolygonizer(*cmap.shape, nodata=MASK_NODATA, min_pixels=50), cmap, np.ones(cmap.shape), 128)
    assert big and all(p.pixels >= 50 for p in big) and len(big) < len(pieces)


def test_polygon_table_is_geoparquet_in_map_coordinates(tmp_path, footprints):
    pieces = _feed(BlockPolygonizer(900, 900), (footprints > 0).astype(np.uint8), np.ones((900, 900)), 256)
    table = polygon_table(pieces, ATLANTA_TRANSFORM, "atlanta", ["background", "building"], "EPSG:32616")
    bounds = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in table.column("bbox").to_pylist()])
    assert bounds[:, 0].min() >= 733601.0 and bounds[:, 2].max() <= 734051.0  # the scene's bounds, in metres
    assert bounds[:, 1].min() >= 3724689.0 and bounds[:, 3].max() <= 3725139.0
    assert set(table.column("class_name").to_pylist()) == {"building"}
    np.testing.assert_allclose(table.column("area").to_numpy(), table.column("pixels").to_numpy() * 0.25)
    truth = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in
                               json.loads((ATLANTA / "geotiff_labels.geojson").read_text())["features"]])
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    union = shapely.union_all(geoms)
    assert union.intersection(truth).area / union.union(truth).area > 0.9  # on the buildings
    lonlat = polygon_table(pieces, ATLANTA_TRANSFORM, "atlanta", ["background", "building"], "EPSG:32616", "OGC:CRS84")
    lb = lonlat.column("bbox").to_pylist()
    assert all(-84.49 < b["xmin"] < b["xmax"] < -84.47 and 33.63 < b["ymin"] < b["ymax"] < 33.65 for b in lb)
    meta = json.loads(geoparquet_metadata("EPSG:32616", [0, 0, 1, 1])[b"geo"])
    assert meta["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 32616}
    assert json.loads(geoparquet_metadata(None)[b"geo"])["columns"]["geometry"]["crs"] is None
    assert to_map([shapely.box(0, 0, 1, 1)], ATLANTA_TRANSFORM)[0].bounds == (733601.0, 3725138.5, 733601.5, 3725139.0)


# --------------------------------------------------------------------------- chips


def test_chip_windows_random_and_grid():
    from segray.config import ChipsConfig

    rng = np.random.default_rng(0)
    wins = chip_windows(900, 700, ChipsConfig(size=256, per_scene=20), rng)
    assert len(wins) == 20 and all(0 <= r <= 644 and 0 <= c <= 444 and h == w == 256 for r, c, h, w in wins)
    grid = chip_windows(900, 700, ChipsConfig(size=256, mode="grid", per_scene=None, overlap=32), rng)
    assert len(grid) == len(tile_grid(900, 700, 256, 32)) and grid[-1][:2] == (644, 444)
    assert len(chip_windows(900, 700, ChipsConfig(size=256, mode="grid", per_scene=3), rng)) == 3
    assert chip_windows(100, 80, ChipsConfig(size=256, per_scene=2), rng) == [(0, 0, 256, 256)] * 2


def _batch(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_vector_labels_rasterise_onto_the_footprint_mask(tmp_path, footprints):
    """GeoJSON (EPSG:32616) and GeoParquet in lon/lat (reprojected back) both give the mask."""
    geojson = ATLANTA / "geotiff_labels.geojson"
    geoms, classes, crs = read_vector_labels(str(geojson))
    assert len(geoms) == 43 and set(classes) == {1} and CRS.from_user_input(crs).to_epsg() == 32616
    from segray.core.scene_polygons import reproject

    lonlat = reproject(np.array(geoms, dtype=object), crs, "OGC:CRS84")
    to_geoparquet([(g, 1) for g in lonlat], str(tmp_path / "b.parquet"), "OGC:CRS84")
    data = {"source": {"glob": str(ATLANTA / "sample_geotiff.tif")}, "ignore_index": 255,
            "chips": {"size": 300, "mode": "grid", "per_scene": None}, "val_fraction": 0}
    truth = (footprints > 0).astype(np.int64)
    for labels, agree in ((str(geojson), 1.0), (str(tmp_path / "b.parquet"), 0.999)):
        cfg = build_config(DataConfig, data, [f"chips.vector_labels={labels}"])
        train, val = chip_rows(cfg, 0)
        assert len(train) == 9 and not val
        out = read_chips(_batch(train), cfg.model_dump(mode="json"))
        for row, mask in zip(train, out["mask"]):
            r, c, h, w = row["window"]
            assert (mask == truth[r : r + h, c : c + w]).mean() >= agree


def test_chips_ignore_label_nodata_and_need_ignore_index(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"image,mask\n{S2},{LABEL}\n")
    data = {"source": {"manifest": str(path)}, "ignore_index": 255, "val_fraction": 0,
            "chips": {"size": 256, "mode": "grid", "per_scene": None, "label_nodata": -1}}
    cfg = build_config(DataConfig, data)
    train, _ = chip_rows(cfg, 0)
    out = read_chips(_batch(train), cfg.model_dump(mode="json"))
    assert len(out["mask"]) == 4 and out["image"][0].shape == (13, 256, 256)
    assert sum(int((m == 255).sum()) for m in out["mask"]) == 99  # LabelHand's -1 pixels
    assert not any(np.isnan(im).any() for im in out["image"])  # no image nodata in this chip
    with pytest.raises(ConfigError, match="ignore_index"):
        build_config(DataConfig, {**data, "ignore_index": None})
    no_ignore = build_config(DataConfig, {**data, "ignore_index": None, "chips": {"size": 256}})
    with pytest.raises(ValueError, match="ignore_index"):  # the S2 file declares nodata: refused up front
        chip_rows(no_ignore, 0)


# --------------------------------------------------------------------------- configs


def test_scene_config_validation_and_examples():
    base = {"source": {"glob": "s3://b/*.tif"}, "checkpoint": "c", "output": "o"}
    cfg = build_config(SceneInferJobConfig, base, ["tile_size=256", "overlap=64", "margin=24"])
    assert (cfg.tile_size, cfg.overlap, cfg.margin, cfg.blend) == (256, 64, 24, "auto")
    for bad, field in ((["overlap=512"], "overlap"), (["margin=64"], "margin"), (["block_size=200"], "block_size"),
                       (["blend=max"], "blend"), (["tile_szie=3"], "tile_szie")):
        with pytest.raises(ConfigError, match=field):
            build_config(SceneInferJobConfig, base, bad)
    example = load_config(SceneInferJobConfig, REPO / "configs" / "scenes_infer.yaml")
    assert example.overlap > 2 * example.margin and example.polygons
    train = load_config(TrainJobConfig, REPO / "configs" / "scenes_train.yaml")
    assert train.data.chips is not None and train.data.ignore_index == 255
    with pytest.raises(ConfigError, match="band_stats"):
        load_config(TrainJobConfig, REPO / "configs" / "scenes_train.yaml",
                    ["data.band_stats={mean: [1, 2], std: [1, 1]}"])
    with pytest.raises(ConfigError, match="image_size"):
        load_config(TrainJobConfig, REPO / "configs" / "scenes_train.yaml", ["data.image_size=128"])


def test_tile_rows_have_georeferenced_cores(scene, tmp_path):
    url, ckpt, _, _ = scene
    result = run_steps(url, ckpt, tmp_path)
    tiles = result["tiles"]
    info = open_info(url)
    rows = tiles.to_pylist()
    assert len(rows) == 20 and all(r["crs"] == "EPSG:32616" for r in rows)
    first = rows[1]
    a, _, c, _, e, f = info.transform
    assert first["transform"] == [a, 0.0, c + a * first["col_off"], 0.0, e, f + e * first["row_off"]]
    area = sum((r["bounds"][2] - r["bounds"][0]) * (r["bounds"][3] - r["bounds"][1]) for r in rows)
    left, bottom, right, top = info.bounds
    assert area == pytest.approx((right - left) * (top - bottom))
    assert all(sum(r["class_fractions"]) == pytest.approx(1.0) for r in rows)
    assert all(pq.read_schema(p).names[:2] == ["geometry", "bbox"] for p in result["polygon_parts"])


def test_a_percolating_region_is_cut_into_flagged_parts_past_the_vertex_budget():
    rng = np.random.default_rng(3)
    cmap = np.kron(rng.random((64, 64)) < 0.6, np.ones((8, 8), np.int64)).astype(np.uint8)  # 512 x 512 web
    whole = mask_to_polygons(cmap, (1, 0, 0, 0, 1, 0))
    web = max(whole, key=lambda r: r[0].area)[0]
    assert len(web.interiors) > 50 and web.bounds[3] - web.bounds[1] > 3 * 128  # spans 4 block rows
    exact = _feed(BlockPolygonizer(512, 512), cmap, np.ones(cmap.shape), 128)
    assert sorted(_key(p.geom) for p in exact) == sorted(_key(g) for g, _ in whole) and all(p.whole for p in exact)
    capped = _feed(BlockPolygonizer(512, 512, max_vertices=200), cmap, np.ones(cmap.shape), 128)
    assert sum(p.pixels for p in capped) == cmap.sum()  # nothing lost, nothing twice
    parts = [p for p in capped if web.contains(p.geom.representative_point())]
    assert len(parts) >= 3 and not any(p.whole for p in parts)  # the web comes in flagged parts ...
    assert shapely.union_all([p.geom for p in parts]).symmetric_difference(web).area == 0  # ... that tile it
    exact_keys = {_key(g) for g, _ in whole}
    assert all(_key(p.geom) in exact_keys for p in capped if p.whole)  # what says whole is whole


def test_pending_polygons_stay_bounded_when_regions_run_the_whole_scene():
    """Vertical stripes 900 px tall: each stays open to the bottom; a pending budget cuts them."""
    cmap = np.zeros((900, 640), np.uint8)
    for c in range(0, 640, 20):
        cmap[:, c : c + 10] = 1
        cmap[::30, c + 10] = 1  # teeth make the stripes' outlines long
    exact_poly, capped_poly = BlockPolygonizer(900, 640), BlockPolygonizer(900, 640, max_pending_vertices=1000)
    exact = _feed(exact_poly, cmap, np.ones(cmap.shape), 128)
    assert len(exact) == 32 and all(p.whole for p in exact)
    capped = _feed(capped_poly, cmap, np.ones(cmap.shape), 128)
    assert capped_poly.max_pending < exact_poly.max_pending / 2  # held pieces no longer pile up row by row
    assert any(not p.whole for p in capped) and sum(p.pixels for p in capped) == cmap.sum()
    stripes = shapely.union_all([p.geom for p in capped])
    assert stripes.symmetric_difference(shapely.union_all([p.geom for p in exact])).area == 0


def test_auto_blend_takes_cores_where_the_margin_covers_the_receptive_field():
    from segray.infer.scene_plan import scene_blend

    base = {"source": {"glob": "s3://b/*.tif"}, "checkpoint": "c", "output": "o", "overlap": 128}
    unet = {"name": "unet", "num_classes": 3, "depth": 2}
    for margin, model, want in ((22, unet, "core"), (21, unet, "cosine"), (46, {**unet, "depth": 3}, "core"),
                                (32, {**unet, "depth": 3}, "cosine"), (60, {"name": "fcn_resnet50"}, "cosine")):
        cfg = build_config(SceneInferJobConfig, {**base, "margin": margin})
        assert scene_blend(cfg, model) == want, (margin, model)
    assert scene_blend(build_config(SceneInferJobConfig, {**base, "blend": "linear"}), unet) == "linear"


def test_read_tiles_gives_every_tile_the_jobs_one_type(tmp_path):
    """Tiles of a uint16 and a uint8 scene, and a tile that cannot be read, all carry the job's
    type (here uint16, from ``tile_dtype``), with the files' values; the actor converts."""
    def chunk(url: str, sid: str) -> dict:
        return dict(scene_id=sid, url=url, label="", blob_dir="", crs="", transform=list(ATLANTA_TRANSFORM),
                    height=64, width=64, bands=1, vheight=64, vwidth=64, tile_start=0, tile_stop=1)

    small = str(tmp_path / "u8.tif")
    with rasterio.open(small, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as dst:
        dst.write(np.full((1, 64, 64), 200, np.uint8))
    spacenet = str(ATLANTA / "sample_geotiff.tif")  # uint16
    dtype = tile_dtype([open_info(spacenet), open_info(small)])
    rows = [chunk(spacenet, "a"), chunk(small, "b"), chunk(str(tmp_path / "missing.tif"), "c")]
    tiles = read_tiles({k: [r[k] for r in rows] for k in rows[0]}, 64, 0, dtype=dtype)
    assert dtype == "uint16" and tiles["status"] == ["ok", "ok", "error"]
    assert [p.dtype for p in tiles["pixels"]] == [np.dtype(np.uint16)] * 3
    f32 = read_tiles({k: [rows[0][k]] for k in rows[0]}, 64, 0)  # the default: float32
    np.testing.assert_array_equal(tiles["pixels"][0].astype(np.float32), f32["pixels"][0])
    assert (tiles["pixels"][1] == 200).all()
    make_checkpoint(str(tmp_path / "ckpt.pt"), 1, 2, [300.0], [150.0])
    predictor = TileProbabilities(str(tmp_path / "ckpt.pt"))  # converts to float32 itself
    np.testing.assert_array_equal(predictor.probabilities(tiles["pixels"][:1], tiles["valid"][:1])[0],
                                  predictor.probabilities(f32["pixels"], f32["valid"])[0])
