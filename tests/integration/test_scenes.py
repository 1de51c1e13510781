"""Scene segmentation end to end on a real local Ray: generated COGs (seams, edge tiles, small
scenes, nodata, corrupt files), real SpaceNet-4 and Sen1Floods11 GeoTIFFs, and S3 in and out."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.features
import shapely
import torch
from PIL import Image
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from typer.testing import CliRunner

from segray.cli import app
from segray.config import ConfigError, ModelConfig, SceneInferJobConfig, TrainJobConfig, build_config
from segray.core.checkpoint import FILENAME, load_payload, make_payload, save_payload
from segray.core.models import build_model
from segray.core.polygons import mask_to_polygons
from segray.core.tiling import blocks
from segray.infer.scene_grid import MASK_NODATA
from segray.infer.scenes import SCENE_SCHEMA, run_scenes
from segray.io.fs import get_fs, pyarrow_fs
from segray.io.raster import CogBlockWriter, gdal_env, is_cog, open_info
from segray.testing.raster import make_test_cog, scene_pattern
from segray.train.trainer import run_training
from scenes_util import make_checkpoint, read_all, untiled_probabilities

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

MEAN, STD = [1200.0, 1500.0, 1800.0, 2100.0], [900.0, 900.0, 900.0, 900.0]
PROB_ATOL = 5e-4  # float16 per-tile probabilities (half an ulp below 1: 2.4e-4); blending is convex
ATLANTA_TRANSFORM = (0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
GRID = ["tile_size=256", "overlap=64", "margin=24", "block_size=256", "batch_size=4"]


def _job(source: dict, checkpoint: str, output: str, *overrides: str, **fields) -> SceneInferJobConfig:
    tree = {"source": source, "checkpoint": checkpoint, "output": output, **fields}
    return build_config(SceneInferJobConfig, tree, [*GRID, *overrides])


def _scenes(table) -> dict[str, dict]:
    return {r["scene_id"]: r for r in table.to_pylist()}


def _polygons(path: str, filesystem=None):
    table = pq.read_table(path, filesystem=filesystem)
    geo = json.loads(table.schema.metadata[b"geo"])
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    return table, geo, geoms


# --------------------------------------------------------------------------- generated scenes


@pytest.fixture(scope="module")
def generated(tmp_path_factory, ray_local):
    """Seam scene 700x900, small 100x150, unaligned 333x517 with nodata, a corrupt file; one run."""
    root = tmp_path_factory.mktemp("gen")
    scenes = root / "scenes"
    scenes.mkdir()
    make_test_cog(str(scenes / "seam.tif"), 700, 900, 4, "uint16", blocksize=256)
    make_test_cog(str(scenes / "small.tif"), 100, 150, 4, "uint16", blocksize=128)
    odd = scene_pattern((0, 0, 333, 517), 4)
    odd[:, 100:160, 200:300] = 0
    with CogBlockWriter(str(scenes / "odd.tif"), 333, 517, 4, "uint16", "EPSG:32616", ATLANTA_TRANSFORM,
                        nodata=0, blocksize=128) as w:
        for r, c, h, wd in blocks(333, 517, 128):
            w.write((r, c, h, wd), odd[:, r : r + h, c : c + wd])
    (scenes / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    seam = scene_pattern((0, 0, 700, 900), 4).astype(np.float32)
    ckpt = str(root / "ckpt.pt")
    model = make_checkpoint(ckpt, 4, 3, MEAN, STD, depth=2, calibrate_on=seam, class_names=["a", "b", "c"])
    cfg = _job({"images": str(scenes)}, ckpt, str(root / "out"), "write_probabilities=true",
               "probabilities_dtype=float32", "per_tile_rows=true")
    summary = run_scenes(cfg)
    return dict(root=root, scenes=scenes, cfg=cfg, summary=summary, model=model, seam=seam, odd=odd,
                out=root / "out")


def test_scene_rows_keep_crs_transform_bounds_and_report_errors(generated):
    s, out = generated["summary"], generated["out"]
    assert (s["num_scenes"], s["num_ok"], s["num_error"]) == (4, 3, 1) and s["error_reasons"] == [{"kind": "unreadable", "count": 1}]
    table = pq.read_table(out / "scenes.parquet")
    assert table.schema.equals(SCENE_SCHEMA, check_metadata=False)
    rows = _scenes(table)
    assert rows["corrupt"]["status"] == "error" and "unreadable" in rows["corrupt"]["error"]
    for sid in ("seam", "small", "odd"):
        row, info = rows[sid], open_info(str(generated["scenes"] / f"{sid}.tif"))
        assert row["status"] == "ok" and row["error"] is None and row["tile_errors"] == 0
        assert row["crs"] == "EPSG:32616" and tuple(row["transform"]) == info.transform
        assert tuple(row["bounds"]) == info.bounds and (row["height"], row["width"]) == (info.height, info.width)
        assert sum(row["class_fractions"]) == pytest.approx(1.0) and row["mean_confidence"] > 1 / 3
        mask, meta = read_all(row["mask_path"])
        assert is_cog(row["mask_path"]) and meta["crs"] == CRS.from_epsg(32616) and meta["nodata"] == MASK_NODATA
        assert tuple(meta["transform"])[:6] == info.transform and mask.shape == (1, info.height, info.width)
        counts = np.bincount(mask[mask != MASK_NODATA], minlength=3)
        assert row["class_pixels"] == counts.tolist()
    assert rows["small"]["num_tiles"] == 1 and rows["seam"]["num_tiles"] == 20
    nodata = (generated["odd"] == 0).any(axis=0)
    assert rows["odd"]["valid_fraction"] == pytest.approx(1 - nodata.mean())
    tiles = pq.read_table(out / "tiles.parquet")
    assert tiles.num_rows == s["num_tiles"] == sum(rows[k]["num_tiles"] for k in ("seam", "small", "odd"))
    assert set(tiles.column("status").to_pylist()) == {"ok"}
    assert not (out / "_work").exists()  # per-tile blobs are removed after stitching


def test_stitched_pipeline_output_equals_untiled_prediction(generated):
    """The seam test: tile 256, overlap 64, margin 24 (> the depth-2 U-Net's 22 px radius),
    offsets multiples of 4: |stitched - untiled| <= 5e-4 everywhere (float16 tile storage)."""
    out = generated["out"]
    expected = untiled_probabilities(generated["model"], generated["seam"], MEAN, STD)
    probs, meta = read_all(str(out / "probabilities" / "seam.tif"))
    assert meta["crs"] == CRS.from_epsg(32616) and np.abs(probs - expected).max() <= PROB_ATOL
    mask, _ = read_all(str(out / "masks" / "seam.tif"))
    top2 = np.sort(expected, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * PROB_ATOL
    assert decided.mean() > 0.9 and len(np.unique(mask)) == 3
    np.testing.assert_array_equal(mask[0][decided], expected.argmax(0)[decided])
    # a scene smaller than one tile: one tile, the same as untiled
    small = scene_pattern((0, 0, 100, 150), 4).astype(np.float32)
    probs, _ = read_all(str(out / "probabilities" / "small.tif"))
    assert np.abs(probs - untiled_probabilities(generated["model"], small, MEAN, STD)).max() <= PROB_ATOL


def test_nodata_in_is_nodata_out_on_edge_tiles(generated):
    mask, _ = read_all(str(generated["out"] / "masks" / "odd.tif"))
    probs, _ = read_all(str(generated["out"] / "probabilities" / "odd.tif"))
    nodata = (generated["odd"] == 0).any(axis=0)
    np.testing.assert_array_equal(mask[0] == MASK_NODATA, nodata)
    assert np.isnan(probs[:, nodata]).all() and not np.isnan(probs[:, ~nodata]).any()


def test_polygons_cross_tile_borders_whole(generated):
    out = generated["out"]
    table, geo, geoms = _polygons(str(out / "polygons.parquet"))
    col = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert CRS.from_user_input(json.dumps(col["crs"])).to_epsg() == 32616
    rows = _scenes(pq.read_table(out / "scenes.parquet"))
    ids = table.column("scene_id").to_pylist()
    for sid in ("seam", "small", "odd"):
        mine = geoms[np.array(ids) == sid]
        assert len(mine) == rows[sid]["num_polygons"] > 0
        # the whole output mask polygonised at once: tiles and blocks left no cut in any polygon
        mask, _ = read_all(rows[sid]["mask_path"])
        whole = mask_to_polygons(mask[0], rows[sid]["transform"], ignore=(0,), nodata=MASK_NODATA)
        key = lambda g: (round(g.centroid.x, 4), round(g.centroid.y, 4), round(g.area, 4))  # noqa: E731
        assert sorted(map(key, mine)) == sorted(key(g) for g, _ in whole)
    assert set(table.column("class_name").to_pylist()) <= {"b", "c"}  # class 0 is background
    assert all(table.column("whole").to_pylist())  # no region reached polygon_max_vertices
    assert (table.column("pixels").to_numpy() * 0.25 == table.column("area").to_numpy()).all()
    scores = table.column("score").to_numpy()
    assert ((scores > 1 / 3) & (scores <= 1)).all()


def _kill_first_task(title: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker process seen running ``title`` (the local Ray runs under this process)."""
    while not stop.is_set() and not killed:
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.cmdline()[:1] == [title]:
                    proc.kill()
                    killed.append(proc.pid)
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.002)


