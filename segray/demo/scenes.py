"""Synthetic aerial-like scenes with pixel-exact masks, for the offline demo.

Scenes are drawn at a fixed ground resolution (objects keep their pixel size; a larger
scene holds more of them) and painted in layers: ground, water, trees, roads, building
shadows, buildings. The mask records whichever class was painted last. Colours overlap
on purpose (dark trees vs. water, grey roofs vs. asphalt, bare soil vs. light roofs), so
a model has to use texture and shape, not a colour threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from segray.demo.shapes import Curve, box_blur, fbm, main_road, shift, side_street

DEMO_CLASSES = ["background", "building", "road", "water", "vegetation"]
BACKGROUND, BUILDING, ROAD, WATER, VEGETATION = range(len(DEMO_CLASSES))

_REF_AREA = 128 * 128  # object counts are "per 128x128 tile"

_ROOF_COLOURS = np.array(
    [
        (165, 82, 62), (128, 64, 52), (96, 100, 108), (168, 168, 165), (212, 208, 200),
        (128, 104, 84), (118, 134, 150), (150, 120, 100),
    ],
    dtype=np.float32,
)

_WATER_COLOURS = np.array([(28, 50, 62), (32, 58, 56), (40, 62, 48)], dtype=np.float32)


# --------------------------------------------------------------------------- layers


def _rgb(r: float, g: float, b: float, rng: np.random.Generator, jitter: float) -> np.ndarray:
    return np.array([r, g, b], np.float32) + rng.normal(0, jitter, 3).astype(np.float32)


def _ground(
    h: int, w: int, xx: np.ndarray, yy: np.ndarray, grain: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Grass, dry grass and bare soil mixed at low frequency, with mottling and grain."""
    grass, dry, soil = _rgb(92, 110, 60, rng, 7), _rgb(140, 134, 90, rng, 7), _rgb(150, 128, 100, rng, 7)
    t_dry = 1 / (1 + np.exp(-2.0 * (fbm(h, w, 72, 3, rng) + rng.uniform(-0.8, 0.8))))
    t_soil = np.clip(fbm(h, w, 48, 3, rng) - rng.uniform(0.5, 1.5), 0, 1)
    detail = 7 * fbm(h, w, 10, 3, rng) + 5 * grain
    if rng.random() < 0.5:  # ploughed furrows in the bare patches
        a = rng.uniform(0, np.pi)
        detail += 5 * t_soil * np.sin((xx * math.cos(a) + yy * math.sin(a)) * rng.uniform(1.2, 2.0))
    img = grass + (dry - grass) * t_dry[..., None]
    img += (soil - img) * t_soil[..., None] + detail[..., None]
    return img


def _paint_water(img, mask, xx, yy, grain, rng) -> np.ndarray:
    """Lakes (wobbly ellipses) and rivers, shallow and muddy at the shore, rippled."""
    h, w = mask.shape
    water = np.zeros((h, w), bool)
    wobble = fbm(h, w, 14, 3, rng)
    for _ in range(max(1, rng.poisson(0.7 * h * w / _REF_AREA))):
        if rng.random() < 0.3:  # a river
            d, _ = main_road(h, w, rng).distance(xx, yy)
            water |= d < rng.uniform(5, 12) * (1 + 0.15 * wobble)
            continue
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        rx, ry, a = rng.uniform(12, 34), rng.uniform(12, 34), rng.uniform(0, np.pi)
        reach = 2 * max(rx, ry)  # the wobble cannot push the shore further out than this
        win = (
            slice(int(max(cy - reach, 0)), int(min(cy + reach, h))),
            slice(int(max(cx - reach, 0)), int(min(cx + reach, w))),
        )
        dx, dy = xx[win] - cx, yy[win] - cy
        u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
        water[win] |= np.hypot(u / rx, v / ry) + 0.22 * wobble[win] < 1
    depth = np.clip(box_blur(water, 5) * 1.6 - 0.6, 0, 1)[water][:, None]  # 0 at the shore
    # deep blue, blue-green or murky green: water is not one colour either
    deep = _rgb(*_WATER_COLOURS[rng.integers(len(_WATER_COLOURS))], rng, 4)
    shallow = deep + _rgb(38, 34, 12, rng, 5)
    a = rng.uniform(0, np.pi)
    phase = 4 * wobble[water] + rng.uniform(0, 2 * np.pi)
    ripple = 3.5 * np.sin((xx[water] * math.cos(a) + yy[water] * math.sin(a)) * rng.uniform(0.7, 1.4) + phase)
    img[water] = shallow + (deep - shallow) * depth + (ripple + 1.5 * grain[water])[:, None]
    mask[water] = WATER
    return water


