"""Instance predictions (Parquet) -> COCO results JSON, the list that ``COCO.loadRes`` and other COCO
tools read: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}]``.

Image ids come from the ground-truth file when one is given (matched by ``file_name``, as
training and inference match them), else from the rows' ``coco_image_id`` (set when inference
had ``coco_json``), else from a numeric ``image_id``, else from the rows' order (sorted by
``image_id``, 1-based; the mapping is returned). Category ids come from the ground truth's
category of the same name, else from each instance's ``category_id``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from segray.config import StorageOptions
from segray.core.instances import CocoIndex
from segray.infer.sinks import committed_rows
from segray.io.fs import read_bytes, write_bytes

log = logging.getLogger(__name__)


def read_predictions(predictions: str, storage: StorageOptions | None = None,
                     columns: list[str] | None = None) -> list[dict]:
    """The committed rows of a run (its output folder or its predictions/ folder)."""
    cols = columns or ["image_id", "source_path", "status", "coco_image_id", "instances"]
    return committed_rows(predictions, storage, cols).to_pylist()


def coco_results(rows: list[dict], gt: CocoIndex | None = None, min_score: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    """(results, {image_id: COCO image id}) for the rows with status ok."""
    rows = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: str(r["image_id"]))
    ids: dict[str, int] = {}
    if gt is not None:
        matched = gt.match([r["source_path"] for r in rows])
        by_row = {idx: image_id for image_id, idx in matched.items()}
        missing = [r["source_path"] for i, r in enumerate(rows) if i not in by_row]
        if missing:
            log.warning("%d predicted images are not in the ground truth (e.g. %s): left out", len(missing), missing[0])
        ids = {rows[i]["image_id"]: image_id for i, image_id in by_row.items()}
    elif all(r.get("coco_image_id") is not None for r in rows):
        ids = {r["image_id"]: int(r["coco_image_id"]) for r in rows}
    elif all(str(r["image_id"]).isdigit() for r in rows):
        ids = {r["image_id"]: int(r["image_id"]) for r in rows}
    else:
        ids = {r["image_id"]: n for n, r in enumerate(rows, start=1)}
    names = {c["name"]: int(c["id"]) for c in gt.categories} if gt is not None else {}
    results = []
    for r in rows:
        if r["image_id"] not in ids:
            continue
        for inst in r["instances"] or []:
            if inst["score"] < min_score:
                continue
            x1, y1, x2, y2 = inst["box"]
            results.append({
                "image_id": ids[r["image_id"]],
                "category_id": names.get(inst["class_name"], int(inst["category_id"])),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(inst["score"]),
                "segmentation": {"size": list(inst["mask"]["size"]), "counts": inst["mask"]["counts"]},
            })
    return results, ids


def export_coco(predictions: str, out: str, storage: StorageOptions | None = None, gt_json: str | None = None,
                min_score: float = 0.0) -> dict[str, Any]:
    """Writes the COCO results JSON to ``out`` (local or object storage); returns counts."""
    rows = read_predictions(predictions, storage)
    gt = CocoIndex.parse(read_bytes(gt_json, storage)) if gt_json else None
    results, ids = coco_results(rows, gt, min_score)
    write_bytes(out, json.dumps(results).encode(), storage)
    return {"output": out, "detections": len(results), "images": len(ids),
            "rows": len(rows), "image_ids": ids}
