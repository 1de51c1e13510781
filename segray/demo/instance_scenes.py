"""Synthetic aerial scenes with *separate objects* (buildings, fields, vehicles) for the instance demo.

The ground, trees, roads and houses are painted by :mod:`segray.demo.scenes`; this module adds
crop fields (striped parcels, under everything else) and vehicles (small bright boxes on the
roads), and records one id per visible object. Each scene gives an RGB image, an instance-id
map (0 background, 1..N) and a class map (``INSTANCE_DEMO_CLASSES``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from segray.demo.scenes import BUILDING, ROAD, VEGETATION, _ground, _paint_buildings, _paint_roads, _paint_vegetation
from segray.core.instances import encode_rles

INSTANCE_DEMO_CLASSES = ["background", "building", "field", "vehicle"]
I_BUILDING, I_FIELD, I_VEHICLE = 1, 2, 3
_MIN_PIXELS = 12  # smaller visible remnants are not objects

_CROPS = np.array([(118, 150, 62), (176, 160, 84), (140, 112, 78), (96, 128, 56), (196, 184, 110)], np.float32)
_CARS = np.array([(235, 235, 235), (200, 40, 40), (40, 70, 170), (25, 25, 28), (190, 190, 60)], np.float32)


def label_components(binary: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean map: int32 labels 1..N (0 outside), by min-propagation."""
    h, w = binary.shape
    big = np.iinfo(np.int32).max
    lab = np.where(binary, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nxt = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nxt = np.where(binary, nxt, big)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    out = np.zeros((h, w), np.int32)
    values = np.unique(lab[binary])
    out[binary] = np.searchsorted(values, lab[binary]) + 1
    return out


def _rect(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, half_l: float, half_w: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (np.abs(u) < half_l) & (np.abs(v) < half_w), u


def _paint_fields(img, ids, xx, yy, grain, rng) -> int:
    """1-3 rotated striped parcels per 128x128 of scene, not overlapping each other."""
    h, w = ids.shape
    n = 0
    for _ in range(1 + rng.poisson(0.8 * h * w / (128 * 128))):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        a = rng.uniform(0, np.pi)
        inside, u = _rect(xx, yy, cx, cy, a, rng.uniform(14, 34), rng.uniform(10, 24))
        if inside.sum() < 60 or (inside & (ids > 0)).any():
            continue
        crop = _CROPS[rng.integers(len(_CROPS))] + rng.normal(0, 6, 3).astype(np.float32)
        stripes = 9 * np.sin(u[inside] * rng.uniform(1.0, 1.8))
        img[inside] = crop + (stripes + 4 * grain[inside])[:, None]
        n += 1
        ids[inside] = n
    return n


def _paint_vehicles(img, classes, roads, xx, yy, rng) -> list[np.ndarray]:
    """Cars parked or driving on the roads: 3-4 px wide, 6-9 px long, along the road."""
    h, w = classes.shape
    cars: list[np.ndarray] = []
    taken = np.zeros((h, w), bool)
    for curve, half in roads:
        lo, hi = (curve.u0, curve.u1) if np.isfinite(curve.u0) else (-(h + w) / 2, (h + w) / 2)
        for _ in range(rng.poisson(max(hi - lo, 0) / 40)):
            u = rng.uniform(lo, hi)
            px, py, tx, ty = curve.frame(u)
            side = rng.choice([-1.0, 1.0]) * half * 0.45
            cx, cy = px - ty * side, py + tx * side
            if not (0 <= cx < w and 0 <= cy < h):
                continue
            r = 7
            win = (slice(max(int(cy) - r, 0), min(int(cy) + r + 1, h)), slice(max(int(cx) - r, 0), min(int(cx) + r + 1, w)))
            inside, _ = _rect(xx[win], yy[win], cx, cy, math.atan2(ty, tx), rng.uniform(3.0, 4.5), rng.uniform(1.5, 2.1))
            inside &= classes[win] == ROAD
            if inside.sum() < _MIN_PIXELS or (inside & taken[win]).any():
                continue
            colour = _CARS[rng.integers(len(_CARS))] + rng.normal(0, 5, 3).astype(np.float32)
            img[win][inside] = colour
            taken[win] |= inside
            full = np.zeros((h, w), bool)
            full[win] = inside
            cars.append(full)
    return cars


def make_instance_scene(size: int | tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3], instance ids uint16 [H, W] (0 background, 1..N) and class map uint8 [H, W]."""
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sun_angle = rng.uniform(0, 2 * np.pi)
    sun = (round(2 * math.sin(sun_angle)), round(2 * math.cos(sun_angle)))
    grain = rng.standard_normal((h, w), dtype=np.float32)

    img = _ground(h, w, xx, yy, grain, rng)
    field_ids = np.zeros((h, w), np.int32)
    n_fields = _paint_fields(img, field_ids, xx, yy, grain, rng)
    scratch = np.zeros((h, w), np.uint8)  # segray.demo.scenes classes, painted last wins
    water = np.zeros((h, w), bool)
    _paint_vegetation(img, scratch, water, rng, sun)
    roads, keepout = _paint_roads(img, scratch, water, xx, yy, grain, rng)
    _paint_buildings(img, scratch, keepout, roads, grain, rng, sun)
    cars = _paint_vehicles(img, scratch, roads, xx, yy, rng)

    objects: list[tuple[np.ndarray, int]] = []
    visible_field = field_ids * ~np.isin(scratch, [VEGETATION, ROAD, BUILDING])
    objects += [(visible_field == k, I_FIELD) for k in range(1, n_fields + 1)]
    buildings = label_components(scratch == BUILDING)
    objects += [(buildings == k, I_BUILDING) for k in range(1, int(buildings.max()) + 1)]
    objects += [(c, I_VEHICLE) for c in cars]

    ids = np.zeros((h, w), np.uint16)
    classes = np.zeros((h, w), np.uint8)
    n = 0
    for m, cls in objects:  # later objects (vehicles) lie on top
        if m.sum() < _MIN_PIXELS:
            continue
        n += 1
        ids[m], classes[m] = n, cls
    ids, classes = _drop_hidden(ids, classes)

    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = p[:-2] + p[1:-1] + p[2:]
    img = 0.55 * img + (0.45 / 9) * (p[:, :-2] + p[:, 1:-1] + p[:, 2:])
    img *= rng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.85, 1.15))
    return np.clip(img, 0, 255).astype(np.uint8), ids, classes


def _drop_hidden(ids: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objects mostly covered by later ones: drop remnants, renumber 1..N."""
    counts = np.bincount(ids.ravel())
    keep = np.flatnonzero(counts >= _MIN_PIXELS)
    keep = keep[keep > 0]
    remap = np.zeros(len(counts), np.uint16)
    remap[keep] = np.arange(1, len(keep) + 1)
    out = remap[ids]
    return out, np.where(out > 0, classes, 0).astype(np.uint8)


def write_instance_demo_dataset(root: str | Path, num_images: int, size: int, seed: int = 0,
                                vary_size: bool = True) -> dict:
    """Writes ``images/``, ``masks/`` (instance ids, 16-bit PNG), ``class_masks/`` and
    ``annotations.json`` (COCO, RLE masks). With ``vary_size`` scenes are ``size`` or
    ``3/4 size`` per side, so batches mix sizes. Scene i depends only on (seed, i)."""
    root = Path(root)
    dirs = {k: root / k for k in ("images", "masks", "class_masks")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": k, "name": n} for k, n in enumerate(INSTANCE_DEMO_CLASSES) if k]}
    for i in range(num_images):
        rng = np.random.default_rng([seed, i, 1])
        shape = tuple(int(rng.choice([size, size * 3 // 4])) for _ in range(2)) if vary_size else (size, size)
        img, ids, classes = make_instance_scene(shape, rng)
        name = f"scene_{i:04d}.png"
        Image.fromarray(img).save(dirs["images"] / name)
        Image.fromarray(ids.astype(np.uint16)).save(dirs["masks"] / name)
        Image.fromarray(classes).save(dirs["class_masks"] / name)
        coco["images"].append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
        masks = np.stack([ids == k for k in range(1, int(ids.max()) + 1)]) if ids.max() else np.zeros((0, *ids.shape))
        for m, rle in zip(masks, encode_rles(masks)):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": int(classes[m][0]),
                "segmentation": rle, "area": int(m.sum()), "iscrowd": 0,
                "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)],
            })
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "classes.txt").write_text("\n".join(INSTANCE_DEMO_CLASSES) + "\n")
    return {key: str(d) for key, d in dirs.items()} | {
        "coco_json": str(root / "annotations.json"),
        "class_names": list(INSTANCE_DEMO_CLASSES),
        "count": num_images,
    }
