"""Class maps [H, W] <-> lossless PNG bytes, class statistics and colour previews."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

# Distinct, colour-blind-friendly-ish base colours; class 0 (background) is black.
_BASE_PALETTE = np.array(
    [
        (0, 0, 0), (230, 25, 75), (255, 225, 25), (0, 130, 200), (60, 180, 75),
        (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
        (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
        (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
        (128, 128, 128), (255, 255, 255),
    ],
    dtype=np.uint8,
)


def _check_class_map(class_map: np.ndarray) -> np.ndarray:
    arr = np.asarray(class_map)
    if arr.ndim != 2:
        raise ValueError(f"class map must be 2-D [H, W], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("class map is empty")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class map must have an integer dtype, got {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"class map has negative values (min {arr.min()})")
    return arr


def encode_png(class_map: np.ndarray) -> bytes:
    """Lossless PNG: 8-bit when every value is < 256, else 16-bit (values up to 65535)."""
    arr = _check_class_map(class_map)
    top = int(arr.max())
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"class map value {top} does not fit a 16-bit PNG")
    dtype = np.uint8 if top < 256 else np.uint16
    buf = io.BytesIO()
    # compress_level 1: masks are low-entropy, higher levels cost time for few bytes.
    Image.fromarray(np.ascontiguousarray(arr, dtype=dtype)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_png`: uint8 for 8-bit PNGs, uint16 for 16-bit ones."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("1", "L", "P"):
            return np.array(img, dtype=np.uint8)
        if img.mode in ("I", "I;16", "I;16B"):
            # Pillow may widen 16-bit PNGs to int32 mode "I"; values still fit uint16.
            return np.array(img).astype(np.uint16)
        raise ValueError(f"not a single-band class-map PNG (mode {img.mode})")


def class_fractions(class_map: np.ndarray, num_classes: int, ignore_value: int | None = None) -> np.ndarray:
    """Fraction of valid pixels per class (float64 [K]); all zeros when no pixel is valid."""
    arr = np.asarray(class_map).ravel()
    if ignore_value is not None:
        arr = arr[arr != ignore_value]
    if arr.size == 0:
        return np.zeros(num_classes, dtype=np.float64)
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(f"class values must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")
    counts = np.bincount(arr.astype(np.int64), minlength=num_classes)
    return counts / arr.size


def default_palette(n: int) -> np.ndarray:
    """``n`` distinct colours (uint8 [n, 3]); beyond the base table, golden-ratio hues."""
    if n <= len(_BASE_PALETTE):
        return _BASE_PALETTE[:n].copy()
    extra = [
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 + 0.35 * (i % 2), 0.95))
        for i in range(n - len(_BASE_PALETTE))
    ]
    return np.concatenate([_BASE_PALETTE, np.array(extra, dtype=np.uint8)])


def colorize(class_map: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """RGB preview (uint8 [H, W, 3]) of a class map."""
    arr = _check_class_map(class_map)
    top = int(arr.max())
    pal = default_palette(top + 1) if palette is None else np.asarray(palette, dtype=np.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must be [N, 3], got shape {pal.shape}")
    if top >= len(pal):
        raise ValueError(f"class {top} has no colour in a palette of {len(pal)}")
    return pal[arr]


def overlay(
    image_rgb: np.ndarray, class_map: np.ndarray, alpha: float = 0.45, palette: np.ndarray | None = None
) -> np.ndarray:
    """Blend class colours over an RGB image; class 0 (background) stays untouched."""
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if img.shape[:2] != np.shape(class_map):
        raise ValueError(f"image {img.shape[:2]} and class map {np.shape(class_map)} differ in size")
    colours = colorize(class_map, palette).astype(np.float32)
    blended = (1 - alpha) * img.astype(np.float32) + alpha * colours
    fg = (np.asarray(class_map) != 0)[..., None]
    return np.where(fg, np.rint(blended), img).astype(np.uint8)
