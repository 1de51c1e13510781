"""Instance segmentation inference (Mask R-CNN checkpoints): read+decode -> predict -> encode -> Parquet.

The semantic pipeline's ``read_decode`` and its bad-input rules are shared: an unreadable or
undecodable image, a wrong band count, an oversized image or broken ground truth becomes an
error row (``status="error"`` and a reason), never a crashed job. ``pipeline.build_dataset``
sends checkpoints whose payload says ``task: instance`` here.

Output rows, one per input image (``INSTANCE_SCHEMA``):

=================  =========================  ==================================================
column             type                       meaning
=================  =========================  ==================================================
image_id           string                     id of the input (relative path without extension)
source_path        string                     URL of the image
status             string                     ``ok`` or ``error``
error              string (null)              why the row failed
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
decode_ms          float64                    read+decode time per image in its batch
predict_ms         float64                    model time per image in its batch
=================  =========================  ==================================================

The run summary adds the aggregate COCO figures over every image with ground truth
(``segm_ap``, ``segm_ap50``, ``segm_ap75``, ``segm_ar``, ``bbox_*``, and the small/medium/large
splits), computed by pycocotools' COCOeval from the written Parquet.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from segray.config import ConfigError, InferJobConfig, SourceConfig, StorageOptions
from segray.infer.steps import Predictor, _fetch, _reason, read_decode, same_shape_chunks
from segray.core import coco_eval
from segray.core.instances import CocoIndex, Instances, encode_rles, instances_from_coco, instances_from_id_mask
from segray.io.fs import get_fs, join, list_samples, pyarrow_fs, read_bytes
from segray.io.images import decode_mask
from segray.runtime import model_runtime_env

log = logging.getLogger(__name__)

_NO_IMAGE = np.zeros((1, 1, 1), np.float32)
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
        ("status", pa.string()),
        ("error", pa.string()),
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


# --------------------------------------------------------------------------- listing


def _stem(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url.replace("\\", "/")))[0]


def _class_mask_index(folder: str, storage: StorageOptions | None) -> dict[str, str]:
    """{file stem: URL} of every file under ``folder``."""
    fs, root = get_fs(folder, storage)
    if not fs.exists(root):
        raise FileNotFoundError(f"class_masks folder not found: {folder}")
    index: dict[str, str] = {}
    for name in sorted(fs.find(root)):
        if name.endswith("/"):
            continue
        url = name if "://" not in folder else f"{folder.split('://', 1)[0]}://{name}"
        index.setdefault(_stem(name), url)
    return index


def category_ids_for(class_names: Sequence[str], coco: CocoIndex | None, default: Sequence[int] | None = None) -> list[int]:
    """Label -> COCO category id: the file's category of the same name, else ``default``, else the label."""
    by_name = {c["name"]: int(c["id"]) for c in (coco.categories if coco else [])}
    out = []
    for k, name in enumerate(class_names):
        fallback = int(default[k]) if default is not None and k < len(default) else k
        out.append(by_name.get(name, fallback) if k else 0)
    return out


def instance_items(
    source: SourceConfig,
    storage: StorageOptions | None,
    class_names: Sequence[str],
    coco_json: str | None = None,
    class_masks: str | None = None,
    mask_suffix: str = "",
) -> tuple[list[dict], dict[int, int] | None, CocoIndex | None]:
    """Rows for the decode step: every listed image with its ground truth, if any.

    Returns (items, {COCO category id: label} or None, the parsed COCO file or None). Items have
    ``image, mask, class_mask, annotations, coco_image_id, image_id, row_index``.
    """
    samples = list_samples(source, storage)
    coco = cat_labels = None
    matched: dict[int, int] = {}
    if coco_json:
        coco = CocoIndex.parse(read_bytes(coco_json, storage))
        cat_labels = coco.category_labels(class_names)
        matched = {idx: image_id for image_id, idx in coco.match([s.image for s in samples]).items()}
    classes = _class_mask_index(class_masks, storage) if class_masks else {}
    items = []
    for i, s in enumerate(samples):
        anns, coco_id = "", -1
        if i in matched:
            coco_id = matched[i]
            im = coco.images[coco_id]  # type: ignore[union-attr]
            anns = json.dumps({"height": im.get("height"), "width": im.get("width"),
                               "annotations": coco.annotations[coco_id]})  # type: ignore[union-attr]
        class_mask = ""
        if class_masks and s.mask:
            stem = _stem(s.image)
            class_mask = classes.get(stem) or classes.get(stem + mask_suffix) or ""
        items.append({"image": s.image, "mask": s.mask or "", "class_mask": class_mask, "annotations": anns,
                      "coco_image_id": coco_id, "image_id": s.image_id, "row_index": i})
    return items, cat_labels, coco