def test_row_bands_in_parallel_equal_one_band_and_a_killed_band_is_retried(generated, tmp_path):
    """The seam scene in 3 row bands, stitched by parallel tasks as their tiles come in, one band's
    worker killed mid-task: Ray retries it and the outputs equal the one-band run's, the mask and
    probabilities byte for byte (tolerance 0: each block is blended from the same tiles either
    way), the polygons identical, none twice."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "seam.tif").symlink_to(generated["scenes"] / "seam.tif")
    cfg = generated["cfg"].model_copy(update={"source": generated["cfg"].source.model_copy(
        update={"images": str(scenes)}), "output": str(tmp_path / "out"), "band_rows": 256, "per_tile_rows": False})
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_task, args=("ray::stitch_band", killed, stop), daemon=True)
    killer.start()
    try:
        summary = run_scenes(cfg)
    finally:
        stop.set()
        killer.join()
    assert killed, "no band task was seen running"
    assert (summary["num_ok"], summary["num_error"]) == (1, 0)
    one, out = generated["out"], tmp_path / "out"
    for folder in ("masks", "probabilities"):
        a, meta_a = read_all(str(one / folder / "seam.tif"))
        b, meta_b = read_all(str(out / folder / "seam.tif"))
        np.testing.assert_array_equal(a, b)
        assert repr(meta_a) == repr(meta_b)
    row = _scenes(pq.read_table(out / "scenes.parquet"))["seam"]
    ref = _scenes(pq.read_table(one / "scenes.parquet"))["seam"]
    for key in ("class_pixels", "valid_fraction", "num_polygons", "num_tiles"):
        assert row[key] == ref[key]
    table, _, geoms = _polygons(str(out / "polygons.parquet"))
    ref_table, _, ref_geoms = _polygons(str(one / "polygons.parquet"))
    ref_geoms = ref_geoms[np.array(ref_table.column("scene_id").to_pylist()) == "seam"]
    key = lambda g: (round(g.centroid.x, 4), round(g.centroid.y, 4), round(g.area, 4))  # noqa: E731
    assert len(geoms) == row["num_polygons"] == len(set(map(key, geoms)))  # no polygon twice
    assert sorted(map(key, geoms)) == sorted(map(key, ref_geoms))
    assert not (out / "_work").exists()


def test_existing_output_is_refused_unless_overwrite(generated):
    with pytest.raises(ConfigError, match="already holds a committed result"):
        run_scenes(generated["cfg"].model_copy(update={"overwrite": False}))


# --------------------------------------------------------------------------- SpaceNet-4 Atlanta


@pytest.mark.timeout(900)
def test_spacenet_chips_training_then_scene_segmentation_via_cli(tmp_path, shared_data, ray_local):
    """Train on chips with the GeoJSON footprints rasterised per chip, then segment the real scene
    with the CLI: EPSG:32616 and the transform survive, polygons sit on the predicted pixels."""
    atlanta = shared_data / "spacenet4_atlanta_solaris"
    job = build_config(TrainJobConfig, {
        "data": {"source": {"glob": str(atlanta / "sample_geotiff.tif")}, "class_names": ["background", "building"],
                 "ignore_index": 255, "val_fraction": 0.25,
                 "chips": {"size": 128, "per_scene": 24, "vector_labels": str(atlanta / "geotiff_labels.geojson")}},
        "model": {"in_channels": 1, "num_classes": 2, "depth": 2, "base_width": 8},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 2, "patience": None,
                  "storage_path": str(tmp_path / "runs"), "name": "sn"},
    })
    result = run_training(job)
    assert np.isfinite(result.history[0]["train_loss"]) and 0 <= result.history[0]["val_miou"] <= 1
    payload = load_payload(os.path.join(result.best_checkpoint, FILENAME))
    stats = payload["band_stats"]
    assert len(stats["mean"]) == 1 and 100 < stats["mean"][0] < 2000 and stats["std"][0] > 1  # from the chips

    manifest = tmp_path / "scenes.csv"
    manifest.write_text(f"image,mask\n{atlanta / 'sample_geotiff.tif'},{atlanta / 'sample_fp_mask_from_geojson.tif'}\n")
    (tmp_path / "job.yaml").write_text(
        f"source: {{manifest: {manifest}}}\ncheckpoint: {result.best_checkpoint}\noutput: {tmp_path / 'out'}\n")
    args = ["segment-scenes", str(tmp_path / "job.yaml"), *sum((["--set", o] for o in GRID), []),
            "--set", "label_values={255: 1}"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "num_ok" in run.output

    row = pq.read_table(tmp_path / "out" / "scenes.parquet").to_pylist()[0]
    assert row["status"] == "ok" and row["crs"] == "EPSG:32616" and tuple(row["transform"]) == ATLANTA_TRANSFORM
    assert tuple(row["bounds"]) == (733601.0, 3724689.0, 734051.0, 3725139.0)
    assert row["has_ground_truth"] and sum(row["confusion"]) == 900 * 900  # the scene has no nodata pixel
    assert row["confusion"][2] + row["confusion"][3] == (np.asarray(read_all(str(atlanta / "sample_fp_mask_from_geojson.tif"))[0]) == 255).sum()
    mask, meta = read_all(row["mask_path"])
    assert meta["crs"].to_epsg() == 32616 and tuple(meta["transform"])[:6] == ATLANTA_TRANSFORM
    table, geo, geoms = _polygons(str(tmp_path / "out" / "polygons.parquet"))
    assert CRS.from_user_input(json.dumps(geo["columns"]["geometry"]["crs"])).to_epsg() == 32616
    assert len(geoms) == row["num_polygons"]
    if len(geoms):  # whatever the briefly trained model finds lies on its pixels, in UTM metres
        scene = shapely.box(*row["bounds"])
        assert all(scene.covers(g) for g in geoms)
        burned = rasterio.features.rasterize(geoms, out_shape=(900, 900), transform=rasterio.Affine(*ATLANTA_TRANSFORM))
        np.testing.assert_array_equal(burned, mask[0] == 1)


# --------------------------------------------------------------------------- Sen1Floods11


@pytest.fixture(scope="module")
def water_checkpoint(tmp_path_factory, shared_data):
    """A small U-Net fitted in-process for 60 steps to Sen1Floods11's water (13-band S2)."""
    root = tmp_path_factory.mktemp("water")
    sf = shared_data / "sen1floods11_sample"
    with rasterio.open(sf / "Spain_7370579_S2Hand.tif") as ds:
        x = ds.read().astype(np.float32)
    with rasterio.open(sf / "Spain_7370579_LabelHand.tif") as ds:
        y = ds.read(1).astype(np.int64)
    mean, std = x.reshape(13, -1).mean(1), x.reshape(13, -1).std(1)
    xn = torch.from_numpy((x - mean[:, None, None]) / std[:, None, None])[None]
    yt = torch.from_numpy(np.where(y < 0, 255, y))[None]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(in_channels=13, num_classes=2, depth=1, base_width=8)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        r, c = rng.integers(0, 257, 2)
        loss = torch.nn.functional.cross_entropy(model(xn[..., r : r + 256, c : c + 256]),
                                                 yt[..., r : r + 256, c : c + 256], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(root / "water.pt")
    save_payload(make_payload(model.eval(), cfg.model_dump(mode="json"), ["land", "water"],
                              {"mean": mean.tolist(), "std": std.tolist()}, ignore_index=255), path)
    return path, y


def test_sen1floods11_water_nodata_and_metrics(tmp_path, shared_data, water_checkpoint, ray_local):
    ckpt, label = water_checkpoint
    sf = shared_data / "sen1floods11_sample"
    s2, label_path = sf / "Spain_7370579_S2Hand.tif", sf / "Spain_7370579_LabelHand.tif"
    # The S2 file tags nodata 0 but has no such pixel; a copy with LabelHand's -1 pixels set to 0
    # has real nodata, to show it comes out as nodata.
    holes = tmp_path / "holes.tif"
    with rasterio.open(s2) as src:
        profile, data = src.profile, src.read()
    data[:, label == -1] = 0
    with rasterio.open(holes, "w", **profile) as dst:
        dst.write(data)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,mask\n{s2},{label_path}\n{holes},{label_path}\n"
                        f"{shared_data / 'spacenet4_atlanta_solaris' / 'sample_geotiff.tif'},\n")
    summary = run_scenes(_job({"manifest": str(manifest)}, ckpt, str(tmp_path / "out"), "label_nodata=-1",
                              "min_polygon_pixels=4"))
    assert (summary["num_ok"], summary["num_error"]) == (2, 1)
    # manifest entries outside the manifest's folder keep their path as id: key rows by file stem
    rows = {Path(r["source_path"]).stem: r for r in pq.read_table(tmp_path / "out" / "scenes.parquet").to_pylist()}
    assert "model expects 13" in rows["sample_geotiff"]["error"]  # a 1-band scene for a 13-band model
    water = label == 1
    for sid in ("Spain_7370579_S2Hand", "holes"):
        row = rows[sid]
        assert row["crs"] == "EPSG:4326" and row["dtype"] == "int16" and row["bands"] == 13
        mask, meta = read_all(row["mask_path"])
        assert meta["crs"].to_epsg() == 4326 and tuple(meta["transform"])[:6] == open_info(str(s2)).transform
        cm = np.asarray(row["confusion"]).reshape(2, 2)
        assert cm.sum() == 512 * 512 - 99  # LabelHand's -1 pixels are not scored
        assert row["iou"][1] > 0.6 and row["miou"] > 0.7  # the water is found
    mask, _ = read_all(rows["holes"]["mask_path"])
    np.testing.assert_array_equal(mask[0] == MASK_NODATA, label == -1)  # nodata in, nodata out
    assert rows["holes"]["valid_fraction"] == pytest.approx(1 - 99 / 512**2)
    assert (read_all(rows["Spain_7370579_S2Hand"]["mask_path"])[0] != MASK_NODATA).all()
    # water polygons in lon/lat land on the labelled water
    table, geo, geoms = _polygons(str(tmp_path / "out" / "polygons.parquet"))
    assert CRS.from_user_input(json.dumps(geo["columns"]["geometry"]["crs"])).to_epsg() == 4326
    scene_ids = np.array(table.column("scene_id").to_pylist())
    mine = shapely.union_all(geoms[scene_ids == rows["Spain_7370579_S2Hand"]["scene_id"]])
    truth = shapely.union_all([g for g, _ in mask_to_polygons(water.astype(np.uint8), open_info(str(s2)).transform)])
    assert mine.intersection(truth).area / mine.union(truth).area > 0.6
    assert set(table.column("class_name").to_pylist()) == {"water"}
    assert table.column("pixels").to_numpy().min() >= 4