def _paint_vegetation(img, mask, water, rng, sun: tuple[int, int]) -> None:
    """Tree clusters (thresholded noise) and single trees, with clumpy crowns and shadows."""
    h, w = mask.shape
    field = fbm(h, w, 26, 4, rng, gain=0.6)
    trees = field > np.quantile(field[::4, ::4], 1 - rng.uniform(0.08, 0.28))  # subsampled: cheap
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    n = rng.poisson(12 * h * w / _REF_AREA)
    for y, x, r in zip(rng.uniform(0, h, n), rng.uniform(0, w, n), rng.uniform(1.5, 3.5, n)):
        sy = slice(int(max(y - r, 0)), int(min(y + r + 1, h)))
        sx = slice(int(max(x - r, 0)), int(min(x + r + 1, w)))
        trees[sy, sx] |= np.hypot(ys[sy] - y, xs[:, sx] - x) < r
    trees &= ~water
    crowns = np.clip(0.5 + 0.3 * fbm(h, w, 3.5, 2, rng)[trees], 0, 1)[:, None]
    dark, light = _rgb(38, 62, 36, rng, 4), _rgb(80, 104, 52, rng, 5)
    img[shift(trees, *sun) & ~trees] *= 0.62
    img[trees] = dark + (light - dark) * crowns
    mask[trees] = VEGETATION


def _paint_roads(img, mask, water, xx, yy, grain, rng) -> tuple[list[tuple[Curve, float]], np.ndarray]:
    """Main roads across the scene and side streets off them; returns (curve, half width)."""
    h, w = mask.shape
    area = h * w / _REF_AREA
    curves = [(main_road(h, w, rng), rng.uniform(3.5, 5.5)) for _ in range(1 + rng.poisson(0.25 * area))]
    for _ in range(rng.poisson(0.8 * area)):
        street = side_street(curves[int(rng.integers(len(curves)))][0], h, w, rng)
        if street is not None:
            curves.append((street, rng.uniform(2.5, 3.5)))
    keepout = np.zeros((h, w), bool)
    for curve, half in curves:
        if np.isfinite(curve.u0):
            curve.trim_at(water)
        win = curve.window(h, w, half + 3)
        d, u = curve.distance(xx[win], yy[win])
        if rng.random() < 0.15 and half < 3.5:  # dirt track
            base = _rgb(142, 124, 98, rng, 6)
        else:
            base = np.full(3, rng.uniform(78, 125), np.float32) + rng.normal(0, 3, 3).astype(np.float32)
        # work on the pixels of the road and its margin only; most of the window is neither
        iy, ix = np.nonzero(d < half + 2)
        dn, un = d[iy, ix], u[iy, ix]
        sub, sub_mask = img[win], mask[win]
        px = sub[iy, ix]
        verge = (dn >= half) & (dn < half + 1.5) & (sub_mask[iy, ix] != ROAD)  # none across a crossing road
        px[verge] = 0.6 * px[verge] + 0.4 * (base + 25)
        colour = base + 6 * grain[win][iy, ix][:, None]
        if half > 4 and rng.random() < 0.6:  # dashed centre line
            colour[(dn < 0.6) & (np.mod(un, 12) < 6)] = 200
        alpha = np.clip(half + 0.5 - dn, 0, 1)[:, None]  # anti-aliased edge
        sub[iy, ix] = px * (1 - alpha) + colour * alpha
        on_road = dn < half
        sub_mask[iy[on_road], ix[on_road]] = ROAD
        keepout[win][iy, ix] = True
    return curves, keepout


def _paint_buildings(img, mask, occupied, roads, grain, rng, sun: tuple[int, int]) -> None:
    """Houses in rows along both sides of each road, skipping spots that are taken."""
    h, w = mask.shape
    taken = occupied.copy()
    norm = math.hypot(*sun) or 1.0
    sun_dir = (sun[0] / norm, sun[1] / norm)  # (dy, dx)
    for curve, half in roads:
        density = rng.uniform(0.4, 0.95)
        lo, hi = (curve.u0 + 6, curve.u1) if np.isfinite(curve.u0) else (-(h + w) / 2, (h + w) / 2)
        for side in (-1, 1):
            u = lo + rng.uniform(0, 8)
            while u < hi:
                bw, bd = rng.uniform(8, 20), rng.uniform(7, 15)
                u += bw / 2
                if rng.random() < density:
                    px, py, tx, ty = curve.frame(u)
                    off = half + rng.uniform(3.5, 8) + bd / 2
                    cx, cy = px - side * ty * off, py + side * tx * off
                    if -bw < cx < w + bw and -bw < cy < h + bw and not _probe(taken, cx, cy, tx, ty, bw, bd):
                        _building(img, mask, taken, grain, rng, (cx, cy), (tx, ty), (bw, bd), side, sun_dir)
                u += bw / 2 + rng.uniform(2, 7)


