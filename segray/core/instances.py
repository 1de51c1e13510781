"""Instance targets: instance-id masks and COCO JSON -> per-image instances, COCO RLE, joint flips.

An image's instances are an :class:`Instances`: boxes ``float32 [N, 4]`` as ``x1, y1, x2, y2``
on pixel *edges* (a one-pixel object at column 5 spans x 5..6, as COCO's ``[x, y, w, h]``), so
every non-empty mask has a box of positive size, as Mask R-CNN requires; labels ``int64 [N]``
(1..K-1, 0 is the background); masks ``uint8 [N, H, W]``; ``iscrowd`` ``bool [N]`` (COCO crowd
regions: kept for evaluation, never trained on).

Masks travel as COCO RLE (``{"size": [H, W], "counts": str}``, the compressed string form),
which is what COCO tools read and what pycocotools encodes and decodes in C.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from segray.core.transforms import photometric

log = logging.getLogger(__name__)

RLE = dict  # {"size": [h, w], "counts": str}


# --------------------------------------------------------------------------- RLE


def encode_rles(masks: np.ndarray) -> list[RLE]:
    """``[N, H, W]`` (any dtype, nonzero = inside) -> N compressed COCO RLEs with ``str`` counts."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray((masks != 0).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def encode_rle(mask: np.ndarray) -> RLE:
    """One ``[H, W]`` mask -> compressed COCO RLE."""
    return encode_rles(np.asarray(mask)[None])[0]


