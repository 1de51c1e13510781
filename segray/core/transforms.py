"""Layout conversion, per-band normalisation and paired image/mask augmentation.

Images are float32 [C, H, W]; masks are integer class maps [H, W]. Every geometric
transform is applied to both, so labels stay aligned with pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from segray.config import AugmentConfig


def to_chw_float(image: np.ndarray, layout: Literal["hwc", "chw"] = "hwc") -> np.ndarray:
    """float32 [C, H, W] from [H, W], [H, W, C] (PIL layout) or, with ``layout='chw'``, [C, H, W].

    Values are not rescaled: normalisation with :class:`BandStats` handles any range.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if layout == "hwc":
            arr = arr.transpose(2, 0, 1)
        elif layout != "chw":
            raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    else:
        raise ValueError(f"image must be 2-D or 3-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- normalisation


@dataclass
class BandStats:
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BandStats":
        return cls(mean=[float(v) for v in d["mean"]], std=[float(v) for v in d["std"]])


def compute_band_stats(
    images: Iterable[np.ndarray], nodata: float | None = None, min_std: float = 1e-6
) -> BandStats:
    """Per-band mean and population std over a stream of [C, H, W] images.

    Per-image moments are merged with Chan's formula in float64, which stays accurate for
    large-valued bands (e.g. uint16 reflectance) where a plain sum of squares would not.
    NaN pixels, and pixels equal to ``nodata``, are skipped per band.
    """
    count = mean = m2 = None
    for image in images:
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 3:
            raise ValueError(f"expected [C, H, W] images, got shape {arr.shape}")
        if count is None:
            c = arr.shape[0]
            count, mean, m2 = np.zeros(c), np.zeros(c), np.zeros(c)
        elif arr.shape[0] != len(count):
            raise ValueError(f"band count changed from {len(count)} to {arr.shape[0]}")
        flat = arr.reshape(arr.shape[0], -1)
        valid = ~np.isnan(flat)
        if nodata is not None and not np.isnan(nodata):
            valid &= flat != nodata
        n_b = valid.sum(axis=1).astype(np.float64)
        safe = np.where(valid, flat, 0.0)
        mean_b = safe.sum(axis=1) / np.maximum(n_b, 1)
        m2_b = (np.where(valid, flat - mean_b[:, None], 0.0) ** 2).sum(axis=1)
        total = count + n_b
        delta = mean_b - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, n_b / total, 0.0)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta**2 * count * frac
        count = total
    if count is None:
        raise ValueError("no images to compute band statistics from")
    if (count == 0).any():
        raise ValueError(f"bands {np.flatnonzero(count == 0).tolist()} have no valid pixels")
    std = np.maximum(np.sqrt(m2 / count), min_std)
    return BandStats(mean=mean.tolist(), std=std.tolist())


