"""Reading and decoding rows of image (and mask) URLs: the first step of every workload.

Inference and training data both start here, so it lives below them. Bad input never raises:
the row gets ``status="error"``, a stable ``error_kind`` (``segray.io.images.KINDS``) and a
message in ``error`` (which begins with the kind), and later steps pass it through untouched.

Paths that are not valid UTF-8 (local file names are bytes) travel as their readable form plus
the raw bytes (``segray.io.fs.readable_path`` / ``path_bytes``): rows given to Ray Data and
written to Arrow hold only valid strings, and the read opens the real name.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import numpy as np

from segray.config import StorageOptions
from segray.io.fs import get_fs, path_bytes, readable_path, real_path
from segray.io.images import ImageDecodeError, decode_image, decode_mask, range_problem

# Placeholders keep a column's arrays at one ndim for rows that carry no pixels.
NO_IMAGE = np.zeros((1, 1, 1), np.float32)
NO_MASK = np.zeros((1, 1), np.int64)


def path_item(key: str, url: str | None) -> dict[str, Any]:
    """A row's URL as ``{key: readable form, key_path_bytes: raw bytes or b""}``: valid for
    Arrow (``from_items``), and :func:`item_urls` gives the real URL back."""
    url = url or ""
    return {key: readable_path(url), f"{key}_path_bytes": path_bytes(url) or b""}


def item_urls(batch: dict[str, Any], key: str) -> list[str]:
    """The real URLs of column ``key`` (see :func:`path_item`; plain URLs pass through)."""
    names = [u if isinstance(u, str) else "" for u in batch[key]]  # nulls may come back as None or NaN
    raws = batch.get(f"{key}_path_bytes")
    if raws is None:
        return names
    return [real_path(n, r if isinstance(r, bytes) else None) for n, r in zip(names, raws)]


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


def _dangling_target(url: str) -> str | None:
    """Where a local symlink that points nowhere points, else None."""
    path = url.split("://", 1)[1] if url.startswith("file://") else url
    if "://" in path or not os.path.islink(path) or os.path.exists(path):
        return None
    return os.readlink(path)


def read_reason(exc: BaseException, url: str = "") -> tuple[str, str]:
    """(kind, message) of a failed read or decode; the message is valid UTF-8 (Arrow)."""
    if isinstance(exc, ImageDecodeError):
        return exc.kind, readable_path(str(exc))
    where = readable_path(url)
    if isinstance(exc, FileNotFoundError):
        target = _dangling_target(url) if url else None
        what = f"dangling symlink (its target {readable_path(target)} is not found)" if target else "not found"
        return "unreadable", f"unreadable: {where}: {what}" if where else f"unreadable: {what}"
    if isinstance(exc, PermissionError):
        return "unreadable", f"unreadable: {where}: permission denied"
    return "unreadable", readable_path(f"unreadable: {where}: {type(exc).__name__}: {exc}")


def _check_range(pixels: np.ndarray, scale: float | None, out_of_range: str) -> list[str]:
    """Warnings of an image beyond the checkpoint's data; raises instead when refusing them."""
    problem = range_problem(pixels, scale)
    if problem is None:
        return []
    if out_of_range == "refuse":
        raise ImageDecodeError("out_of_range", problem.removeprefix("out_of_range: "))
    return [problem]


def _decode_row(data: bytes | Exception, url: str, mask_url: str, mask_data: bytes | Exception | None,
                bands: list[int] | None, max_pixels: int | None, scale: float | None,
                out_of_range: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels, ground truth, warnings) of one row; raises what makes it an error row."""
    if isinstance(data, Exception):
        raise data
    pixels = decode_image(data, url, bands=bands, max_pixels=max_pixels)
    warnings = _check_range(pixels, scale, out_of_range)
    gt = NO_MASK
    if mask_url:
        try:
            if isinstance(mask_data, Exception):
                raise mask_data
            gt = decode_mask(mask_data or b"", mask_url)
        except Exception as exc:  # the image is fine: the ground truth is the problem
            raise ImageDecodeError("mask_mismatch", f"ground-truth mask: {read_reason(exc, mask_url)[1]}") from None
        if gt.shape != pixels.shape[1:]:
            raise ImageDecodeError("mask_mismatch", f"ground-truth mask is {gt.shape}, image is {pixels.shape[1:]}")
    return pixels, gt, warnings


def read_decode(
    batch: dict[str, Any],
    storage: StorageOptions | None = None,
    bands: list[int] | None = None,
    max_pixels: int | None = None,
    full_scale: float | None = None,
    out_of_range: Literal["warn", "refuse"] = "warn",
) -> dict[str, Any]:
    """Columns in: image (URL), mask (URL or ''), image_id, optionally their ``*_path_bytes``
    (:func:`path_item`). Adds pixels, ground truth, status, error, error_kind and warnings.

    ``full_scale`` (``segray.io.images.full_scale`` of the checkpoint's band statistics) flags
    images with larger values: a warning, or an ``out_of_range`` error row with ``refuse``.
    ``warnings`` is one string per row, the warnings joined by newlines ('' for none): a flat
    column travels through Ray Data as is.
    """
    t0 = time.perf_counter()
    image_urls = item_urls(batch, "image")
    mask_urls = item_urls(batch, "mask")
    images = fetch_many(image_urls, storage)
    wanted = [u for u in mask_urls if u]
    gt_data = dict(zip(wanted, fetch_many(wanted, storage)))
    # The fetch is one concurrent call: its time is shared evenly; each row's decode is its own.
    fetch_ms = (time.perf_counter() - t0) * 1000 / max(len(image_urls), 1)
    cols = ("pixels", "gt", "has_gt", "status", "error", "error_kind", "warnings", "height", "width", "bands",
            "decode_ms")
    out: dict[str, list] = {k: [] for k in cols}
    for url, data, mask_url in zip(image_urls, images, mask_urls):
        t_row = time.perf_counter()
        status, error, kind, warnings = "ok", "", "", []
        try:
            pixels, gt, warnings = _decode_row(data, url, mask_url, gt_data.get(mask_url), bands, max_pixels,
                                               full_scale, out_of_range)
        except Exception as exc:  # any bad input becomes an error row
            pixels, gt, status = NO_IMAGE, NO_MASK, "error"
            kind, error = read_reason(exc, url)
        ok = status == "ok"
        out["pixels"].append(pixels)
        out["gt"].append(gt)
        out["has_gt"].append(ok and bool(mask_url))
        out["status"].append(status)
        out["error"].append(error)
        out["error_kind"].append(kind)
        out["warnings"].append("\n".join(warnings))
        out["height"].append(pixels.shape[1] if ok else 0)
        out["width"].append(pixels.shape[2] if ok else 0)
        out["bands"].append(pixels.shape[0] if ok else 0)
        out["decode_ms"].append(fetch_ms + (time.perf_counter() - t_row) * 1000)
    result = {"image_id": batch["image_id"],
              "source_path": np.array([readable_path(u) for u in image_urls], dtype=object),
              "source_path_bytes": np.array([path_bytes(u) or b"" for u in image_urls], dtype=object)}
    result.update(out)
    result["decode_ms"] = np.asarray(out["decode_ms"], np.float64)
    for col in ("status", "error", "error_kind", "warnings"):
        result[col] = np.array(out[col], dtype=object)
    return result