def _probe(taken: np.ndarray, cx: float, cy: float, tx: float, ty: float, bw: float, bd: float) -> bool:
    """Cheap pre-check: is the centre or a corner of the footprint already taken?"""
    h, w = taken.shape
    for fa, fb in ((0, 0), (-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)):
        x = cx + fa * bw * tx - fb * bd * ty
        y = cy + fa * bw * ty + fb * bd * tx
        if 0 <= x < w and 0 <= y < h and taken[int(y), int(x)]:
            return True
    return False


def _building(img, mask, taken, grain, rng, centre, tangent, dims, side, sun_dir) -> None:
    """Rasterise one rotated rectangle or L-shaped house and its shadow, unless it collides."""
    h, w = mask.shape
    (cx, cy), (tx, ty), (bw, bd) = centre, tangent, dims
    height = rng.uniform(1.5, 4.5)
    r = math.hypot(bw, bd) / 2 + height + 2
    y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, h))
    x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, w))
    if y1 - y0 < 2 or x1 - x0 < 2:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    cut = None  # an L-shape drops one back corner: (which end, corner start along, corner start across)
    if rng.random() < 0.3:
        cut = (1.0 if rng.random() < 0.5 else -1.0, rng.uniform(-0.1, 0.25) * bw, rng.uniform(-0.2, 0.2) * bd)

    dx, dy = xs - cx, ys - cy
    a = dx * tx + dy * ty  # along the road
    b = (-dx * ty + dy * tx) * side  # away from the road

    def footprint(grow: float) -> np.ndarray:
        inside = (np.abs(a) < bw / 2 + grow) & (np.abs(b) < bd / 2 + grow)
        if cut is not None:
            inside &= ~((a * cut[0] > cut[1] - grow) & (b > cut[2] - grow))
        return inside

    inside = footprint(0.0)
    if np.count_nonzero(inside) < 12 or (footprint(1.5) & taken[y0:y1, x0:x1]).any():
        return
    shadow = np.zeros_like(inside)
    for f in (0.5, 1.0):  # sweep the footprint along the sun direction
        shadow |= shift(inside, round(sun_dir[0] * height * f), round(sun_dir[1] * height * f))
    shadow &= ~inside

    roof = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))] + rng.normal(0, 7, 3).astype(np.float32)
    shade = np.ones(inside.shape, np.float32)
    if rng.random() < 0.6:  # gable roof: two slopes lit differently, darker ridge
        ridge = b if bw >= bd else a
        lit = rng.uniform(1.08, 1.2)
        shade = np.where(ridge > 0, lit, 2 - lit).astype(np.float32)
        shade[np.abs(ridge) < 0.6] *= 0.85
    else:  # flat roof: darker parapet rim
        shade[(np.abs(a) > bw / 2 - 1.2) | (np.abs(b) > bd / 2 - 1.2)] = 0.82
    colour = roof * shade[..., None] + 4 * grain[y0:y1, x0:x1, None]

    win = img[y0:y1, x0:x1]
    win[shadow] *= 0.5
    win[inside] = colour[inside]
    mask[y0:y1, x0:x1][inside] = BUILDING
    taken[y0:y1, x0:x1] |= inside


# --------------------------------------------------------------------------- public API


def make_scene(size: int | tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic aerial scene: RGB uint8 [H, W, 3] and class map uint8 [H, W] (DEMO_CLASSES)."""
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sun_angle = rng.uniform(0, 2 * np.pi)
    sun = (round(2 * math.sin(sun_angle)), round(2 * math.cos(sun_angle)))  # shadow offset (dy, dx)

    grain = rng.standard_normal((h, w), dtype=np.float32)  # fine texture shared by all layers

    img = _ground(h, w, xx, yy, grain, rng)
    mask = np.full((h, w), BACKGROUND, np.uint8)
    water = _paint_water(img, mask, xx, yy, grain, rng)
    _paint_vegetation(img, mask, water, rng, sun)
    roads, keepout = _paint_roads(img, mask, water, xx, yy, grain, rng)
    _paint_buildings(img, mask, keepout | water, roads, grain, rng, sun)

    # camera: slight 3x3 blur (optics), then white balance and exposure
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = p[:-2] + p[1:-1] + p[2:]
    img = 0.55 * img + (0.45 / 9) * (p[:, :-2] + p[:, 1:-1] + p[:, 2:])
    img *= rng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.85, 1.15))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_demo_dataset(root: str | Path, num_images: int, size: int, seed: int = 0) -> dict:
    """Write ``root/images/scene_NNNN.png`` (RGB), ``root/masks/scene_NNNN.png`` (class ids)
    and ``root/classes.txt``. Scene i depends only on (seed, i), so a bigger dataset
    extends a smaller one."""
    root = Path(root)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        img, mask = make_scene(size, np.random.default_rng([seed, i]))
        Image.fromarray(img).save(images / f"scene_{i:04d}.png")
        Image.fromarray(mask).save(masks / f"scene_{i:04d}.png")
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    return {
        "images": str(images),
        "masks": str(masks),
        "class_names": list(DEMO_CLASSES),
        "count": num_images,
    }