# --------------------------------------------------------------------------- read + decode


def read_decode_instances(
    batch: dict[str, Any],
    storage: StorageOptions | None = None,
    bands: list[int] | None = None,
    max_pixels: int | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    category_labels: list[list[int]] | None = None,
) -> dict[str, Any]:
    """``read_decode`` plus the ground truth as ``target`` (``Instances`` JSON, '' without).

    Instance-id masks (``mask``), class maps (``class_mask``) and COCO annotations
    (``annotations``) are read here; broken ground truth makes the row an error row.
    """
    n = len(batch["image"])
    base = read_decode({"image": batch["image"], "mask": batch["mask"], "image_id": batch["image_id"]},
                       storage=storage, bands=bands, max_pixels=max_pixels)
    class_urls = [str(u) if u else "" for u in batch["class_mask"]]
    wanted = [u for u, s in zip(class_urls, base["status"]) if u and s == "ok"]
    class_data = dict(zip(wanted, _fetch(wanted, storage))) if wanted else {}
    labels = {int(c): int(lab) for c, lab in (category_labels or [])}
    status, error = list(base["status"]), list(base["error"])
    targets = [""] * n
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            h, w = int(base["height"][i]), int(base["width"][i])
            if batch["mask"][i]:
                class_map = None
                if class_urls[i]:
                    data = class_data[class_urls[i]]
                    if isinstance(data, Exception):
                        raise ValueError(f"class map {class_urls[i]}: {_reason(data)}")
                    class_map = decode_mask(data, class_urls[i])
                    if class_map.shape != (h, w):
                        raise ValueError(f"class map is {class_map.shape}, image is {(h, w)}")
                inst, warnings = instances_from_id_mask(base["gt"][i], class_map, ignore_index, num_classes)
                for msg in warnings:
                    log.warning("%s: %s", base["source_path"][i], msg)
                targets[i] = inst.to_json()
            elif batch["annotations"][i]:
                entry = json.loads(str(batch["annotations"][i]))
                if entry.get("height") and entry.get("width") and (int(entry["height"]), int(entry["width"])) != (h, w):
                    raise ValueError(f"COCO says {entry['height']}x{entry['width']} (HxW), image is {h}x{w}")
                targets[i] = instances_from_coco(entry["annotations"], h, w, labels).to_json()
        except Exception as exc:  # broken ground truth: an error row, like a broken image
            status[i], error[i] = "error", f"ground truth: {type(exc).__name__}: {exc}"
    out = {k: v for k, v in base.items() if k != "gt"}
    ok = np.array([s == "ok" for s in status])
    out["pixels"] = [p if k else _NO_IMAGE for p, k in zip(base["pixels"], ok)]
    for col in ("height", "width", "bands"):
        out[col] = [v if k else 0 for v, k in zip(base[col], ok)]
    out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
               target=np.array(targets, dtype=object), has_gt=np.array([bool(t) for t in targets]),
               coco_image_id=np.asarray(batch["coco_image_id"], np.int64),
               row_index=np.asarray(batch["row_index"], np.int64))
    return out


# --------------------------------------------------------------------------- predict


