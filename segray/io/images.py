"""Decode image bytes into arrays, keeping every band and the full bit depth.

Images become float32 ``[C, H, W]``; masks become int64 ``[H, W]``. The format is sniffed from
the magic bytes (object stores often serve wrong extensions); TIFF/GeoTIFF/JPEG 2000 go through
rasterio (any band count and dtype), everything else through PIL. Every failure is an
``ImageDecodeError`` with a stable ``kind`` (one of ``KINDS``) and a message that says what is
wrong, so inference can turn it into an error row and a summary can count the kinds.

Colour: a palette (P, PA), CMYK or YCbCr image becomes RGB (PIL's ``convert("RGB")``, what PIL
users expect: the colours, not palette indices or ink amounts); every other PIL mode keeps its
bands (L, LA, RGB, RGBA, 16-bit and float greyscale); any other mode is refused (``unsupported_mode``).
Masks keep palette indices: there the index is the class.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

_RASTERIO_FORMATS = {"tiff", "jp2"}

# The stable reason kinds of error rows (``error_kind``), for summaries and alerts; the message
# (``error``) says the rest. Decoding raises the first six, reading and checking the others.
KINDS = ("empty", "not_an_image", "truncated", "too_large", "band_mismatch", "unsupported_mode",
         "unreadable", "mask_mismatch", "out_of_range")

# PIL modes given to models as they are, and those converted to RGB first.
_KEEP_MODES = {"1", "L", "LA", "I", "F", "RGB", "RGBA", "RGBX", "I;16", "I;16L", "I;16B", "I;16N"}
_RGB_MODES = {"P", "PA", "CMYK", "YCbCr"}


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image: ``kind`` (one of ``KINDS``) and a reason.

    The message begins with the kind (``"truncated: a.png: ..."``), so even code that only has
    the text can count kinds by what precedes the first colon.
    """

    def __init__(self, kind: str, reason: str, name: str = ""):
        self.kind, self.reason, self.name = kind, reason, name
        super().__init__(f"{kind}: {_readable(name)}: {reason}" if name else f"{kind}: {reason}")


def _readable(name: str) -> str:
    # Arrow strings (the error column) must be valid UTF-8; see segray.io.fs.readable_path.
    from segray.io.fs import readable_path

    return readable_path(name)


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


