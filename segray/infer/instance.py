"""Instance segmentation inference (Mask R-CNN checkpoints): read+decode -> predict -> encode -> Parquet.

The semantic pipeline's ``read_decode`` and its bad-input rules are shared
(:mod:`segray.io.instance_reads` adds the ground truth): an unreadable or
undecodable image, a wrong band count, an oversized image or broken ground truth becomes an
error row (``status="error"`` and a reason), never a crashed job. These are the instance
family's parts (:mod:`segray.infer.families`), for checkpoints whose ``task`` is ``instance``.

Output rows, one per input image (``INSTANCE_SCHEMA``):

=================  =========================  ==================================================
column             type                       meaning
=================  =========================  ==================================================
image_id           string                     id of the input (relative path without extension)
source_path        string                     URL of the image (readable: bytes of a name that are
                                              not UTF-8 as ``\\xff`` escapes)
source_path_bytes  binary (null)              the exact path bytes, only when not valid UTF-8
status             string                     ``ok`` or ``error``
error              string (null)              why the row failed (begins with its kind)
error_kind         string (null)              stable reason kind (``segray.io.images.KINDS``)
warnings           list<string>               e.g. ``out_of_range: ...`` (empty for none)
height, width      int32                      image size (0 on error)
bands              int32                      band count (0 on error)
model_name         string                     e.g. ``maskrcnn_resnet50_fpn``
checkpoint_id      string                     content hash of the checkpoint file
coco_image_id      int64 (null)               the image's id in ``coco_json`` ground truth
num_instances      int32                      detections kept (score >= threshold, at most max)
instances          list<struct>               detections, best score first:
  .label           int32                      class index (1..K-1; 0 is the background)
  .class_name      string                     ``class_names[label]``
  .category_id     int64                      COCO category id (ground truth's, checkpoint's, or label)
  .score           float32                    detection score
  .box             list<float32> (4)          ``x1, y1, x2, y2`` in pixels of the input image
  .mask            struct<size, counts>       COCO RLE: ``size`` [H, W], ``counts`` compressed string
  .area            int64                      mask pixels
has_ground_truth   bool                       ground truth was given and read
num_gt             int32 (null)               ground-truth objects (crowd regions included)
gt_instances       list<struct> (null)        ground truth, same fields (score 1) + ``iscrowd``
segm_ap ...        float64 (null)             per-image COCO figures: segm_ap, segm_ap50, segm_ap75,
                                              segm_ar, bbox_ap, bbox_ap50, bbox_ap75, bbox_ar
                                              (null without ground truth or where COCO gives -1)
decode_ms          float64                    this image's decode, plus its share of the batch's fetch
predict_ms         float64                    model time per image in its batch
=================  =========================  ==================================================

The run summary adds the aggregate COCO figures over every image with ground truth
(``segm_ap``, ``segm_ap50``, ``segm_ap75``, ``segm_ar``, ``bbox_*``, and the small/medium/large
splits), computed by pycocotools' COCOeval from the written Parquet.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segray.config import ConfigError, InferJobConfig, StorageOptions
from segray.infer.family import ImageStages
from segray.infer.runs import PREDICTIONS, run_counts
from segray.infer.steps import Predictor, row_paths, row_problems, same_shape_chunks
from segray.io.instance_reads import category_ids_for, instance_items, read_decode_instances
from segray.core import coco_eval
from segray.core.checkpoint import Checkpoint
from segray.core.instances import Instances, encode_rles
from segray.io.fs import join, pyarrow_fs
from segray.io.listing import samples_of
from segray.io.images import full_scale


PER_IMAGE_METRICS = ("segm_ap", "segm_ap50", "segm_ap75", "segm_ar", "bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ar")

_RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
INSTANCE_TYPE = pa.struct([
    ("label", pa.int32()),
    ("class_name", pa.string()),
    ("category_id", pa.int64()),
    ("score", pa.float32()),
    ("box", pa.list_(pa.float32())),
    ("mask", _RLE_TYPE),
    ("area", pa.int64()),
])
GT_INSTANCE_TYPE = pa.struct(list(INSTANCE_TYPE) + [pa.field("iscrowd", pa.bool_())])

INSTANCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("source_path_bytes", pa.binary()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("warnings", pa.list_(pa.string())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bands", pa.int32()),
        ("model_name", pa.string()),
        ("checkpoint_id", pa.string()),
        ("coco_image_id", pa.int64()),
        ("num_instances", pa.int32()),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("has_ground_truth", pa.bool_()),
        ("num_gt", pa.int32()),
        ("gt_instances", pa.list_(GT_INSTANCE_TYPE)),
    ]
    + [(k, pa.float64()) for k in PER_IMAGE_METRICS]
    + [("decode_ms", pa.float64()), ("predict_ms", pa.float64())]
)


# --------------------------------------------------------------------------- predict


class InstancePredictor(Predictor):
    """Loads a Mask R-CNN checkpoint once; maps decoded batches to detections (RLE masks)."""

    task = "instance"
    returns_logits = False  # detections: no logits runtime, no TTA

    def __init__(self, checkpoint: str, storage: StorageOptions | None = None, device: str | None = None,
                 amp: bool = True, max_batch: int = 16, score_threshold: float | None = None,
                 max_detections: int | None = None, mask_threshold: float | None = None):
        from segray.core.models.maskrcnn import set_inference_limits

        super().__init__(checkpoint, storage, device, amp, max_batch)
        self.mask_threshold = mask_threshold if mask_threshold is not None else self.model_cfg.mask_threshold
        set_inference_limits(self.model, score_threshold, max_detections)

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(image, np.float32)) - self.mean) / self.std

    @torch.inference_mode()
    def raw(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The model's own output per image (same-size images share a forward pass)."""
        results: list[Any] = [None] * len(images)
        for chunk in same_shape_chunks(images, self.max_batch):
            x = [self.normalize(images[i]).to(self.device, non_blocking=True) for i in chunk]
            with torch.autocast(self.device.type, enabled=self.amp):
                outputs = self.model(x)
            for i, o in zip(chunk, outputs):
                results[i] = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
        return results

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Per image: boxes ``[N, 4]`` xyxy, labels, scores and RLE masks (``prob > mask_threshold``)."""
        out = []
        for o in self.raw(images):
            masks = (o["masks"][:, 0] > self.mask_threshold).numpy()
            out.append({"boxes": o["boxes"].numpy(), "labels": o["labels"].numpy(), "scores": o["scores"].numpy(),
                        "rles": encode_rles(masks), "areas": masks.sum(axis=(1, 2), dtype=np.int64)})
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        status, error, kinds, todo = self.checked(batch)
        preds = [""] * len(status)
        for i, p in zip(todo, self.predict([batch["pixels"][i] for i in todo])):
            preds[i] = json.dumps({"boxes": np.round(p["boxes"].astype(np.float64), 2).tolist(),
                                   "labels": p["labels"].tolist(), "scores": p["scores"].tolist(),
                                   "counts": [r["counts"] for r in p["rles"]], "areas": p["areas"].tolist()})
        n = len(status)
        out = {k: v for k, v in batch.items() if k != "pixels"}  # drop pixels early: memory
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
                   error_kind=np.array(kinds, dtype=object), pred=np.array(preds, dtype=object), model_name=np.full(n, self.model_cfg.name, dtype=object),
                   checkpoint_id=np.full(n, self.checkpoint_id, dtype=object),
                   predict_ms=np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1)))
        return out


# --------------------------------------------------------------------------- encode


def _per_image_metrics(h: int, w: int, gt: Instances, gt_rles: list, pred: dict, labels: list[int]) -> dict:
    dets = coco_eval.detection_records(1, np.asarray(pred["boxes"]).reshape(-1, 4), pred["labels"],
                                       pred["scores"], [{"size": [h, w], "counts": c} for c in pred["counts"]])
    gts = coco_eval.gt_records(1, gt, gt_rles)
    cats = [{"id": k, "name": str(k)} for k in labels]
    metrics = coco_eval.evaluate([{"id": 1, "height": h, "width": w}], gts, dets, cats)
    return {k: (metrics[k] if metrics[k] >= 0 else None) for k in PER_IMAGE_METRICS}


def encode_instances(batch: dict[str, Any], class_names: list[str], category_ids: list[int]) -> pa.Table:
    """Detections (and ground truth) -> Arrow rows of ``INSTANCE_SCHEMA``."""
    rows: dict[str, list] = {f.name: [] for f in INSTANCE_SCHEMA}
    labels_all = list(range(1, len(class_names)))
    for i in range(len(batch["status"])):
        ok = batch["status"][i] == "ok"
        h, w = int(batch["height"][i]), int(batch["width"][i])
        for col in ("image_id", "status", "height", "width", "bands", "model_name", "checkpoint_id",
                    "decode_ms", "predict_ms"):
            v = batch[col][i]
            rows[col].append(v.item() if isinstance(v, np.generic) else v)
        for col, v in {**row_paths(batch, i), **row_problems(batch, i)}.items():
            rows[col].append(v)
        coco_id = int(batch["coco_image_id"][i])
        rows["coco_image_id"].append(coco_id if coco_id >= 0 else None)
        pred = json.loads(batch["pred"][i]) if ok and batch["pred"][i] else None
        instances = None
        if pred is not None:
            instances = [
                {"label": int(lab), "class_name": class_names[lab] if 0 <= lab < len(class_names) else str(lab),
                 "category_id": category_ids[lab] if 0 <= lab < len(category_ids) else int(lab), "score": float(s),
                 "box": [float(v) for v in box], "mask": {"size": [h, w], "counts": c}, "area": int(a)}
                for lab, s, box, c, a in zip(pred["labels"], pred["scores"], pred["boxes"], pred["counts"], pred["areas"])
            ]
        rows["instances"].append(instances)
        rows["num_instances"].append(len(instances) if instances is not None else 0)
        has_gt = ok and bool(batch["has_gt"][i])
        rows["has_ground_truth"].append(has_gt)
        metrics: dict[str, Any] = {k: None for k in PER_IMAGE_METRICS}
        gt_rows = None
        if has_gt:
            gt = Instances.from_json(str(batch["target"][i]))
            gt_rles = encode_rles(gt.masks)
            gt_rows = [
                {"label": int(lab), "class_name": class_names[lab] if lab < len(class_names) else str(lab),
                 "category_id": category_ids[lab] if lab < len(category_ids) else int(lab), "score": 1.0,
                 "box": [float(v) for v in box], "mask": r, "area": int(a), "iscrowd": bool(c)}
                for lab, box, r, a, c in zip(gt.labels, gt.boxes, gt_rles, gt.areas(), gt.iscrowd)
            ]
            if pred is not None:
                metrics = _per_image_metrics(h, w, gt, gt_rles, pred, labels_all)
        rows["gt_instances"].append(gt_rows)
        rows["num_gt"].append(len(gt_rows) if gt_rows is not None else None)
        for k, v in metrics.items():
            rows[k].append(v)
    return pa.Table.from_pydict(rows, schema=INSTANCE_SCHEMA)


# --------------------------------------------------------------------------- pipeline


def instance_stages(cfg: InferJobConfig, listed: pa.Table, ckpt: Checkpoint) -> ImageStages:
    """The instance family's images run; the listing fixes the row count."""
    if cfg.tta or cfg.predictor != "eager":
        raise ConfigError("tta/predictor: test-time augmentation and ONNX Runtime serve semantic checkpoints only "
                          f"(this one is {ckpt.model_name}, an instance model)")
    class_names = ckpt.class_names
    items, cat_labels, coco = instance_items(samples_of(listed), cfg.storage, class_names, cfg.coco_json, cfg.class_masks,
                                             cfg.source.mask_suffix)
    return ImageStages(
        items=items,
        read=read_decode_instances,
        read_kwargs={"storage": cfg.storage, "bands": ckpt.bands, "max_pixels": cfg.max_pixels,
                     "full_scale": full_scale(ckpt.band_stats), "out_of_range": cfg.out_of_range,
                     "num_classes": len(class_names), "ignore_index": ckpt.ignore_index,
                     "category_labels": [[c, lab] for c, lab in (cat_labels or {}).items()]},
        predictor=InstancePredictor,
        predictor_kwargs={"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size,
                          "score_threshold": cfg.score_threshold, "max_detections": cfg.max_detections,
                          "mask_threshold": cfg.mask_threshold},
        encode=encode_instances,
        encode_kwargs={"class_names": class_names,
                       "category_ids": category_ids_for(class_names, coco, ckpt.category_ids)},
    )


