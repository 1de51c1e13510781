"""Reading and decoding rows of image (and mask) URLs: the first step of every workload.

Inference and training data both start here, so it lives below them. Bad input never raises:
the row gets ``status="error"`` and a reason (its kind is the text before the first colon), and
later steps pass it through untouched.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from segray.config import StorageOptions
from segray.io.fs import get_fs
from segray.io.images import ImageDecodeError, decode_image, decode_mask

# Placeholders keep a column's arrays at one ndim for rows that carry no pixels.
NO_IMAGE = np.zeros((1, 1, 1), np.float32)
NO_MASK = np.zeros((1, 1), np.int64)


def fetch_many(urls: list[str], storage: StorageOptions | None) -> list[bytes | Exception]:
    """Read many objects at once (s3fs fetches a list concurrently); errors are returned."""
    by_scheme: dict[str, list[int]] = {}
    for i, u in enumerate(urls):
        by_scheme.setdefault(u.split("://", 1)[0] if "://" in u else "file", []).append(i)
    out: list[bytes | Exception] = [b""] * len(urls)
    for idx in by_scheme.values():
        fs, _ = get_fs(urls[idx[0]], storage)
        paths = [fs._strip_protocol(urls[i]) for i in idx]
        try:
            got = fs.cat(paths, on_error="return")
        except Exception as exc:  # a one-path cat raises instead of returning
            got = {paths[0]: exc}
        if not isinstance(got, dict):
            got = {paths[0]: got}
        for i, p in zip(idx, paths):
            out[i] = got.get(p, FileNotFoundError(urls[i]))
    return out


def read_reason(exc: BaseException) -> str:
    if isinstance(exc, ImageDecodeError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"unreadable: not found ({exc})"
    if isinstance(exc, PermissionError):
        return f"unreadable: permission denied ({exc})"
    return f"unreadable: {type(exc).__name__}: {exc}"


def read_decode(
    batch: dict[str, Any],
    storage: StorageOptions | None = None,
    bands: list[int] | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Columns in: image (URL), mask (URL or ''), image_id. Adds pixels and status."""
    t0 = time.perf_counter()
    image_urls = [str(u) for u in batch["image"]]
    mask_urls = [str(u) if u else "" for u in batch["mask"]]
    images = fetch_many(image_urls, storage)
    gt_data = dict(zip([u for u in mask_urls if u], fetch_many([u for u in mask_urls if u], storage)))
    out: dict[str, list] = {k: [] for k in ("pixels", "gt", "has_gt", "status", "error", "height", "width", "bands")}
    for url, data, mask_url in zip(image_urls, images, mask_urls):
        pixels, gt, status, error = NO_IMAGE, NO_MASK, "ok", ""
        try:
            if isinstance(data, Exception):
                raise data
            pixels = decode_image(data, url, bands=bands, max_pixels=max_pixels)
            if mask_url:
                mask_bytes = gt_data[mask_url]
                if isinstance(mask_bytes, Exception):
                    raise ImageDecodeError(f"ground-truth mask {mask_url}: {read_reason(mask_bytes)}")
                gt = decode_mask(mask_bytes, mask_url)
                if gt.shape != pixels.shape[1:]:
                    raise ImageDecodeError(f"ground-truth mask is {gt.shape}, image is {pixels.shape[1:]}")
        except Exception as exc:  # any bad input becomes an error row
            pixels, gt, status, error = NO_IMAGE, NO_MASK, "error", read_reason(exc)
        ok = status == "ok"
        out["pixels"].append(pixels)
        out["gt"].append(gt)
        out["has_gt"].append(ok and bool(mask_url))
        out["status"].append(status)
        out["error"].append(error)
        out["height"].append(pixels.shape[1] if ok else 0)
        out["width"].append(pixels.shape[2] if ok else 0)
        out["bands"].append(pixels.shape[0] if ok else 0)
    ms = (time.perf_counter() - t0) * 1000 / max(len(image_urls), 1)
    result = {"image_id": batch["image_id"], "source_path": np.array(image_urls, dtype=object)}
    result.update({k: v for k, v in out.items()})
    result["decode_ms"] = np.full(len(image_urls), ms)
    return result