# --------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_scenes_from_and_to_s3_with_mixed_crs_and_png(tmp_path, s3, s3_bucket, ray_local):
    storage = s3.storage_options()
    local = tmp_path / "scenes"
    local.mkdir()
    make_test_cog(str(local / "utm16.tif"), 300, 420, 4, "uint16", crs="EPSG:32616", blocksize=128)
    make_test_cog(str(local / "utm17.tif"), 260, 300, 4, "uint16", crs="EPSG:32617",
                  transform=(0.5, 0.0, 300000.0, 0.0, -0.5, 4000000.0), blocksize=128)
    rgba = np.concatenate([scene_pattern((0, 0, 120, 200), 3, "uint8"), np.full((1, 120, 200), 255, np.uint8)])
    Image.fromarray(np.moveaxis(rgba, 0, -1), "RGBA").save(local / "plain.png")
    fs, _ = get_fs(f"s3://{s3_bucket}", storage)
    fs.put(str(local), f"{s3_bucket}/archive", recursive=True)
    ckpt = tmp_path / "c.pt"
    make_checkpoint(str(ckpt), 4, 2, MEAN, STD, calibrate_on=scene_pattern((0, 0, 300, 420), 4).astype(np.float32))
    fs.put(str(ckpt), f"{s3_bucket}/ckpt/checkpoint.pt")

    out = f"s3://{s3_bucket}/out"
    summary = run_scenes(_job({"images": f"s3://{s3_bucket}/archive"}, f"s3://{s3_bucket}/ckpt", out,
                              storage=storage.model_dump()))
    assert (summary["num_ok"], summary["num_error"]) == (3, 0)
    pafs, path = pyarrow_fs(f"{out}/scenes.parquet", storage)
    rows = _scenes(pq.read_table(path, filesystem=pafs))
    env = gdal_env(storage)
    for sid, epsg in (("utm16", 32616), ("utm17", 32617)):
        row = rows[sid]
        assert row["mask_path"] == f"{out}/masks/{sid}.tif"
        info = open_info(row["mask_path"], env)  # through GDAL's /vsis3/ and the custom endpoint
        assert CRS.from_user_input(info.crs).to_epsg() == epsg and info.transform == tuple(row["transform"])
        assert is_cog(row["mask_path"], env) and (info.height, info.width) == (row["height"], row["width"])
    png = rows["plain"]
    assert png["status"] == "ok" and png["crs"] is None and (png["height"], png["width"], png["bands"]) == (120, 200, 4)
    assert open_info(png["mask_path"], env).crs is None  # no georeference in, none invented
    # scenes in two CRSs: polygons.parquet is in lon/lat (OGC:CRS84); the PNG has no CRS, so no polygons
    pafs, path = pyarrow_fs(f"{out}/polygons.parquet", storage)
    table, geo, geoms = _polygons(path, pafs)
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "OGC", "code": "CRS84"}
    ids = np.array(table.column("scene_id").to_pylist())
    assert set(ids) == {"utm16", "utm17"} and rows["plain"]["num_polygons"] == 0
    for sid in ("utm16", "utm17"):
        lon0, lat0, lon1, lat1 = transform_bounds(rows[sid]["crs"], "OGC:CRS84", *rows[sid]["bounds"])
        box = shapely.box(lon0, lat0, lon1, lat1).buffer(1e-9)
        assert all(box.covers(g) for g in geoms[ids == sid])
    assert not fs.exists(f"{s3_bucket}/out/_work")