def aggregate_metrics(rows: list[dict]) -> dict[str, float]:
    """COCO figures over rows with ground truth (``instances``/``gt_instances`` as written)."""
    images, gts, dets = [], [], []
    labels: set[int] = set()
    for n, r in enumerate(rows, start=1):
        images.append({"id": n, "height": r["height"], "width": r["width"]})
        for g in r["gt_instances"] or []:
            labels.add(g["label"])
            x1, y1, x2, y2 = g["box"]
            gts.append({"image_id": n, "category_id": g["label"], "segmentation": g["mask"],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(g["area"]), "iscrowd": int(g["iscrowd"])})
        for d in r["instances"] or []:
            labels.add(d["label"])
            x1, y1, x2, y2 = d["box"]
            dets.append({"image_id": n, "category_id": d["label"], "segmentation": d["mask"],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]})
    cats = [{"id": k, "name": str(k)} for k in sorted(labels)]
    return coco_eval.evaluate(images, gts, dets, cats)


def summarize_instances(cfg: InferJobConfig, ckpt: Checkpoint, num_inputs: int, wall_s: float) -> dict[str, Any]:
    import pyarrow.dataset as pads

    fs, path = pyarrow_fs(join(cfg.output, PREDICTIONS), cfg.storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    cols = ["status", "error_kind", "height", "width", "decode_ms", "predict_ms", "num_instances", "has_ground_truth"]
    table = dataset.to_table(columns=cols)
    ok = np.asarray(table["status"].to_pylist()) == "ok"
    counts = np.asarray(table["num_instances"].to_pylist(), float)
    summary: dict[str, Any] = {"task": "instance", **run_counts(cfg, ckpt, num_inputs, wall_s, table),
                               "num_instances": int(counts[ok].sum()),
                               "mean_instances_per_image": float(counts[ok].mean()) if ok.any() else 0.0}
    with_gt = pads.field("has_ground_truth") == True  # noqa: E712 - a pyarrow expression
    gt_rows = dataset.to_table(columns=["height", "width", "instances", "gt_instances"], filter=with_gt).to_pylist()
    summary["num_with_ground_truth"] = len(gt_rows)
    if gt_rows:
        summary.update(aggregate_metrics(gt_rows))
    return summary
