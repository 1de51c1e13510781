"""End to end on a real local Ray: Ray Train (2 DDP workers) -> checkpoint -> Ray Data inference -> Parquet."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segray.config import InferJobConfig, SourceConfig, TrainJobConfig, build_config
from segray.core.checkpoint import FILENAME
from segray.core.masks import decode_png
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset
from segray.infer.pipeline import run_inference
from segray.infer.steps import Predictor
from segray.io.images import decode_image
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _train_job(data: dict, storage_path: str, **overrides) -> TrainJobConfig:
    tree = {
        "data": {"source": {"images": data["images"], "masks": data["masks"]},
                 "class_names": DEMO_CLASSES, "val_fraction": 0.25},
        "model": {"num_classes": len(DEMO_CLASSES), "depth": 2, "base_width": 8},
        "train": {"epochs": 2, "batch_size": 4, "num_workers": 2, "patience": None,
                  "storage_path": storage_path, "name": "t"},
    }
    return build_config(TrainJobConfig, tree, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("demo")
    data = write_demo_dataset(root / "data", num_images=16, size=64, seed=1)
    result = run_training(_train_job(data, str(root / "runs")))
    return data, result, root


def test_training_reports_metrics_checkpoint_and_curves(trained):
    data, result, _ = trained
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert h["train_loss"] > 0 and np.isfinite(h["train_loss"])
        assert 0.0 <= h["val_miou"] <= 1.0 and 0.0 <= h["val_pixel_accuracy"] <= 1.0
        assert any(k.startswith("val_iou/") for k in h)
    payload = torch.load(os.path.join(result.best_checkpoint, FILENAME), weights_only=True)
    assert payload["class_names"] == DEMO_CLASSES
    assert payload["model_config"]["name"] == "unet" and payload["model_config"]["depth"] == 2
    assert len(payload["band_stats"]["mean"]) == 3 and all(s > 0 for s in payload["band_stats"]["std"])
    assert payload["metrics"]["val_miou"] == pytest.approx(result.best_metrics["val_miou"])
    with open(result.curves_png, "rb") as f:
        assert Image.open(f).format == "PNG"


def test_a_finished_run_is_committed_and_its_folder_names_the_best_checkpoint(trained, tmp_path):
    from segray.infer.steps import open_checkpoint
    from segray.io.commit import committed_files, read_manifest

    data, result, _ = trained
    manifest = read_manifest(result.run_path)
    assert manifest["job"] == "train" and manifest["record"]["best_checkpoint"] == result.best_checkpoint
    assert os.path.join(result.best_checkpoint, FILENAME) in committed_files(result.run_path)
    assert manifest["record"]["epochs"] == 2
    assert open_checkpoint(result.run_path).id == open_checkpoint(result.best_checkpoint).id
    summary = run_inference(InferJobConfig(source=SourceConfig(images=data["images"], limit=2),
                                           checkpoint=result.run_path, output=str(tmp_path / "out")))
    assert summary["num_ok"] == 2 and summary["checkpoint_id"] == open_checkpoint(result.best_checkpoint).id


def test_inference_masks_equal_direct_forward_pass(trained, tmp_path):
    data, result, _ = trained
    cfg = InferJobConfig(source=SourceConfig(images=data["images"], masks=data["masks"]),
                         checkpoint=result.best_checkpoint, output=str(tmp_path / "out"), batch_size=4)
    summary = run_inference(cfg)
    assert summary["num_inputs"] == summary["num_ok"] == 16 and summary["num_error"] == 0
    assert summary["num_with_ground_truth"] == 16 and 0 <= summary["miou"] <= 1

    table = pq.read_table(tmp_path / "out" / "predictions")
    assert table.num_rows == 16 and len(set(table["image_id"].to_pylist())) == 16
    predictor = Predictor(result.best_checkpoint)
    for row in table.to_pylist():
        with open(row["source_path"], "rb") as f:
            image = decode_image(f.read(), row["source_path"])
        ((expected, _),) = predictor.predict([image])
        np.testing.assert_array_equal(decode_png(row["mask_png"]), expected)
        assert (row["height"], row["width"], row["bands"]) == (64, 64, 3)
        assert row["model_name"] == "unet" and row["checkpoint_id"] == summary["checkpoint_id"]
        assert sum(row["class_fractions"]) == pytest.approx(1.0)
        assert len(row["iou"]) == len(DEMO_CLASSES) and 0 <= row["pixel_accuracy"] <= 1
    summary_row = pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()[0]
    assert summary_row["num_ok"] == 16 and summary_row["miou"] == pytest.approx(summary["miou"])


def test_bad_inputs_become_error_rows_and_counts_add_up(trained, tmp_path):
    data, result, _ = trained
    good = sorted(os.listdir(data["images"]))[:3]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    png = open(os.path.join(data["images"], good[0]), "rb").read()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "notes.png").write_text("this is not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    (bad / "gray.png").write_bytes(buf.getvalue())  # 1 band, the model wants 3
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(bad / "huge.png")
    lines = [os.path.join(data["images"], g) for g in good]
    lines += [str(p) for p in sorted(bad.iterdir())] + [str(tmp_path / "missing.png")]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")

    cfg = InferJobConfig(source=SourceConfig(manifest=str(manifest)), checkpoint=result.best_checkpoint,
                         output=str(tmp_path / "out"), max_pixels=200 * 200)
    summary = run_inference(cfg)
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "out" / "predictions").to_pylist()}
    assert summary["num_inputs"] == len(lines) == summary["num_ok"] + summary["num_error"] == len(rows)
    assert summary["num_ok"] == 3 and summary["num_error"] == 7
    errors = {k.rsplit("/", 1)[-1]: r["error"] for k, r in rows.items() if r["status"] == "error"}
    assert "empty" in errors["empty"]
    assert "bands" in errors["gray"]
    assert "pixels" in errors["huge"]
    assert "not found" in errors["missing"]
    for name in ("truncated", "noise", "notes"):
        assert errors[name], name
    assert all(r["mask_png"] is None for r in rows.values() if r["status"] == "error")


def test_existing_output_is_refused_unless_overwrite(trained, tmp_path):
    from segray.config import ConfigError

    data, result, _ = trained
    cfg = InferJobConfig(source=SourceConfig(images=data["images"], limit=2), checkpoint=result.best_checkpoint,
                         output=str(tmp_path / "out"))
    run_inference(cfg)
    with pytest.raises(ConfigError, match="output"):
        run_inference(cfg)
    run_inference(cfg.model_copy(update={"overwrite": True}))
    assert pads.dataset(str(tmp_path / "out" / "predictions")).count_rows() == 2  # replaced, not appended