# --------------------------------------------------------------------------- instance checkpoints


def test_instance_checkpoint_segments_a_scene(tmp_path, ray_local):
    """A random-init Mask R-CNN through the same tiles: per-tile detections merged per scene into
    an instance-id COG, a class-map COG and one polygon per instance (the merging itself is
    checked against real buildings in tests/unit/test_scene_instances.py)."""
    cfg = ModelConfig(name="maskrcnn_resnet50_fpn", in_channels=4, num_classes=2, trainable_backbone_layers=0,
                      min_size=128, max_size=160, rpn_proposals_test=50, anchor_sizes=[8, 16, 32, 64, 128])
    torch.manual_seed(0)
    ckpt = tmp_path / "mrcnn.pt"
    save_payload(make_payload(build_model(cfg).eval(), cfg.model_dump(mode="json"), ["background", "object"],
                              {"mean": MEAN, "std": STD}, task="instance"), str(ckpt))
    scene = tmp_path / "scene.tif"
    make_test_cog(str(scene), 256, 400, 4, "uint16", blocksize=128)  # two tiles
    summary = run_scenes(_job({"glob": str(scene)}, str(ckpt), str(tmp_path / "out"), "score_threshold=0.0",
                              "max_detections=6", "per_tile_rows=true"))
    assert (summary["num_ok"], summary["num_error"], summary["num_tiles"]) == (1, 0, 2)
    row = pq.read_table(tmp_path / "out" / "scenes.parquet").to_pylist()[0]
    assert row["status"] == "ok" and row["num_instances"] > 0 and row["crs"] == "EPSG:32616"
    ids, meta = read_all(str(tmp_path / "out" / "instances" / "scene.tif"))
    classes, cmeta = read_all(row["mask_path"])
    assert meta["crs"].to_epsg() == 32616 and tuple(meta["transform"])[:6] == open_info(str(scene)).transform
    assert is_cog(row["mask_path"]) and is_cog(str(tmp_path / "out" / "instances" / "scene.tif"))
    assert set(np.unique(ids)) <= set(range(row["num_instances"] + 1))
    np.testing.assert_array_equal(classes[0] == 1, ids[0] > 0)
    table, geo, geoms = _polygons(str(tmp_path / "out" / "polygons.parquet"))
    assert geo["columns"]["geometry"]["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert table.num_rows == row["num_polygons"] == row["num_instances"]
    assert set(table.column("instance_id").to_pylist()) == set(range(1, row["num_instances"] + 1))
    scene_box = shapely.box(*row["bounds"])
    assert all(scene_box.covers(g) for g in geoms)
    assert pq.read_table(tmp_path / "out" / "tiles.parquet").num_rows == 2