def _fail(kind: str, name: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(kind, reason, name)


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
        raise _fail("empty", name, "empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise _fail("not_an_image", name, f"not an image: {_describe(data)} ({len(data)} bytes)")
    return fmt


def _check_pixels(name: str, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise _fail("too_large", name, f"too many pixels: {w}x{h} = {h * w:,} > max_pixels {max_pixels:,}")


def _check_bands(name: str, bands: Optional[list[int]], count: int) -> None:
    for b in bands or []:
        if not 0 <= b < count:
            raise _fail("band_mismatch", name, f"band index {b} out of range: image has {count} band(s) (0-based)")


# --------------------------------------------------------------------------- PIL


def _pil_open(data: bytes, name: str, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # raised from the header, before any pixels
        raise _fail("too_large", name, f"too many pixels for PIL: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _fail("truncated", name, f"corrupt {fmt.upper()} header: {e}") from None


def _pil_load(img: Image.Image, name: str, fmt: str) -> None:
    """Full decode; truncated data fails here, not later in a model."""
    try:
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, struct.error ...
        raise _fail("truncated", name, f"corrupt or truncated {fmt.upper()}: {e}") from None


def _pil_pixels(img: Image.Image, name: str, fmt: str) -> np.ndarray:
    """[H,W] or [H,W,C] pixels as stored."""
    _pil_load(img, name, fmt)
    return np.asarray(img)


def _pil_bands(img: Image.Image, name: str) -> int:
    """Bands the image gives a model: 3 for the modes converted to RGB; refuses other modes."""
    if img.mode in _RGB_MODES:
        return 3
    if img.mode not in _KEEP_MODES:
        raise _fail("unsupported_mode", name, f"image mode {img.mode} is not supported "
                    f"(supported: {', '.join(sorted(_KEEP_MODES | _RGB_MODES))})")
    return len(img.getbands())


def _pil_image_pixels(img: Image.Image, name: str, fmt: str) -> np.ndarray:
    """[H,W] or [H,W,C] pixels of an image (not a mask): palette and CMYK images as RGB."""
    if img.mode in _RGB_MODES:
        _pil_load(img, name, fmt)  # decode first: a truncated file fails as truncated
        img = img.convert("RGB")
    return _pil_pixels(img, name, fmt)


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
        raise _fail("truncated", name, f"corrupt or truncated {fmt.upper()}: {_gdal_reason(e)}") from None


def _raster_read(ds, name: str, fmt: str, indexes: list[int]) -> np.ndarray:
    from rasterio.errors import RasterioError

    try:
        return ds.read(indexes)
    except (RasterioError, ValueError) as e:
        raise _fail("truncated", name, f"corrupt or truncated {fmt.upper()}: {_gdal_reason(e)}") from None


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
                raise _fail("unsupported_mode", name, f"complex pixels ({ds.dtypes[0]}) are not supported")
            arr = _raster_read(ds, name, fmt, [b + 1 for b in bands] if bands else list(ds.indexes))
        finally:
            ds.close()
            mem.close()
        return arr.astype(np.float32, copy=False)

    img = _pil_open(data, name, fmt)
    # No EXIF transpose: masks carry no orientation tag, so rotating images would misalign them.
    w, h = img.size
    _check_pixels(name, h, w, max_pixels)
    _check_bands(name, bands, _pil_bands(img, name))
    arr = _pil_image_pixels(img, name, fmt)
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
                raise _fail("mask_mismatch", name, f"mask is a {ds.count}-band RGB TIFF; expected a single-band class map")
            arr = _raster_read(ds, name, fmt, [1])[0]
        finally:
            ds.close()
            mem.close()
    else:
        img = _pil_open(data, name, fmt)
        n = len(img.getbands())
        if n != 1:
            raise _fail(
                "mask_mismatch",
                name,
                f"mask has {n} bands (mode {img.mode}); expected a single-band class map "
                "(grayscale or palette PNG, or a 1-band TIFF)",
            )
        arr = _pil_pixels(img, name, fmt)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise _fail("mask_mismatch", name, "mask has non-integer values; expected class indices")
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
    return h, w, _pil_bands(img, name)


# --------------------------------------------------------------------------- value range

# Full scales of the usual pixel encodings: float reflectance/[0, 1] images, 8-bit and 16-bit.
_FULL_SCALES = (1.0, 255.0, 65535.0)


def full_scale(band_stats: dict | None) -> float | None:
    """The full scale (1, 255 or 65535) of the data a checkpoint's band statistics came from,
    or None when they cannot tell (no statistics, signed or standardised data, larger values).

    Checkpoints keep only per-band mean and std. Natural images seldom have mean + std above
    their full scale (uniform 8-bit noise: 201 of 255), so the smallest full scale above
    every band's mean + std is taken; data that fits none is not judged.
    """
    if not band_stats or not band_stats.get("mean") or not band_stats.get("std"):
        return None
    mean, std = np.asarray(band_stats["mean"], float), np.asarray(band_stats["std"], float)
    if (mean - std < 0).any():  # negative values: standardised or signed data, no full scale
        return None
    top = float((mean + std).max())
    return next((s for s in _FULL_SCALES if top <= s), None)


def range_problem(pixels: np.ndarray, scale: float | None) -> str | None:
    """Why ``pixels`` are beyond the data a model was trained on (``out_of_range: ...``), or
    None. One max per image: cheap next to decoding it."""
    if scale is None or pixels.size == 0:
        return None
    top = float(np.nanmax(pixels)) if np.isnan(pixels).any() else float(pixels.max())
    if not top > scale * 1.001:  # float rounding of [0, 1] data is not a problem
        return None
    return f"out_of_range: pixel values up to {top:g}, the checkpoint's data reached ~{scale:g}"
