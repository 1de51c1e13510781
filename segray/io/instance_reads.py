"""Listing and reading instance ground truth: instance-id masks, class maps and COCO annotations.

Mask R-CNN training data and instance inference both start here. Broken ground truth makes
the row an error row, like a broken image (:func:`segray.io.reads.read_decode`).
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any, Sequence

import numpy as np

from segray.config import StorageOptions
from segray.core.instances import CocoIndex, instances_from_coco, instances_from_id_mask
from segray.io.fs import Sample, get_fs, read_bytes, readable_path
from segray.io.images import decode_mask
from segray.io.reads import NO_IMAGE, fetch_many, item_urls, path_item, read_decode, read_reason

log = logging.getLogger(__name__)


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
    samples: list[Sample],
    storage: StorageOptions | None,
    class_names: Sequence[str],
    coco_json: str | None = None,
    class_masks: str | None = None,
    mask_suffix: str = "",
) -> tuple[list[dict], dict[int, int] | None, CocoIndex | None]:
    """Rows for the decode step: every sample (as listed, in order) with its ground truth, if any.

    Returns (items, {COCO category id: label} or None, the parsed COCO file or None). Items have
    ``image, mask, class_mask, annotations, coco_image_id, image_id, row_index`` (the URLs as
    :func:`segray.io.reads.path_item` gives them, with their ``*_path_bytes``).
    """
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
        items.append({**path_item("image", s.image), **path_item("mask", s.mask), **path_item("class_mask", class_mask),
                      "annotations": anns, "coco_image_id": coco_id, "image_id": s.image_id, "row_index": i})
    return items, cat_labels, coco


def _class_map(class_data: dict, url: str | None, h: int, w: int) -> np.ndarray | None:
    """The class map paired with an instance-id mask (``class_mask``), checked against the image."""
    if not url:
        return None
    data = class_data[url]
    if isinstance(data, Exception):
        raise ValueError(f"class map: {read_reason(data, url)[1]}")
    class_map = decode_mask(data, url)
    if class_map.shape != (int(h), int(w)):
        raise ValueError(f"class map is {class_map.shape}, image is {(int(h), int(w))}")
    return class_map


def _target(batch: dict, base: dict, i: int, class_map, labels: dict, ignore_index, num_classes) -> str:
    """Row ``i``'s ground truth as ``Instances`` JSON: from its id mask or its COCO annotations."""
    h, w = int(base["height"][i]), int(base["width"][i])
    if batch["mask"][i]:
        inst, warnings = instances_from_id_mask(base["gt"][i], class_map, ignore_index, num_classes)
        for msg in warnings:
            log.warning("%s: %s", base["source_path"][i], msg)
        return inst.to_json()
    if batch["annotations"][i]:
        entry = json.loads(str(batch["annotations"][i]))
        if entry.get("height") and entry.get("width") and (int(entry["height"]), int(entry["width"])) != (h, w):
            raise ValueError(f"COCO says {entry['height']}x{entry['width']} (HxW), image is {h}x{w}")
        return instances_from_coco(entry["annotations"], h, w, labels).to_json()
    return ""


def read_decode_instances(
    batch: dict[str, Any],
    storage: StorageOptions | None = None,
    bands: list[int] | None = None,
    max_pixels: int | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    category_labels: list[list[int]] | None = None,
    full_scale: float | None = None,
    out_of_range: str = "warn",
) -> dict[str, Any]:
    """``read_decode`` plus the ground truth as ``target`` (``Instances`` JSON, '' without).

    Instance-id masks (``mask``), class maps (``class_mask``) and COCO annotations
    (``annotations``) are read here; broken ground truth makes the row an error row
    (``mask_mismatch``).
    """
    n = len(batch["image"])
    keys = [k for k in ("image", "image_path_bytes", "mask", "mask_path_bytes", "image_id") if k in batch]
    base = read_decode({k: batch[k] for k in keys}, storage=storage, bands=bands, max_pixels=max_pixels,
                       full_scale=full_scale, out_of_range=out_of_range)
    class_urls = item_urls(batch, "class_mask")
    wanted = [u for u, s in zip(class_urls, base["status"]) if u and s == "ok"]
    class_data = dict(zip(wanted, fetch_many(wanted, storage))) if wanted else {}
    labels = {int(c): int(lab) for c, lab in (category_labels or [])}
    status, error, kinds = list(base["status"]), list(base["error"]), list(base["error_kind"])
    targets = [""] * n
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            class_map = (_class_map(class_data, class_urls[i], base["height"][i], base["width"][i])
                         if batch["mask"][i] else None)
            targets[i] = _target(batch, base, i, class_map, labels, ignore_index, num_classes)
        except Exception as exc:  # broken ground truth: an error row, like a broken image
            status[i], kinds[i] = "error", "mask_mismatch"
            error[i] = readable_path(f"mask_mismatch: ground truth: {type(exc).__name__}: {exc}")
    out = {k: v for k, v in base.items() if k != "gt"}
    ok = np.array([s == "ok" for s in status])
    out["pixels"] = [p if k else NO_IMAGE for p, k in zip(base["pixels"], ok)]
    for col in ("height", "width", "bands"):
        out[col] = [v if k else 0 for v, k in zip(base[col], ok)]
    out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
               error_kind=np.array(kinds, dtype=object),
               target=np.array(targets, dtype=object), has_gt=np.array([bool(t) for t in targets]),
               coco_image_id=np.asarray(batch["coco_image_id"], np.int64),
               row_index=np.asarray(batch["row_index"], np.int64))
    return out