def normalize(image: np.ndarray, stats: BandStats) -> np.ndarray:
    """(image - mean) / std per band, float32."""
    mean = np.asarray(stats.mean, dtype=np.float32)
    std = np.asarray(stats.std, dtype=np.float32)
    if image.shape[0] != len(mean):
        raise ValueError(f"image has {image.shape[0]} bands, stats have {len(mean)}")
    return ((image - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


# --------------------------------------------------------------------------- augmentation


def _rotate_pair(
    image: np.ndarray, mask: np.ndarray, degrees: float, fill: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the centre: bilinear image, nearest mask; outside pixels -> 0 / ``fill``."""
    _, h, w = image.shape
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # Normalised coordinates scale x by W/2 and y by H/2; the H/W factors keep the
    # rotation rigid in pixel space on non-square images.
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=torch.float64)
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    img = torch.from_numpy(image)[None].double()
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # float64 holds any integer label exactly; the ones channel marks pixels taken from inside.
    lab = torch.stack([torch.from_numpy(mask.astype(np.float64)), torch.ones(h, w, dtype=torch.float64)])
    lab = F.grid_sample(lab[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    out_mask = np.where(lab[1].numpy() > 0.5, lab[0].numpy(), fill).astype(mask.dtype)
    return img[0].numpy().astype(np.float32), out_mask


def photometric(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness (a shift of up to ``brightness`` band std) and contrast (a scale about the band
    mean) jitter of ``image [C, H, W]``, as float32."""
    img = image.astype(np.float32, copy=True)
    axes = (1, 2)
    if cfg.brightness > 0:
        img += rng.uniform(-cfg.brightness, cfg.brightness) * img.std(axis=axes, keepdims=True)
    if cfg.contrast > 0:
        band_mean = img.mean(axis=axes, keepdims=True)
        img = (img - band_mean) * np.float32(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) + band_mean
    return img


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random photometric then geometric augmentation of an aligned image/mask pair.

    Brightness adds ``uniform(-b, b)`` times each band's std and contrast scales each band
    around its mean, so both mean the same on raw and on normalised images. Photometric
    jitter runs first so pixels rotated in from outside stay exactly 0. rot90 on a
    non-square pair turns by 180 degrees only (shapes stay). Rotation by ``uniform(-deg, deg)`` is applied whenever
    ``cfg.rotate_degrees > 0``; masked pixels from outside become ``ignore_index`` (else 0).
    """
    if image.ndim != 3 or mask.shape != image.shape[1:]:
        raise ValueError(f"image [C, H, W] and mask [H, W] must match, got {image.shape} and {mask.shape}")
    fill = 0 if ignore_index is None else ignore_index
    info = np.iinfo(mask.dtype) if np.issubdtype(mask.dtype, np.integer) else None
    if info is not None and not info.min <= fill <= info.max:
        raise ValueError(f"ignore_index {fill} does not fit mask dtype {mask.dtype}")

    img = photometric(image, cfg, rng)

    msk = mask
    if rng.random() < cfg.hflip:
        img, msk = img[:, :, ::-1], msk[:, ::-1]
    if rng.random() < cfg.vflip:
        img, msk = img[:, ::-1, :], msk[::-1, :]
    if rng.random() < cfg.rot90:
        # Non-square pairs turn by 180 degrees only, so every sample of a batch keeps its shape.
        k = int(rng.integers(1, 4)) if img.shape[1] == img.shape[2] else 2
        img, msk = np.rot90(img, k, axes=(1, 2)), np.rot90(msk, k)
    img, msk = np.ascontiguousarray(img), np.ascontiguousarray(msk)
    if cfg.rotate_degrees > 0:
        img, msk = _rotate_pair(img, msk, rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees), fill)
    return img.astype(np.float32, copy=False), msk


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resize_pair(
    image: np.ndarray, mask: np.ndarray, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` ([h, w], or an int for a square): bilinear (antialiased when shrinking)
    image, nearest mask."""
    if image.ndim != 3 or np.shape(mask) != image.shape[1:]:
        raise ValueError(f"image [C, H, W] and mask [H, W] must match, got {image.shape} and {np.shape(mask)}")
    hw = _hw(size)
    img = torch.tensor(np.asarray(image), dtype=torch.float32)[None]  # a copy: inputs may be read-only
    img = F.interpolate(img, size=hw, mode="bilinear", align_corners=False, antialias=True)
    lab = torch.from_numpy(np.asarray(mask).astype(np.float64))[None, None]
    lab = F.interpolate(lab, size=hw, mode="nearest-exact")
    return img[0].numpy(), lab[0, 0].numpy().astype(mask.dtype)


def random_scale(
    image: np.ndarray, mask: np.ndarray, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale by a factor drawn uniformly from ``scale`` (torchvision's RandomResize, as a factor)."""
    f = rng.uniform(*scale)
    _, h, w = image.shape
    return resize_pair(image, mask, (max(1, round(h * f)), max(1, round(w * f))))


def pad_to(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right up to ``size``: with ``ignore_index`` the mask gets it and the image its
    band means (0 once normalised), so padding teaches nothing; without one both are mirrored."""
    _, h, w = image.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if not ph and not pw:
        return image, mask
    if ignore_index is None:  # 'symmetric' repeats edge pixels: works for any pad, even past the size
        return (np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="symmetric"),
                np.pad(mask, ((0, ph), (0, pw)), mode="symmetric"))
    mean = image.reshape(image.shape[0], -1).mean(axis=1).astype(image.dtype)
    img = np.empty((image.shape[0], h + ph, w + pw), image.dtype)
    img[:] = mean[:, None, None]
    img[:, :h, :w] = image
    msk = np.full((h + ph, w + pw), ignore_index, mask.dtype)
    msk[:h, :w] = mask
    return img, msk


def random_crop(
    image: np.ndarray, mask: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` window at a uniformly random offset, the same for image and mask (padded first
    when the image is smaller, see :func:`pad_to`)."""
    ch, cw = _hw(size)
    image, mask = pad_to(image, mask, (ch, cw), ignore_index)
    _, h, w = image.shape
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]


def center_crop(
    image: np.ndarray, mask: np.ndarray, size: int | tuple[int, int], ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The centred ``size`` window (padded first when the image is smaller)."""
    ch, cw = _hw(size)
    image, mask = pad_to(image, mask, (ch, cw), ignore_index)
    _, h, w = image.shape
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]
