"""Real object storage and real imagery: S3 in and out (SeaweedFS), LoveDA/Potsdam tiles from ../shared."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from segray.config import InferJobConfig, TrainJobConfig, build_config
from segray.core.checkpoint import FILENAME, load_payload
from segray.core.masks import decode_png
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset
from segray.infer.pipeline import run_inference
from segray.io.fs import get_fs, join, pyarrow_fs, read_bytes
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LOVEDA_CLASSES = ["nodata", "background", "building", "road", "water", "barren", "forest", "agriculture"]


@pytest.mark.s3
def test_train_and_infer_entirely_on_s3(tmp_path, s3, s3_bucket, ray_local):
    data = write_demo_dataset(tmp_path / "data", num_images=12, size=64, seed=3)
    fs, _ = get_fs(f"s3://{s3_bucket}", s3.storage_options())
    fs.put(data["images"], f"{s3_bucket}/scenes/images", recursive=True)
    fs.put(data["masks"], f"{s3_bucket}/scenes/masks", recursive=True)
    storage = s3.storage_options().model_dump()

    job = build_config(TrainJobConfig, {
        "data": {"source": {"images": f"s3://{s3_bucket}/scenes/images", "masks": f"s3://{s3_bucket}/scenes/masks"},
                 "class_names": DEMO_CLASSES, "val_fraction": 0.25, "storage": storage},
        "model": {"num_classes": 5, "depth": 2, "base_width": 8},
        "train": {"epochs": 1, "batch_size": 2, "num_workers": 2, "patience": None,
                  "storage_path": f"s3://{s3_bucket}/runs", "name": "s3run"},
    })
    result = run_training(job)
    assert result.best_checkpoint.startswith(f"s3://{s3_bucket}/runs/s3run/")
    payload = load_payload(read_bytes(join(result.best_checkpoint, FILENAME), s3.storage_options()))
    assert payload["class_names"] == DEMO_CLASSES
    assert read_bytes(result.curves_png, s3.storage_options())[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = InferJobConfig.model_validate({
        "source": {"images": f"s3://{s3_bucket}/scenes/images", "masks": f"s3://{s3_bucket}/scenes/masks"},
        "checkpoint": result.best_checkpoint, "output": f"s3://{s3_bucket}/out", "storage": storage,
        "batch_size": 4})
    summary = run_inference(cfg)
    assert summary["num_ok"] == summary["num_inputs"] == 12 and summary["num_with_ground_truth"] == 12
    pafs, path = pyarrow_fs(f"s3://{s3_bucket}/out/predictions", s3.storage_options())
    table = pads.dataset(path, filesystem=pafs, format="parquet").to_table()
    assert table.num_rows == 12
    assert all(p.startswith(f"s3://{s3_bucket}/scenes/images/") for p in table["source_path"].to_pylist())
    assert decode_png(table["mask_png"][0].as_py()).shape == (64, 64)
    pafs, path = pyarrow_fs(f"s3://{s3_bucket}/out/summary.parquet", s3.storage_options())
    assert pads.dataset(path, filesystem=pafs, format="parquet").to_table()["num_ok"][0].as_py() == 12


def test_real_loveda_and_potsdam_tiles(tmp_path, shared_data, ray_local):
    loveda = shared_data / "loveda_potsdam_vaihingen_mmseg" / "loveda"
    job = build_config(TrainJobConfig, {
        "data": {"source": {"images": str(loveda / "img_dir"), "masks": str(loveda / "ann_dir")},
                 "class_names": LOVEDA_CLASSES, "ignore_index": 0, "image_size": 128, "val_fraction": 0.34},
        "model": {"num_classes": 8, "depth": 3, "base_width": 8},
        "loss": {"terms": [{"name": "ce"}, {"name": "dice", "weight": 0.5}]},
        "train": {"epochs": 2, "batch_size": 1, "num_workers": 2, "patience": None,
                  "storage_path": str(tmp_path / "runs"), "name": "loveda"},
    })
    result = run_training(job)
    assert len(result.history) == 2
    for h in result.history:
        assert np.isfinite(h["train_loss"]) and 0 <= h["val_pixel_accuracy"] <= 1 and 0 <= h["val_miou"] <= 1
        assert np.isnan(h["val_iou/nodata"]) or h["val_iou/nodata"] == 0  # ignore_index never counts as truth

    # Inference at native size (1024 px LoveDA with ground truth, 512 px Potsdam without).
    potsdam = shared_data / "loveda_potsdam_vaihingen_mmseg" / "potsdam" / "img_dir"
    manifest = tmp_path / "manifest.csv"
    rows = [f"{p},{loveda / 'ann_dir' / p.name}" for p in sorted((loveda / "img_dir").iterdir())]
    rows += [str(p) for p in sorted(potsdam.iterdir())]
    manifest.write_text("image,mask\n" + "\n".join(rows) + "\n")
    cfg = InferJobConfig.model_validate({"source": {"manifest": str(manifest)}, "checkpoint": result.best_checkpoint,
                                         "output": str(tmp_path / "out"), "batch_size": 2})
    summary = run_inference(cfg)
    assert summary["num_inputs"] == summary["num_ok"] == 4 and summary["num_with_ground_truth"] == 3
    assert 0 <= summary["miou"] <= 1 and 0 <= summary["pixel_accuracy"] <= 1
    table = pads.dataset(str(tmp_path / "out" / "predictions"), format="parquet").to_table().to_pylist()
    sizes = sorted((r["height"], r["width"], r["has_ground_truth"]) for r in table)
    assert sizes == [(512, 512, False), (1024, 1024, True), (1024, 1024, True), (1024, 1024, True)]
    for r in table:
        mask = decode_png(r["mask_png"])
        assert mask.shape == (r["height"], r["width"]) and mask.max() < 8
        assert sum(r["class_fractions"]) == pytest.approx(1.0)
        if r["has_ground_truth"]:
            assert all(v is None or np.isnan(v) or 0 <= v <= 1 for v in r["iou"])
    # The checkpoint records what inference needs to reproduce training's preprocessing.
    payload = torch.load(f"{result.best_checkpoint}/{FILENAME}", weights_only=True)
    assert payload["ignore_index"] == 0 and payload["image_size"] == [128, 128] and len(payload["band_stats"]["std"]) == 3
