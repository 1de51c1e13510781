"""STAC archives end to end, all real parts: a STAC API server (stac-fastapi-geoparquet) on
127.0.0.1 and a static catalog, both on S3 (SeaweedFS), whose items are per-band COGs (10 m and
20 m, two UTM zones) made from the real Sentinel-2 chip; search -> segment-scenes on a local Ray ->
STAC Items validated; the static catalog gives the same result; nightly twice over the API."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pytest
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator

import pystac
import stac_archive as sa
from scenes_util import make_checkpoint, untiled_probabilities
from segray.config import NightlyJobConfig, SceneInferJobConfig, StacSourceConfig, build_config
from segray.infer.nightly import read_committed, run_nightly
from segray.infer.scenes import run_scenes
from segray.io.fs import get_fs, read_bytes
from segray.io.raster import gdal_env, open_info, read_window
from segray.io.stac import FsspecStacIO, stac_samples
from stacserver import StacServer

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

MEAN, STD = [0.12, 0.12, 0.12, 0.22, 0.2], [0.05, 0.05, 0.05, 0.08, 0.08]
# margin 24 > the depth-2 U-Net's 22 px radius: tiled predictions equal untiled ones
SCENES = {"tile_size": 128, "overlap": 64, "margin": 24, "block_size": 128, "batch_size": 4, "num_actors": 1}


@pytest.fixture(scope="module")
def archive(s3, shared_data, tmp_path_factory):
    """COGs and a static catalog on S3, the same items behind a STAC API; a checkpoint for 5 bands."""
    storage = s3.storage_options()
    bucket = s3.make_bucket("stac-archive")
    items = sa.build_items(shared_data, f"s3://{bucket}/cogs", storage)
    catalog = sa.write_catalog(items, f"s3://{bucket}/catalog", FsspecStacIO(storage))
    tmp = tmp_path_factory.mktemp("stac-api")
    server = StacServer(tmp, items).start()
    first = stac_samples(StacSourceConfig(catalog=catalog, assets=sa.ASSETS, max_items=1), storage)[0]
    image, _ = _read(first.image, storage)
    ckpt = str(tmp / "ckpt.pt")
    model = make_checkpoint(ckpt, 5, 2, MEAN, STD, calibrate_on=image, class_names=["dry land", "water"])
    try:
        yield dict(storage=storage, bucket=bucket, items=items, catalog=catalog, server=server, ckpt=ckpt,
                   model=model)
    finally:
        server.stop()


def _scenes_config(a, stac: dict, out: str) -> SceneInferJobConfig:
    return build_config(SceneInferJobConfig, {
        "source": {"stac": {"assets": sa.ASSETS, **stac}}, "checkpoint": a["ckpt"], "output": out,
        "storage": a["storage"].model_dump(), **SCENES})


def _rows(out: str, storage) -> dict[str, dict]:
    import pyarrow.parquet as pq

    fs, path = get_fs(f"{out}/scenes.parquet", storage)
    with fs.open(path, "rb") as f:
        return {r["scene_id"]: r for r in pq.read_table(f).to_pylist()}


def _read(url: str, storage) -> tuple[np.ndarray, np.ndarray]:
    info = open_info(url, gdal_env(storage))
    return read_window(url, (0, 0, info.height, info.width), env=gdal_env(storage))


def _mask(url: str, storage) -> tuple[np.ndarray, str]:
    info = open_info(url, gdal_env(storage))
    data, _ = read_window(url, (0, 0, info.height, info.width), fill=255, env=gdal_env(storage))
    return data[0].astype(np.uint8), info.crs


def _check_items(a, out: str, rows: dict[str, dict], source_hrefs: dict[str, str]) -> None:
    """Every ok scene has one STAC Item: core schema valid, extensions filled, checksums true."""
    stac_io = FsspecStacIO(a["storage"])
    collection = pystac.Collection.from_file(f"{out}/stac/collection.json", stac_io=stac_io)
    validator = JsonSchemaSTACValidator()
    validator.validate_core(collection.to_dict(), pystac.STACObjectType.COLLECTION, "1.1.0")
    items = {i.id: i for i in collection.get_items()}
    assert sorted(items) == sorted(sid for sid, r in rows.items() if r["status"] == "ok") == sa.GOOD
    source_items = {i.id: i for i in a["items"]}
    for sid, item in items.items():
        validator.validate_core(item.to_dict(), pystac.STACObjectType.ITEM, "1.1.0")
        ok, message = sa.stac_validator_ok(item.to_dict())
        assert ok, message
        src = source_items[sid]
        assert item.datetime == src.datetime and item.bbox == pytest.approx(src.bbox)
        assert item.geometry == src.geometry
        derived = [link for link in item.links if link.rel == "derived_from"]
        assert [link.get_absolute_href() for link in derived] == [source_hrefs[sid]]
        proj = ProjectionExtension.ext(item)
        assert proj.code == rows[sid]["crs"] == src.properties["proj:code"]
        assert proj.shape == [rows[sid]["height"], rows[sid]["width"]]
        mask = item.assets["mask"]
        href = mask.get_absolute_href()
        assert href == rows[sid]["mask_path"]
        data = read_bytes(href, a["storage"])
        assert FileExtension.ext(mask).size == len(data)
        assert FileExtension.ext(mask).checksum == "1220" + hashlib.sha256(data).hexdigest()
        classes = ClassificationExtension.ext(mask).classes
        assert [(c.value, c.description) for c in classes] == [(0, "dry land"), (1, "water")]
        assert mask.extra_fields["raster:bands"][0]["nodata"] == 255


@pytest.fixture(scope="module")
def api_run(archive):
    """One segment-scenes run over the API's search (CI time: two tests read it)."""
    out = f"s3://{archive['bucket']}/out-api"
    return out, run_scenes(_scenes_config(archive, {"api": archive["server"].url, "collections": [sa.COLLECTION],
                                                    "filter": "eo:cloud_cover < 20"}, out))


