"""Decode image bytes into arrays, keeping every band and the full bit depth.

Images become float32 ``[C, H, W]``; masks become int64 ``[H, W]``. The format is sniffed from
the magic bytes (object stores often serve wrong extensions); TIFF/GeoTIFF/JPEG 2000 go through
rasterio (any band count and dtype), everything else through PIL. Every failure is an
``ImageDecodeError`` whose message says what is wrong, so inference can turn it into an error row.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

_RASTERIO_FORMATS = {"tiff", "jp2"}


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message gives the reason."""


def sniff_format(data: bytes) -> Optional[str]:
    """'png', 'jpeg', 'tiff', 'gif', 'bmp', 'webp', 'jp2' from the magic bytes, else None."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    return None


def _fail(name: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(f"{name}: {reason}" if name else reason)


def _describe(data: bytes) -> str:
    """A hint of what non-image bytes are (an S3 XML error page, a text file, ...)."""
    head = data[:40]
    for cut in (head, head[:-3]):  # the cut may split a multi-byte character
        try:
            text = cut.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c.isspace() for c in text):
            return f"looks like text starting {text.strip()[:32]!r}"
    return f"unknown magic bytes {head[:8].hex(' ')}"


def _sniff_or_fail(data: bytes, name: str) -> str:
    if not data:
        raise _fail(name, "empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise _fail(name, f"not an image: {_describe(data)} ({len(data)} bytes)")
    return fmt


def _check_pixels(name: str, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise _fail(name, f"too many pixels: {w}x{h} = {h * w:,} > max_pixels {max_pixels:,}")


def _check_bands(name: str, bands: Optional[list[int]], count: int) -> None:
    for b in bands or []:
        if not 0 <= b < count:
            raise _fail(name, f"band index {b} out of range: image has {count} band(s) (0-based)")


# --------------------------------------------------------------------------- PIL


def _pil_open(data: bytes, name: str, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # raised from the header, before any pixels
        raise _fail(name, f"too many pixels for PIL: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _fail(name, f"corrupt {fmt.upper()} header: {e}") from None


def _pil_pixels(img: Image.Image, name: str, fmt: str) -> np.ndarray:
    """Full decode ([H,W] or [H,W,C]); truncated data fails here, not later in a model."""
    try:
        img.load()
        return np.asarray(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, struct.error ...
        raise _fail(name, f"corrupt or truncated {fmt.upper()}: {e}") from None


# --------------------------------------------------------------------------- rasterio

_VSIMEM_NAME = re.compile(r"(/vsimem/)?[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\.\w+[:,]\s*")


def _gdal_reason(e: BaseException) -> str:
    """The most specific message in the chain ('Read failed' wraps the real GDAL error),
    without the random in-memory file name."""
    msgs = []
    while e is not None and len(msgs) < 6:
        msgs.append(_VSIMEM_NAME.sub("", str(e)).strip())
        e = e.__cause__ or e.__context__
    useful = [m for m in msgs if m and "previous exception" not in m]
    return useful[-1] if useful else (msgs[0] if msgs else "unknown error")



def _open_raster(data: bytes, name: str, fmt: str):
    """(MemoryFile, dataset); the caller closes both."""
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.io import MemoryFile

    mem = MemoryFile(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return mem, mem.open()
    except (RasterioIOError, ValueError) as e:
        mem.close()
        raise _fail(name, f"corrupt or truncated {fmt.upper()}: {_gdal_reason(e)}") from None


def _raster_read(ds, name: str, fmt: str, indexes: list[int]) -> np.ndarray:
    from rasterio.errors import RasterioError

    try:
        return ds.read(indexes)
    except (RasterioError, ValueError) as e:
        raise _fail(name, f"corrupt or truncated {fmt.upper()}: {_gdal_reason(e)}") from None


# --------------------------------------------------------------------------- public


def decode_image(
    data: bytes, name: str = "", bands: Optional[list[int]] = None, max_pixels: Optional[int] = None
) -> np.ndarray:
    """Bytes -> float32 [C,H,W] with all bands (or ``bands``, 0-based, in order) and raw values."""
    fmt = _sniff_or_fail(data, name)
    if fmt in _RASTERIO_FORMATS:
        mem, ds = _open_raster(data, name, fmt)
        try:
            _check_pixels(name, ds.height, ds.width, max_pixels)
            _check_bands(name, bands, ds.count)
            if any(np.dtype(d).kind == "c" for d in ds.dtypes):
                raise _fail(name, f"complex pixels ({ds.dtypes[0]}) are not supported")
            arr = _raster_read(ds, name, fmt, [b + 1 for b in bands] if bands else list(ds.indexes))
        finally:
            ds.close()
            mem.close()
        return arr.astype(np.float32, copy=False)

    img = _pil_open(data, name, fmt)
    # No EXIF transpose: masks carry no orientation tag, so rotating images would misalign them.
    w, h = img.size
    _check_pixels(name, h, w, max_pixels)
    _check_bands(name, bands, len(img.getbands()))
    arr = _pil_pixels(img, name, fmt)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if bands is not None:
        arr = arr[list(bands)]
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_mask(data: bytes, name: str = "") -> np.ndarray:
    """Bytes of a single-band class map (PNG L/P/I;16, TIFF band 1) -> int64 [H,W]."""
    fmt = _sniff_or_fail(data, name)
    if fmt in _RASTERIO_FORMATS:
        from rasterio.enums import ColorInterp

        mem, ds = _open_raster(data, name, fmt)
        try:
            rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
            if ds.count >= 3 and tuple(ds.colorinterp[:3]) == rgb:
                raise _fail(name, f"mask is a {ds.count}-band RGB TIFF; expected a single-band class map")
            arr = _raster_read(ds, name, fmt, [1])[0]
        finally:
            ds.close()
            mem.close()
    else:
        img = _pil_open(data, name, fmt)
        n = len(img.getbands())
        if n != 1:
            raise _fail(
                name,
                f"mask has {n} bands (mode {img.mode}); expected a single-band class map "
                "(grayscale or palette PNG, or a 1-band TIFF)",
            )
        arr = _pil_pixels(img, name, fmt)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise _fail(name, "mask has non-integer values; expected class indices")
    return arr.astype(np.int64)


def image_size(data: bytes, name: str = "") -> tuple[int, int, int]:
    """(height, width, bands) from the header only, without decoding pixels."""
    fmt = _sniff_or_fail(data, name)
    if fmt in _RASTERIO_FORMATS:
        mem, ds = _open_raster(data, name, fmt)
        try:
            return ds.height, ds.width, ds.count
        finally:
            ds.close()
            mem.close()
    img = _pil_open(data, name, fmt)
    w, h = img.size
    return h, w, len(img.getbands())
