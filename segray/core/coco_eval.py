"""COCO box and mask metrics with pycocotools' own COCOeval, from in-memory ground truth and detections.

Records are plain COCO dicts, the same that COCO JSON files hold, so segray's figures are
exactly what pycocotools gives on files:

- ground truth: ``{"image_id", "category_id", "segmentation": RLE, "bbox": [x, y, w, h], "area",
  "iscrowd"}``
- detections: ``{"image_id", "category_id", "segmentation": RLE, "bbox": [x, y, w, h], "score"}``

As in Detectron2, mask AP is computed from detections without their boxes, so COCO's
small/medium/large split uses the mask area, not the box area.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segray.core.instances import Instances, encode_rles

# COCOeval.stats order (maxDets 1, 10, 100; "ar" is AR@100).
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
              "ar1", "ar10", "ar", "ar_small", "ar_medium", "ar_large")
IOU_TYPES = ("segm", "bbox")


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints, also where ``builtins.print`` is patched (Ray Train
    workers log every print): its modules get a no-op ``print`` for the duration."""
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    saved = [m.__dict__.get("print") for m in modules]
    for m in modules:
        m.print = lambda *a, **k: None  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for m, old in zip(modules, saved):
            if old is None:
                m.__dict__.pop("print", None)
            else:
                m.print = old  # type: ignore[attr-defined]


def xyxy_to_xywh(boxes: np.ndarray) -> list[list[float]]:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1).tolist()


def categories(class_names: Sequence[str], category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO categories for labels 1..K-1 (label 0 is the background); ids default to the labels."""
    ids = list(category_ids) if category_ids is not None else list(range(len(class_names)))
    return [{"id": int(ids[k]), "name": class_names[k]} for k in range(1, len(class_names))]


def gt_records(image_id: int, inst: Instances, rles: Sequence[Mapping] | None = None,
               category_ids: Sequence[int] | None = None) -> list[dict]:
    """Ground-truth annotations of one image (``rles`` when already encoded)."""
    rles = list(rles) if rles is not None else encode_rles(inst.masks)
    areas = [float(mask_utils.area(_bytes(r))) for r in rles]
    cat = (lambda k: int(category_ids[k])) if category_ids is not None else int
    return [
        {"image_id": int(image_id), "category_id": cat(int(lab)), "segmentation": dict(r), "bbox": box,
         "area": area, "iscrowd": int(crowd)}
        for lab, r, box, area, crowd in zip(inst.labels, rles, xyxy_to_xywh(inst.boxes), areas, inst.iscrowd)
    ]


def detection_records(image_id: int, boxes: np.ndarray, labels: Iterable[int], scores: Iterable[float],
                      rles: Sequence[Mapping], category_ids: Sequence[int] | None = None) -> list[dict]:
    """Detections of one image in COCO results form."""
    cat = (lambda k: int(category_ids[k])) if category_ids is not None else int
    return [
        {"image_id": int(image_id), "category_id": cat(int(lab)), "segmentation": dict(r), "bbox": box,
         "score": float(s)}
        for lab, s, r, box in zip(labels, scores, rles, xyxy_to_xywh(boxes))
    ]


def _bytes(rle: Mapping) -> dict:
    c = rle["counts"]
    return {"size": list(rle["size"]), "counts": c.encode("ascii") if isinstance(c, str) else c}


def coco_ground_truth(images: Sequence[Mapping], annotations: Sequence[Mapping], cats: Sequence[Mapping]) -> COCO:
    """An in-memory ``COCO`` object, as ``COCO(path)`` would build from the same JSON."""
    anns = []
    for i, a in enumerate(annotations, start=1):
        a = dict(a)
        a.setdefault("id", i)
        if "segmentation" in a and isinstance(a["segmentation"], Mapping):
            a["segmentation"] = _bytes(a["segmentation"])
        anns.append(a)
    gt = COCO()
    gt.dataset = {"images": [dict(im) for im in images], "annotations": anns, "categories": [dict(c) for c in cats]}
    with _quiet():
        gt.createIndex()
    return gt


def _results(gt: COCO, dets: Sequence[Mapping], iou_type: str) -> COCO:
    """``gt.loadRes`` for one IoU type; an empty result set where loadRes would fail on none."""
    keep = ("segmentation",) if iou_type == "segm" else ("bbox",)
    anns = [{k: (_bytes(v) if k == "segmentation" else copy.deepcopy(v)) for k, v in d.items()
             if k in keep or k in ("image_id", "category_id", "score")} for d in dets]
    with _quiet():
        if anns:
            return gt.loadRes(anns)
        res = COCO()
        res.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                       "annotations": []}
        res.createIndex()
        return res


def run_cocoeval(gt: COCO, dets: Sequence[Mapping], iou_type: str, img_ids: Sequence[int] | None = None) -> np.ndarray:
    """COCOeval.evaluate/accumulate/summarize; returns the 12 ``stats`` (-1 where undefined)."""
    res = _results(gt, dets, iou_type)
    ev = COCOeval(gt, res, iouType=iou_type)
    if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def evaluate(
    images: Sequence[Mapping],
    gt_annotations: Sequence[Mapping],
    detections: Sequence[Mapping],
    cats: Sequence[Mapping],
    iou_types: Sequence[str] = IOU_TYPES,
    prefix: str = "",
) -> dict[str, float]:
    """``{f"{prefix}{iou}_{stat}": value}`` for every IoU type and COCO stat."""
    gt = coco_ground_truth(images, gt_annotations, cats)
    out: dict[str, float] = {}
    for t in iou_types:
        stats = run_cocoeval(gt, detections, t)
        out.update({f"{prefix}{t}_{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
    return out


def summarize_stats(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The headline figures (AP, AP50, AP75, AR for masks and boxes) of ``evaluate``'s output."""
    keys = [f"{prefix}{t}_{s}" for t in IOU_TYPES for s in ("ap", "ap50", "ap75", "ar")]
    return {k: float(metrics[k]) for k in keys if k in metrics}