def test_api_search_segments_each_item_in_its_crs_and_writes_stac_items(archive, api_run):
    a, server = archive, archive["server"]
    out, summary = api_run
    rows = _rows(out, a["storage"])
    assert sorted(rows) == sorted(sa.GOOD + list(sa.BROKEN))  # the cloudy item is not searched
    assert summary["num_scenes"] == len(rows) and (summary["num_ok"], summary["num_error"]) == (2, 3)
    for sid, kind in sa.BROKEN.items():
        assert rows[sid]["status"] == "error" and rows[sid]["error"].split(":")[0] == kind
    hrefs = {sid: f"{server.url}/collections/{sa.COLLECTION}/items/{sid}" for sid in rows}
    assert all(rows[sid]["source_path"] == hrefs[sid] for sid in rows)
    for sid, crs in (("spain-a", "EPSG:32630"), ("spain-b", "EPSG:32629")):
        mask, mask_crs = _mask(rows[sid]["mask_path"], a["storage"])
        assert mask_crs == crs and mask.shape == (rows[sid]["height"], rows[sid]["width"])
        image, valid = _read(_vrt(a, sid), a["storage"])
        probs = untiled_probabilities(a["model"], image, MEAN, STD)
        top2 = np.sort(probs, axis=0)[-2:]
        # away from float16 noise in the tiles' probabilities, and from the scene's edges and nodata by
        # more than the receptive field (there the pipeline pads with fill, the untiled run with zeros)
        decided = _interior(valid, 24) & (top2[1] - top2[0] > 1e-3)
        assert decided.mean() > 0.4
        np.testing.assert_array_equal(mask[decided], probs.argmax(0)[decided])
        assert (mask[~valid] == 255).all() and set(np.unique(mask[valid])) == {0, 1}
    _check_items(a, out, rows, hrefs)


def _interior(valid: np.ndarray, radius: int) -> np.ndarray:
    """Pixels farther than ``radius`` from any invalid pixel or the scene's edge."""
    import torch

    bad = torch.from_numpy(np.pad(~valid, radius, constant_values=True)).float()[None, None]
    near = torch.nn.functional.max_pool2d(bad, 2 * radius + 1, stride=1)[0, 0].numpy() > 0
    return ~near


def _vrt(a, sid: str) -> str:
    cfg = StacSourceConfig(catalog=a["catalog"], assets=sa.ASSETS)
    return next(s.image for s in stac_samples(cfg, a["storage"]) if s.image_id == sid)