class InstancePredictor(Predictor):
    """Loads a Mask R-CNN checkpoint once; maps decoded batches to detections (RLE masks)."""

    task = "instance"

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
        status, error, todo = self.usable(batch)
        preds = [""] * len(status)
        for i, p in zip(todo, self.predict([batch["pixels"][i] for i in todo])):
            preds[i] = json.dumps({"boxes": np.round(p["boxes"].astype(np.float64), 2).tolist(),
                                   "labels": p["labels"].tolist(), "scores": p["scores"].tolist(),
                                   "counts": [r["counts"] for r in p["rles"]], "areas": p["areas"].tolist()})
        n = len(status)
        out = {k: v for k, v in batch.items() if k != "pixels"}  # drop pixels early: memory
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
                   pred=np.array(preds, dtype=object), model_name=np.full(n, self.model_cfg.name, dtype=object),
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
        for col in ("image_id", "source_path", "status", "error", "height", "width", "bands",
                    "model_name", "checkpoint_id", "decode_ms", "predict_ms"):
            v = batch[col][i]
            rows[col].append(v.item() if isinstance(v, np.generic) else v)
        rows["error"][-1] = rows["error"][-1] or None
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


def build_instance_dataset(cfg: InferJobConfig, samples: list, payload: dict):
    """The lazy Ray Dataset of instance rows; ``samples`` (already listed) fix the row count."""
    import ray
    from ray.data import ActorPoolStrategy

    if payload.get("task") != "instance":
        raise ConfigError("coco_json/class_masks: ground truth of instances needs an instance (Mask R-CNN) checkpoint")
    class_names = payload["class_names"]
    items, cat_labels, coco = instance_items(cfg.source, cfg.storage, class_names, cfg.coco_json, cfg.class_masks,
                                             cfg.source.mask_suffix)
    if len(items) != len(samples):
        raise ValueError(f"source changed while listing: {len(items)} images now, {len(samples)} before")
    category_ids = category_ids_for(class_names, coco, payload.get("category_ids"))
    blocks = max(1, min(len(items), max(cfg.num_actors * 4, math.ceil(len(items) / (cfg.batch_size * 2)))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        read_decode_instances,
        fn_kwargs={"storage": cfg.storage, "bands": payload.get("bands"), "max_pixels": cfg.max_pixels,
                   "num_classes": len(class_names), "ignore_index": payload.get("ignore_index"),
                   "category_labels": [[c, lab] for c, lab in (cat_labels or {}).items()]},
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_task,
    )
    ds = ds.map_batches(
        InstancePredictor,
        fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size,
                               "score_threshold": cfg.score_threshold, "max_detections": cfg.max_detections,
                               "mask_threshold": cfg.mask_threshold},
        compute=ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        runtime_env=model_runtime_env(),
    )
    return ds.map_batches(
        encode_instances,
        fn_kwargs={"class_names": class_names, "category_ids": category_ids},
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_task,
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


def summarize_instances(cfg: InferJobConfig, payload: dict, ckpt_id: str, num_inputs: int, wall_s: float) -> dict[str, Any]:
    import pyarrow.dataset as pads

    from segray.infer.pipeline import PREDICTIONS, run_counts

    fs, path = pyarrow_fs(join(cfg.output, PREDICTIONS), cfg.storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    cols = ["status", "error", "height", "width", "decode_ms", "predict_ms", "num_instances", "has_ground_truth"]
    table = dataset.to_table(columns=cols)
    ok = np.asarray(table["status"].to_pylist()) == "ok"
    counts = np.asarray(table["num_instances"].to_pylist(), float)
    summary: dict[str, Any] = {"task": "instance", **run_counts(cfg, payload, ckpt_id, num_inputs, wall_s, table),
                               "num_instances": int(counts[ok].sum()),
                               "mean_instances_per_image": float(counts[ok].mean()) if ok.any() else 0.0}
    with_gt = pads.field("has_ground_truth") == True  # noqa: E712 - a pyarrow expression
    gt_rows = dataset.to_table(columns=["height", "width", "instances", "gt_instances"], filter=with_gt).to_pylist()
    summary["num_with_ground_truth"] = len(gt_rows)
    if gt_rows:
        summary.update(aggregate_metrics(gt_rows))
    return summary
