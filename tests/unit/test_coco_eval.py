"""segray's COCO figures equal pycocotools run directly (files in, COCOeval out) on the same predictions."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segray.core import coco_eval
from segray.core.instances import encode_rles, instances_from_id_mask

STEMS = ("2011_000003", "2011_000006", "2011_000025")


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(np.roll(m, dy, axis=0), dx, axis=1)


@pytest.fixture(scope="module")
def voc(shared_data):
    """Real VOC ground truth, and detections made from it: shifted/trimmed masks, misses and false alarms."""
    root = shared_data / "voc_labelme_instances"
    rng = np.random.default_rng(0)
    images, gts, dets = [], [], []
    for image_id, stem in enumerate(STEMS, start=1):
        ids = np.asarray(Image.open(root / "SegmentationObject" / f"{stem}.png")).astype(np.int64)
        classes = np.asarray(Image.open(root / "SegmentationClass" / f"{stem}.png")).astype(np.int64)
        inst, _ = instances_from_id_mask(ids, classes, ignore_index=255, num_classes=21)
        h, w = inst.size
        images.append({"id": image_id, "height": h, "width": w})
        if image_id == 2:
            inst.iscrowd[-1] = True  # one crowd region: matches to it are ignored
        gts += coco_eval.gt_records(image_id, inst)
        masks, labels, scores = [], [], []
        for k in range(len(inst)):
            if rng.random() < 0.2:
                continue  # a miss
            m = _shift(inst.masks[k], int(rng.integers(-6, 7)), int(rng.integers(-6, 7)))
            if rng.random() < 0.5:
                m[: int(rng.integers(0, h // 3))] = 0  # cut off the top
            if m.any():
                masks.append(m)
                labels.append(int(inst.labels[k]) if rng.random() < 0.85 else 7)
                scores.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(2):  # false alarms
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
            m[y : y + 30, x : x + 35] = 1
            masks.append(m)
            labels.append(int(rng.choice(inst.labels)))
            scores.append(float(rng.uniform(0.05, 0.6)))
        masks = np.stack(masks)
        from segray.core.instances import boxes_from_masks

        dets += coco_eval.detection_records(image_id, boxes_from_masks(masks), labels, scores, encode_rles(masks))
    names = (root / "class_names.txt").read_text().split("\n")
    return images, gts, dets, coco_eval.categories(names)


def _direct(tmp_path, images, gts, dets, cats, iou_type) -> np.ndarray:
    """pycocotools only: JSON files, COCO(file), loadRes(file), COCOeval. As Detectron2 does, mask
    results are evaluated without their boxes (mask area for the size split)."""
    gt_file, res_file = tmp_path / "gt.json", tmp_path / f"res_{iou_type}.json"
    anns = [dict(a, id=i) for i, a in enumerate(gts, start=1)]
    gt_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    results = [{k: v for k, v in d.items() if not (iou_type == "segm" and k == "bbox")
                and not (iou_type == "bbox" and k == "segmentation")} for d in dets]
    res_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(res_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_figures_equal_pycocotools_on_files(voc, tmp_path):
    images, gts, dets, cats = voc
    ours = coco_eval.evaluate(images, gts, dets, cats)
    for t in ("segm", "bbox"):
        direct = _direct(tmp_path, images, gts, dets, cats, t)
        got = np.array([ours[f"{t}_{n}"] for n in coco_eval.STAT_NAMES])
        np.testing.assert_allclose(got, direct, rtol=0, atol=1e-12)
    # Not trivially perfect or empty: the detections were made imperfect on purpose.
    assert 0.05 < ours["segm_ap"] < 0.95 and 0.05 < ours["bbox_ap"] < 0.95
    assert ours["segm_ap50"] >= ours["segm_ap"] >= 0


def test_perfect_and_empty_predictions(voc):
    images, gts, _, cats = voc
    perfect = [{"image_id": g["image_id"], "category_id": g["category_id"], "segmentation": g["segmentation"],
                "bbox": g["bbox"], "score": 0.9} for g in gts if not g["iscrowd"]]
    m = coco_eval.evaluate(images, gts, perfect, cats)
    assert m["segm_ap"] == pytest.approx(1.0) and m["bbox_ap"] == pytest.approx(1.0)
    none = coco_eval.evaluate(images, gts, [], cats)
    assert none["segm_ap"] == 0.0 and none["bbox_ar"] == 0.0
    no_gt = coco_eval.evaluate([images[0]], [], [], cats)
    assert no_gt["segm_ap"] == -1.0  # COCO's "undefined"


def test_categories_and_box_conversion():
    assert coco_eval.categories(["bg", "a", "b"]) == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert coco_eval.categories(["bg", "a"], [0, 17]) == [{"id": 17, "name": "a"}]
    assert coco_eval.xyxy_to_xywh(np.array([[1, 2, 4, 8]])) == [[1.0, 2.0, 3.0, 6.0]]
    summary = coco_eval.summarize_stats({"segm_ap": 0.5, "bbox_ap": 0.25, "segm_ap_small": 0.1})
    assert summary == {"segm_ap": 0.5, "bbox_ap": 0.25}