def test_a_static_catalog_on_s3_gives_the_same_result_as_the_api(archive, api_run):
    a = archive
    (api_out, _), cat_out = api_run, f"s3://{a['bucket']}/out-catalog"
    run_scenes(_scenes_config(a, {"catalog": a["catalog"], "query": {"eo:cloud_cover": {"lt": 20}}}, cat_out))
    api_rows, cat_rows = _rows(api_out, a["storage"]), _rows(cat_out, a["storage"])
    assert sorted(api_rows) == sorted(cat_rows)
    for sid, r in cat_rows.items():
        assert (r["status"], (r["error"] or "").split(":")[0]) == \
            (api_rows[sid]["status"], (api_rows[sid]["error"] or "").split(":")[0])
        assert r["source_path"].startswith(f"s3://{a['bucket']}/catalog/")
        if r["status"] == "ok":
            assert np.array_equal(_mask(r["mask_path"], a["storage"])[0], _mask(api_rows[sid]["mask_path"], a["storage"])[0])
            assert r["class_pixels"] == api_rows[sid]["class_pixels"]
    hrefs = {sid: r["source_path"] for sid, r in cat_rows.items()}
    _check_items(a, cat_out, cat_rows, hrefs)


def test_nightly_over_the_api_processes_only_new_and_updated_items(archive, tmp_path):
    a, server = archive, archive["server"]
    by_id = {i.id: i for i in a["items"]}
    out = f"s3://{a['bucket']}/nightly"

    def night(date: str) -> dict:
        return run_nightly(build_config(NightlyJobConfig, {
            "source": {"stac": {"api": server.url, "assets": sa.ASSETS}}, "checkpoint": a["ckpt"], "output": out,
            "run_date": date, "workload": "scenes", "scenes": SCENES, "storage": a["storage"].model_dump()}))

    try:
        server.publish([by_id["spain-a"], by_id["spain-missing"]])
        first = night("2026-03-01")
        assert (first["processed"], first["num_ok"], first["num_error"]) == (2, 1, 1)
        updated = by_id["spain-a"].clone()
        updated.properties["updated"] = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc).isoformat()
        server.publish([updated, by_id["spain-b"], by_id["spain-missing"]])
        second = night("2026-03-02")
        assert (second["processed"], second["done_before"], second["num_ok"]) == (2, 1, 2)
        assert night("2026-03-02")["status"] == "already committed"
        third = night("2026-03-03")  # nothing changed since: a night with nothing to do
        assert (third["processed"], third["done_before"]) == (0, 3)
    finally:
        server.publish(a["items"])
    latest = read_committed(out, a["storage"], columns=["scene_id", "status", "mask_path"]).to_pylist()
    assert sorted(r["scene_id"] for r in latest) == ["spain-a", "spain-b", "spain-missing"]  # one output per item
    assert {r["scene_id"]: r["run_date"] for r in latest if r["status"] == "ok"} == \
        {"spain-a": "2026-03-02", "spain-b": "2026-03-02"}
    history = read_committed(out, a["storage"], columns=["scene_id"], latest_only=False).to_pylist()
    assert sorted(r["scene_id"] for r in history) == ["spain-a", "spain-a", "spain-b", "spain-missing"]
    for r in latest:
        if r["status"] == "ok":
            assert _mask(r["mask_path"], a["storage"])[0].size > 0


def test_chips_training_reads_the_items_band_assets_and_label_asset(archive, tmp_path):
    """Chips cut from the items' VRTs (scaled reflectance) with the label asset as ground truth;
    the broken items are skipped, the checkpoint records the 5 bands' statistics."""
    import os

    from segray.config import TrainJobConfig
    from segray.core.checkpoint import FILENAME, load_payload
    from segray.train.trainer import run_training

    a = archive
    job = build_config(TrainJobConfig, {
        "data": {"source": {"stac": {"catalog": a["catalog"], "assets": sa.ASSETS, "label_asset": "label",
                                     "query": {"eo:cloud_cover": {"lt": 20}}}},
                 "storage": a["storage"].model_dump(), "class_names": ["dry land", "water"], "ignore_index": 255,
                 "val_fraction": 0.5, "chips": {"size": 128, "per_scene": 8}},
        "model": {"in_channels": 5, "num_classes": 2, "depth": 2, "base_width": 8},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 2, "patience": None,
                  "storage_path": str(tmp_path / "runs"), "name": "stac"}})
    result = run_training(job)
    assert np.isfinite(result.history[0]["train_loss"]) and 0 <= result.history[0]["val_miou"] <= 1
    stats = load_payload(os.path.join(result.best_checkpoint, FILENAME))["band_stats"]
    assert len(stats["mean"]) == 5 and all(0.01 < m < 0.6 for m in stats["mean"])  # raster:bands scale applied
