"""Instance segmentation end to end on a real local Ray and real samples from ../shared/data:
Mask R-CNN on Ray Train (2 DDP workers) -> checkpoint -> Ray Data inference -> Parquet -> COCO JSON.

Real annotations: VOC labelme polygons (3 images) and the PennFudan instance mask as RLE, in one
COCO file; the SpaceNet-4 building instance map (1-band uint16 GeoTIFF) as instance masks.
Models are tiny-input and mostly frozen so that a few steps fit in CPU minutes; the figures they
reach are not the point, their bookkeeping is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from segray.cli import app
from segray.config import InferJobConfig, ModelConfig, SourceConfig, TrainJobConfig, build_config
from segray.core.checkpoint import FILENAME, load_payload
from segray.core.instances import decode_rle, encode_rle
from segray.core.models import build_model
from segray.infer.pipeline import run_inference
from segray.infer.steps import open_checkpoint
from segray.io.fs import get_fs, join, pyarrow_fs, read_bytes
from segray.io.images import decode_image
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

NAMES = ["background", "person", "bottle", "chair", "sofa", "bus", "car"]  # person = 1: PennFudan's one class
VOC_IDS = {"person": 15, "bottle": 5, "chair": 9, "sofa": 18, "bus": 6, "car": 7}  # COCO category ids (VOC's)
# Small inputs, frozen backbone, few proposals: a training step in seconds on a CPU.
SMALL = {"min_size": 128, "max_size": 160, "trainable_backbone_layers": 0, "rpn_proposals_train": 200,
         "rpn_proposals_test": 100, "box_batch_size_per_image": 64, "box_detections_per_img": 20}


# --------------------------------------------------------------------------- real data as COCO


def _coco_file(shared: Path, out: Path) -> tuple[Path, Path]:
    """(COCO JSON, manifest): VOC labelme polygons + the PennFudan mask as RLE, file_names relative
    to ../shared/data; boxes and areas from the rasterised masks, as COCO files carry them."""
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": VOC_IDS[n], "name": n} for n in NAMES[1:]]}

    def add(image_id: int, cat: int, seg, h: int, w: int) -> None:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else \
            {"size": seg["size"], "counts": seg["counts"].encode()}
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                    "segmentation": seg, "iscrowd": 0, "area": float(mask_utils.area(rle)),
                                    "bbox": [float(v) for v in mask_utils.toBbox(rle)]})

    voc = shared / "voc_labelme_instances"
    for n, path in enumerate(sorted((voc / "labelme_json").glob("*.json")), start=1):
        d = json.loads(path.read_text())
        h, w = d["imageHeight"], d["imageWidth"]
        coco["images"].append({"id": 100 + n, "file_name": f"voc_labelme_instances/JPEGImages/{path.stem}.jpg",
                               "height": h, "width": w})
        objects: dict = {}  # shapes sharing a group_id are one object
        for k, s in enumerate(d["shapes"]):
            if s["label"] != "__ignore__":
                key = (s["label"], s["group_id"] if s["group_id"] is not None else f"s{k}")
                objects.setdefault(key, []).append([float(v) for p in s["points"] for v in p])
        for (label, _), polys in objects.items():
            add(100 + n, VOC_IDS[label], polys, h, w)
    ids = np.asarray(Image.open(shared / "pennfudan_torchvision_1" / "FudanPed00054_mask.png"))
    coco["images"].append({"id": 200, "file_name": "pennfudan_torchvision_1/FudanPed00054.png",
                           "height": ids.shape[0], "width": ids.shape[1]})
    for k in range(1, int(ids.max()) + 1):
        add(200, VOC_IDS["person"], encode_rle(ids == k), *ids.shape)
    coco_path, manifest = out / "instances.json", out / "manifest.csv"
    coco_path.write_text(json.dumps(coco))
    manifest.write_text("image\n" + "".join(f"{shared / im['file_name']}\n" for im in coco["images"]))
    return coco_path, manifest


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, shared_data, ray_local):
    root = tmp_path_factory.mktemp("coco")
    coco_path, manifest = _coco_file(shared_data, root)
    job = build_config(TrainJobConfig, {
        "data": {"source": {"manifest": str(manifest)}, "format": "coco", "coco_json": str(coco_path),
                 "class_names": NAMES, "val_fraction": 0.5},
        "model": {"name": "maskrcnn_resnet50_fpn", "num_classes": len(NAMES), **SMALL},
        "optim": {"optimizer": "sgd", "lr": 0.005, "warmup_steps": 2, "grad_clip": 10.0},
        "train": {"epochs": 2, "batch_size": 2, "num_workers": 2, "patience": None,
                  "storage_path": str(root / "runs"), "name": "coco"},
    })
    return job, run_training(job), coco_path, manifest, root


def _direct_forward(payload: dict, image: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint's model, run by hand: normalise with its band statistics, forward (one thread,
    as in the predictor actors)."""
    cfg = ModelConfig.model_validate({**payload["model_config"], "weights": None, "backbone_weights": None})
    model = build_model(cfg)
    model.load_state_dict(payload["model_state"])
    model.eval()
    mean = torch.tensor(payload["band_stats"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(payload["band_stats"]["std"]).view(-1, 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            (out,) = model([(torch.from_numpy(image) - mean) / std])
    finally:
        torch.set_num_threads(threads)
    return {"boxes": out["boxes"].numpy(), "labels": out["labels"].numpy(), "scores": out["scores"].numpy(),
            "probs": out["masks"][:, 0].numpy(), "threshold": cfg.mask_threshold}


def _check_rows_equal_direct_forward(rows: list[dict], payload: dict, read) -> int:
    """Every instance of every ok row is the direct forward's: same label, score, box, and an RLE that
    decodes to its mask thresholded (floating-point ties at the threshold aside: a pixel may differ
    only where the probability is within 1e-3 of it). Returns the instances compared."""
    compared = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        image = decode_image(read(row["source_path"]), row["source_path"], bands=payload.get("bands"))
        direct = _direct_forward(payload, image)
        assert row["num_instances"] == len(row["instances"]) == len(direct["labels"])
        for k, inst in enumerate(row["instances"]):
            assert inst["mask"]["size"] == [row["height"], row["width"]]
            decoded, probs = decode_rle(inst["mask"]).astype(bool), direct["probs"][k]
            expected = probs > direct["threshold"]
            differ = decoded != expected
            assert not differ.any() or np.abs(probs[differ] - direct["threshold"]).max() < 1e-3
            assert differ.sum() <= max(2, expected.sum() // 1000)
            assert inst["label"] == direct["labels"][k] and inst["class_name"] == payload["class_names"][inst["label"]]
            assert inst["score"] == pytest.approx(float(direct["scores"][k]), abs=1e-4)
            np.testing.assert_allclose(inst["box"], direct["boxes"][k], atol=0.02)
            assert inst["area"] == int(decoded.sum())
            compared += 1
    return compared


# --------------------------------------------------------------------------- tests


def test_training_reports_coco_metrics_and_a_best_checkpoint(coco_run):
    job, result, coco_path, _, _ = coco_run
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert np.isfinite(h["train_loss"]) and h["train_loss"] > 0
        assert {"train_loss_mask", "train_loss_classifier", "train_loss_objectness"} <= set(h)
        for key in ("val_segm_ap", "val_segm_ap50", "val_segm_ap75", "val_segm_ar",
                    "val_bbox_ap", "val_bbox_ap50", "val_bbox_ap75", "val_bbox_ar"):
            assert -1.0 <= h[key] <= 1.0, key
        assert h["val_images"] == 2  # the two validation images, each counted once over both workers
    payload = load_payload(os.path.join(result.best_checkpoint, FILENAME))
    assert payload["task"] == "instance" and payload["class_names"] == NAMES
    assert payload["model_config"]["name"] == "maskrcnn_resnet50_fpn" and payload["model_config"]["min_size"] == 128
    assert payload["category_ids"] == [0] + [VOC_IDS[n] for n in NAMES[1:]]
    best = max(h["val_segm_ap"] for h in result.history)
    assert payload["metrics"]["val_segm_ap"] == pytest.approx(best) == result.best_metrics["val_segm_ap"]
    # One optimizer step per epoch: each worker holds one of the 2 training images (batch size 2).
    assert payload["train_state"]["step"] == payload["train_state"]["epoch"] == payload["metrics"]["epoch"]
    assert Path(result.curves_png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_rows_equal_direct_forward_and_coco_round_trip(coco_run, tmp_path):
    _, result, coco_path, manifest, _ = coco_run
    out = tmp_path / "out"
    cfg = InferJobConfig(source=SourceConfig(manifest=str(manifest)), coco_json=str(coco_path),
                         checkpoint=result.best_checkpoint, output=str(out), batch_size=2, num_actors=1)
    summary = run_inference(cfg)
    assert summary["num_inputs"] == summary["num_ok"] == 4 and summary["num_error"] == 0
    assert summary["num_with_ground_truth"] == 4 and summary["task"] == "instance"
    rows = pq.read_table(out / "predictions").to_pylist()
    assert len(rows) == 4
    ckpt = open_checkpoint(result.best_checkpoint)
    payload, ckpt_id = ckpt.to_payload(), ckpt.id
    assert _check_rows_equal_direct_forward(rows, payload, lambda p: Path(p).read_bytes()) > 0
    coco = json.loads(coco_path.read_text())
    by_file = {im["file_name"].split("/")[-1]: im for im in coco["images"]}
    for row in rows:
        im = by_file[row["source_path"].split("/")[-1]]
        assert (row["height"], row["width"], row["bands"]) == (im["height"], im["width"], 3)
        assert row["coco_image_id"] == im["id"] and row["has_ground_truth"]
        assert row["model_name"] == "maskrcnn_resnet50_fpn" and row["checkpoint_id"] == ckpt_id
        assert row["num_gt"] == sum(a["image_id"] == im["id"] for a in coco["annotations"])
        assert all(i["category_id"] == VOC_IDS[i["class_name"]] for i in row["instances"])
        assert all(-1 < row[k] <= 1 for k in ("segm_ap", "bbox_ap") if row[k] is not None)
    # Scores are sorted and the detection cap holds.
    assert all(r["num_instances"] <= SMALL["box_detections_per_img"] for r in rows)
    assert all(np.all(np.diff([i["score"] for i in r["instances"]]) <= 0) for r in rows)

    # Parquet -> COCO results JSON (the CLI) -> pycocotools loads and evaluates it against the COCO file.
    res_path = tmp_path / "results.json"
    cli = CliRunner().invoke(app, ["export-coco", str(out / "predictions"), str(res_path), "--gt", str(coco_path)])
    assert cli.exit_code == 0, cli.output
    results = json.loads(res_path.read_text())
    assert len(results) == sum(r["num_instances"] for r in rows) > 0
    assert {r["image_id"] for r in results} <= {im["id"] for im in coco["images"]}
    for iou, key in (("segm", "segm"), ("bbox", "bbox")):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(coco_path))
            ev = COCOeval(gt, gt.loadRes(str(res_path)), iou)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # Same figures as segray's own summary (AP, AP50, AP75, AR@100 over all areas).
        for i, name in ((0, "ap"), (1, "ap50"), (2, "ap75"), (8, "ar")):
            assert ev.stats[i] == pytest.approx(summary[f"{key}_{name}"], abs=1e-9), (iou, name)
    summary_row = pq.read_table(out / "summary.parquet").to_pylist()[0]
    assert summary_row["segm_ap"] == pytest.approx(summary["segm_ap"])


def test_bad_inputs_become_error_rows(coco_run, tmp_path, shared_data):
    _, result, coco_path, _, _ = coco_run
    good = shared_data / "voc_labelme_instances" / "JPEGImages" / "2011_000025.jpg"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "notes.png").write_text("this is not an image")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(bad / "gray.png")  # 1 band, the model wants 3
    Image.fromarray(np.zeros((600, 600, 3), np.uint8)).save(bad / "huge.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad / "small_mask.png")  # ground truth of the wrong size
    lines = [f"{good},", f"{shared_data / 'pennfudan_torchvision_1' / 'FudanPed00054.png'},{bad / 'small_mask.png'}"]
    lines += [f"{p}," for p in sorted(bad.iterdir()) if p.name != "small_mask.png"] + [f"{tmp_path / 'missing.png'},"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = InferJobConfig(source=SourceConfig(manifest=str(manifest)), checkpoint=result.best_checkpoint,
                         output=str(tmp_path / "out"), max_pixels=300_000, num_actors=1)
    summary = run_inference(cfg)
    rows = {r["source_path"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "out" / "predictions").to_pylist()}
    assert summary["num_inputs"] == len(lines) == len(rows) == summary["num_ok"] + summary["num_error"]
    assert summary["num_ok"] == 1 and rows["2011_000025.jpg"]["status"] == "ok"
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "error"}
    assert "empty" in errors["empty.png"] and "bands" in errors["gray.png"] and "pixels" in errors["huge.png"]
    assert "not found" in errors["missing.png"] and "ground-truth mask" in errors["FudanPed00054.png"]
    assert errors["truncated.jpg"] and errors["notes.png"]
    assert all(r["instances"] is None and r["num_instances"] == 0 for r in rows.values() if r["status"] == "error")


@pytest.mark.s3
def test_spacenet_one_band_trains_to_s3_and_infers_s3_to_s3(tmp_path, shared_data, s3, s3_bucket, ray_local,
                                                            monkeypatch):
    """SpaceNet-4 buildings (1-band uint16, instance-id map): Mask R-CNN v2 with checkpoints on s3://,
    then images on s3:// and Parquet written to s3://, with instance-mask ground truth from s3://."""
    sn = shared_data / "spacenet4_atlanta_solaris"
    storage = s3.storage_options()
    fs, _ = get_fs(f"s3://{s3_bucket}", storage)
    fs.put(str(sn / "sample_geotiff.tif"), f"{s3_bucket}/sn/images/atlanta.tif")
    fs.put(str(sn / "instance_labels_derived.png"), f"{s3_bucket}/sn/masks/atlanta.png")
    image, mask = f"s3://{s3_bucket}/sn/images/atlanta.tif", f"s3://{s3_bucket}/sn/masks/atlanta.png"
    # One scene: listed three times so that 2 workers train on a copy each and one validates.
    fs.pipe(f"{s3_bucket}/sn/train.csv", "".join(f"{image},{mask}\n" for _ in range(3)).encode())
    job = build_config(TrainJobConfig, {
        "data": {"source": {"manifest": f"s3://{s3_bucket}/sn/train.csv"}, "format": "instance_masks",
                 "class_names": ["background", "building"], "val_fraction": 0.34, "storage": storage.model_dump()},
        "model": {"name": "maskrcnn_resnet50_fpn_v2", "in_channels": 1, "num_classes": 2,
                  **{**SMALL, "rpn_proposals_test": 50}, "anchor_sizes": [8, 16, 32, 64, 128]},
        "optim": {"optimizer": "sgd", "lr": 0.005, "grad_clip": 10.0},
        "train": {"epochs": 1, "batch_size": 2, "num_workers": 2, "patience": None,
                  "storage_path": f"s3://{s3_bucket}/runs", "name": "spacenet"},
    })
    result = run_training(job)
    assert result.best_checkpoint.startswith(f"s3://{s3_bucket}/runs/spacenet/")
    payload = load_payload(read_bytes(join(result.best_checkpoint, FILENAME), storage))
    assert payload["task"] == "instance" and payload["model_config"]["in_channels"] == 1
    assert len(payload["band_stats"]["mean"]) == 1 and payload["band_stats"]["mean"][0] > 100  # raw uint16 values
    assert result.history[0]["val_images"] == 1 and -1 <= result.history[0]["val_segm_ap"] <= 1

    cfg = InferJobConfig(source=SourceConfig(images=f"s3://{s3_bucket}/sn/images", masks=f"s3://{s3_bucket}/sn/masks"),
                         checkpoint=result.best_checkpoint, output=f"s3://{s3_bucket}/out", storage=storage,
                         score_threshold=0.0, max_detections=15, num_actors=1)
    summary = run_inference(cfg)
    assert summary["num_ok"] == 1 and summary["num_with_ground_truth"] == 1
    pa_fs, path = pyarrow_fs(f"s3://{s3_bucket}/out/predictions", storage)
    rows = pads.dataset(path, filesystem=pa_fs, format="parquet").to_table().to_pylist()
    (row,) = rows
    assert row["source_path"] == image and (row["height"], row["width"], row["bands"]) == (900, 900, 1)
    assert row["num_gt"] == 43 and all(g["class_name"] == "building" for g in row["gt_instances"])
    assert 0 < row["num_instances"] <= 15  # score threshold 0, detection cap 15
    ids = np.asarray(Image.open(sn / "instance_labels_derived.png"))
    for g in row["gt_instances"][:5]:  # ground truth travels as RLE of the real instance map
        k = np.bincount(ids[decode_rle(g["mask"]) > 0]).argmax()
        np.testing.assert_array_equal(decode_rle(g["mask"]), ids == k)
    # The checkpoint from object storage gives the same masks by hand (band 1 of the uint16 scene).
    payload["model_config"]["box_score_thresh"], payload["model_config"]["box_detections_per_img"] = 0.0, 15
    assert _check_rows_equal_direct_forward(rows, payload, lambda p: read_bytes(p, storage)) == row["num_instances"]

    # The export command on object storage: endpoint by flag, keys from the usual AWS_* variables.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(k, s3.env()[k])
    cli = CliRunner().invoke(app, ["export-coco", f"s3://{s3_bucket}/out/predictions",
                                   f"s3://{s3_bucket}/out/results.json", "--endpoint-url", s3.endpoint_url])
    assert cli.exit_code == 0, cli.output
    results = json.loads(read_bytes(f"s3://{s3_bucket}/out/results.json", storage))
    assert len(results) == row["num_instances"] and {r["image_id"] for r in results} == {1}