def _c_rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        h, w = rle["size"]
        return mask_utils.frPyObjects(dict(rle), int(h), int(w))
    return {"size": [int(v) for v in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle(rle: Mapping) -> np.ndarray:
    """COCO RLE (compressed or not) -> ``uint8 [H, W]`` of 0/1."""
    return np.ascontiguousarray(mask_utils.decode(_c_rle(rle)))


def decode_rles(rles: Sequence[Mapping], height: int, width: int) -> np.ndarray:
    """RLEs -> ``uint8 [N, H, W]`` (``[0, H, W]`` for none)."""
    if not rles:
        return np.zeros((0, height, width), np.uint8)
    out = mask_utils.decode([_c_rle(r) for r in rles])  # [H, W, N], Fortran order
    if out.shape[:2] != (height, width):
        raise ValueError(f"RLE size {out.shape[:2]} differs from the image's {(height, width)}")
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def rle_area(rle: Mapping) -> int:
    return int(mask_utils.area(_c_rle(rle)))


# --------------------------------------------------------------------------- instances


@dataclass
class Instances:
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    iscrowd: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(n, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(n)
        self.masks = np.asarray(self.masks, np.uint8)
        if self.masks.ndim != 3 or len(self.masks) != n:
            raise ValueError(f"masks must be [{n}, H, W], got shape {self.masks.shape}")
        self.iscrowd = np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool).reshape(n)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @classmethod
    def empty(cls, height: int, width: int) -> "Instances":
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros((0, height, width), np.uint8))

    def select(self, keep: np.ndarray) -> "Instances":
        return Instances(self.boxes[keep], self.labels[keep], self.masks[keep], self.iscrowd[keep])

    def areas(self) -> np.ndarray:
        return self.masks.sum(axis=(1, 2), dtype=np.int64)

    # --------------------------------------------------------------- rows
    def to_json(self) -> str:
        """Compact text for a dataset row: RLE masks, labels, boxes, crowd flags."""
        h, w = self.size
        return json.dumps({
            "size": [h, w],
            "labels": self.labels.tolist(),
            "iscrowd": self.iscrowd.astype(int).tolist(),
            "boxes": np.round(self.boxes.astype(np.float64), 3).tolist(),
            "counts": [r["counts"] for r in encode_rles(self.masks)],
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Instances":
        d = json.loads(text)
        h, w = d["size"]
        masks = decode_rles([{"size": [h, w], "counts": c} for c in d["counts"]], h, w)
        return cls(np.asarray(d["boxes"], np.float32).reshape(-1, 4), d["labels"], masks, d["iscrowd"])


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` -> ``float32 [N, 4]`` edge boxes ``x1, y1, x2 + 1, y2 + 1``; empty masks give zeros."""
    masks = np.asarray(masks)
    out = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if len(rows):
            out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return out


def _from_masks(masks: np.ndarray, labels: Iterable[int], iscrowd: Iterable[bool] | None = None) -> Instances:
    masks = np.asarray(masks, np.uint8)
    labels = np.asarray(list(labels), np.int64)
    crowd = np.zeros(len(labels), bool) if iscrowd is None else np.asarray(list(iscrowd), bool)
    keep = masks.any(axis=(1, 2))
    inst = Instances(boxes_from_masks(masks), labels, masks, crowd)
    return inst.select(keep)


def instances_from_id_mask(
    ids: np.ndarray,
    class_map: np.ndarray | None = None,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> tuple[Instances, list[str]]:
    """Instance-id map (0 background, 1..N one object each) -> (instances, warnings).

    ``ignore_index`` pixels belong to no object. With ``class_map`` (same shape, class indices)
    an object's label is the most frequent class under it, ignoring ``ignore_index`` and 0;
    objects with no such class are dropped with a warning. Without it every object is class 1.
    A class index >= ``num_classes`` raises ``ValueError`` (the class map does not fit the config).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"instance mask must be [H, W], got shape {ids.shape}")
    if class_map is not None and np.shape(class_map) != ids.shape:
        raise ValueError(f"class map is {np.shape(class_map)}, instance mask is {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError("instance mask has negative ids")
    values = np.unique(ids)
    values = values[(values != 0) & ((values != ignore_index) if ignore_index is not None else True)]
    warnings: list[str] = []
    masks, labels = [], []
    for v in values:
        m = ids == v
        label = 1
        if class_map is not None:
            under = np.asarray(class_map)[m]
            under = under[(under != 0) & ((under != ignore_index) if ignore_index is not None else True)]
            if under.size == 0:
                warnings.append(f"object {int(v)} lies on background/ignored classes only: dropped")
                continue
            if under.min() < 0:
                raise ValueError(f"class map has negative value {int(under.min())}")
            label = int(np.bincount(under.astype(np.int64)).argmax())
        if num_classes is not None and label >= num_classes:
            raise ValueError(f"class {label} of object {int(v)} is outside the {num_classes} class names")
        masks.append(m)
        labels.append(label)
    h, w = ids.shape
    if not masks:
        return Instances.empty(h, w), warnings
    return _from_masks(np.stack(masks), labels), warnings


# --------------------------------------------------------------------------- COCO JSON


@dataclass
class CocoIndex:
    """A parsed COCO instances file: images by id, their annotations, categories."""

    images: dict[int, dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]

    @classmethod
    def parse(cls, data: bytes | str | Mapping) -> "CocoIndex":
        d = json.loads(data) if isinstance(data, (bytes, str)) else data
        if not isinstance(d, Mapping) or "images" not in d or "annotations" not in d:
            raise ValueError("not a COCO instances file: needs 'images' and 'annotations'")
        images = {int(im["id"]): dict(im) for im in d["images"]}
        anns: dict[int, list[dict]] = {i: [] for i in images}
        for a in d["annotations"]:
            if int(a["image_id"]) not in anns:
                raise ValueError(f"annotation {a.get('id')} names image {a['image_id']}, which is not listed")
            anns[int(a["image_id"])].append(a)
        return cls(images, anns, list(d.get("categories") or []))

    def category_labels(self, class_names: Sequence[str]) -> dict[int, int]:
        """{COCO category id: label}: categories map to ``class_names`` (index = label) by name."""
        index = {n: i for i, n in enumerate(class_names)}
        missing = [c["name"] for c in self.categories if c["name"] not in index or index[c["name"]] == 0]
        if missing:
            raise ValueError(f"data.class_names: COCO categories {missing} are not among class_names[1:] "
                             f"{list(class_names[1:])}")
        return {int(c["id"]): index[c["name"]] for c in self.categories}

    def match(self, urls: Sequence[str]) -> dict[int, int]:
        """{COCO image id: index into ``urls``} by ``file_name``: the URL must end with it on a path
        boundary. Ambiguous names raise; images without a match are left out."""
        by_base: dict[str, list[int]] = {}
        for i, u in enumerate(urls):
            by_base.setdefault(posixpath.basename(u.replace("\\", "/")), []).append(i)
        out: dict[int, int] = {}
        for image_id, im in self.images.items():
            name = str(im["file_name"]).replace("\\", "/").lstrip("./")
            hits = [i for i in by_base.get(posixpath.basename(name), [])
                    if urls[i].replace("\\", "/") == name or urls[i].replace("\\", "/").endswith("/" + name)]
            if len(hits) > 1:
                raise ValueError(f"COCO file_name {name!r} matches {len(hits)} images, e.g. {urls[hits[0]]}")
            if hits:
                out[image_id] = hits[0]
        return out


def coco_segmentation_rle(segmentation: Any, height: int, width: int) -> RLE:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points: no area
        if not polys:
            return encode_rle(np.zeros((height, width), np.uint8))
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, Mapping):
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {list(segmentation['size'])} differs from the image's {[height, width]}")
        rle = _c_rle(segmentation)
    else:
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def instances_from_coco(
    annotations: Sequence[Mapping], height: int, width: int, category_labels: Mapping[int, int]
) -> Instances:
    """One image's COCO annotations -> instances (empty masks dropped)."""
    if not annotations:
        return Instances.empty(height, width)
    masks, labels, crowd = [], [], []
    for a in annotations:
        if "segmentation" not in a or a["segmentation"] in (None, [], {}):
            raise ValueError(f"annotation {a.get('id')} has no segmentation (Mask R-CNN needs masks)")
        cat = int(a["category_id"])
        if cat not in category_labels:
            raise ValueError(f"annotation {a.get('id')}: category {cat} is not in the file's categories")
        masks.append(decode_rle(coco_segmentation_rle(a["segmentation"], height, width)))
        labels.append(category_labels[cat])
        crowd.append(bool(a.get("iscrowd", 0)))
    return _from_masks(np.stack(masks), labels, crowd)


# --------------------------------------------------------------------------- joint transforms


def hflip(image: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
    """Mirror left-right: image ``[C, H, W]``, masks and boxes together."""
    _, w = inst.size
    b = inst.boxes.copy()
    b[:, [0, 2]] = w - inst.boxes[:, [2, 0]]
    return image[:, :, ::-1], Instances(b, inst.labels, inst.masks[:, :, ::-1], inst.iscrowd)


def vflip(image: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
    """Mirror top-bottom."""
    h, _ = inst.size
    b = inst.boxes.copy()
    b[:, [1, 3]] = h - inst.boxes[:, [3, 1]]
    return image[:, ::-1, :], Instances(b, inst.labels, inst.masks[:, ::-1, :], inst.iscrowd)


def rot90(image: np.ndarray, inst: Instances, k: int = 1) -> tuple[np.ndarray, Instances]:
    """Rotate by k * 90 degrees counter-clockwise (np.rot90 on the last two axes); H and W swap
    for odd k."""
    k %= 4
    for _ in range(k):
        h, w = inst.size
        b = inst.boxes
        # np.rot90 (CCW): pixel (row r, col c) -> (row w-1-c, col r); edges x -> y' = w - x, y -> x' = y
        nb = np.stack([b[:, 1], w - b[:, 2], b[:, 3], w - b[:, 0]], axis=1) if len(b) else b
        image = np.rot90(image, 1, axes=(1, 2))
        inst = Instances(nb, inst.labels, np.rot90(inst.masks, 1, axes=(1, 2)), inst.iscrowd)
    return image, inst


def augment_instances(image: np.ndarray, inst: Instances, cfg: Any, rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
    """Photometric jitter (as the semantic pipeline) then flips and rot90, applied to image,
    masks and boxes together. ``cfg`` is an ``AugmentConfig``; ``rotate_degrees`` is not used for
    instances (boxes of rotated objects would no longer be tight)."""
    img = photometric(image, cfg, rng)
    if rng.random() < cfg.hflip:
        img, inst = hflip(img, inst)
    if rng.random() < cfg.vflip:
        img, inst = vflip(img, inst)
    if rng.random() < cfg.rot90:
        img, inst = rot90(img, inst, int(rng.integers(1, 4)))
    inst = Instances(inst.boxes, inst.labels, np.ascontiguousarray(inst.masks), inst.iscrowd)
    return np.ascontiguousarray(img, dtype=np.float32), inst
