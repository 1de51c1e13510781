"""Decoding real image bytes: formats, bands, bit depth, and clear errors for bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.io import MemoryFile

from segray.io.images import (
    KINDS,
    ImageDecodeError,
    _pil_bands,
    decode_image,
    decode_mask,
    full_scale,
    image_size,
    range_problem,
    sniff_format,
)

RNG = np.random.default_rng(0)


def png(arr: np.ndarray, mode: str | None = None, palette: bool = False) -> bytes:
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if palette:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette([i for c in range(256) for i in (c, 255 - c, c // 2)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def geotiff(arr: np.ndarray, **kw) -> bytes:
    c, h, w = arr.shape
    with MemoryFile() as mem:
        with mem.open(
            driver="GTiff", width=w, height=h, count=c, dtype=arr.dtype, crs="EPSG:32616",
            transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 3700000), **kw,
        ) as ds:  # fmt: skip
            ds.write(arr)
        return mem.read()


# --------------------------------------------------------------------------- formats


def test_png_rgb_exact():
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(png(rgb))
    assert out.dtype == np.float32 and out.shape == (3, 20, 30)
    np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1))


@pytest.mark.parametrize(
    "arr,bands",
    [
        (RNG.integers(0, 256, (8, 9), dtype=np.uint8), 1),  # L
        (RNG.integers(0, 256, (8, 9, 4), dtype=np.uint8), 4),  # RGBA
    ],
)
def test_png_band_counts(arr, bands):
    out = decode_image(png(arr))
    assert out.shape == (bands, 8, 9)
    np.testing.assert_array_equal(out, arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _palette_png(idx: np.ndarray, transparency: int | None = None) -> bytes:
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette([v for c in range(256) for v in (c * 7 % 256, 255 - c, (c * 31) % 256)])
    buf = io.BytesIO()
    img.save(buf, format="PNG", **({"transparency": transparency} if transparency is not None else {}))
    return buf.getvalue()


@pytest.mark.parametrize("transparency", [None, 2])
def test_palette_png_image_is_rgb_mask_keeps_indices(transparency):
    idx = RNG.integers(0, 6, (10, 12), dtype=np.uint8)
    data = _palette_png(idx, transparency)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and (transparency is None) == ("transparency" not in img.info)
    out = decode_image(data)
    assert out.shape == (3, 10, 12) and image_size(data) == (10, 12, 3)
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")).transpose(2, 0, 1))
    np.testing.assert_array_equal(decode_mask(data), idx)  # a class map: the index is the class
    assert _pil_bands(Image.new("PA", (2, 2)), "pa.png") == 3  # PIL opens some files as PA (no PNG writer)


def test_cmyk_jpeg_is_rgb():
    cmyk = Image.fromarray(RNG.integers(0, 256, (16, 24, 4), dtype=np.uint8), "CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.mode == "CMYK"
    out = decode_image(buf.getvalue(), "c.jpg")
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def test_unsupported_modes_are_named():
    with pytest.raises(ImageDecodeError, match="image mode LAB") as err:
        _pil_bands(Image.new("LAB", (2, 2)), "x.png")  # no format we decode with PIL stores LAB
    assert err.value.kind == "unsupported_mode"
    err = _reason(geotiff(np.zeros((1, 4, 4), np.complex64)))
    assert err[0] == "unsupported_mode" and "complex" in err[1]


def test_16bit_png_keeps_values():
    arr = RNG.integers(0, 65535, (16, 16), dtype=np.uint16)
    arr[0, 0] = 65535
    data = png(arr)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data)
    assert out.shape == (1, 16, 16) and out.max() == 65535
    np.testing.assert_array_equal(out[0], arr)
    np.testing.assert_array_equal(decode_mask(data), arr.astype(np.int64))


def test_jpeg():
    rgb = np.full((32, 48, 3), (200, 40, 90), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    out = decode_image(buf.getvalue(), "x.jpg")
    assert out.shape == (3, 32, 48)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), [200, 40, 90], atol=4)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_multiband_geotiff_dtypes(dtype):
    arr = (RNG.normal(0, 1000, (5, 24, 20))).astype(dtype)
    out = decode_image(geotiff(arr, compress="deflate"))
    assert out.shape == (5, 24, 20) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_band_selection_in_order():
    arr = np.stack([np.full((4, 4), i, np.uint16) for i in range(6)])
    out = decode_image(geotiff(arr), bands=[5, 0, 2])
    assert [int(b[0, 0]) for b in out] == [5, 0, 2]
    rgb = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(png(rgb), bands=[2])[0], rgb[..., 2])


def test_format_from_magic_bytes_not_extension():
    arr = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    assert sniff_format(png(arr)) == "png"
    assert sniff_format(geotiff(arr[None])) == "tiff"
    np.testing.assert_array_equal(decode_image(png(arr), "wrongly_named.tif")[0], arr)


def test_image_size_reads_header():
    assert image_size(png(np.zeros((7, 11, 3), np.uint8))) == (7, 11, 3)
    assert image_size(geotiff(np.zeros((13, 9, 8), np.int16))) == (9, 8, 13)


# --------------------------------------------------------------------------- real data


def test_sen1floods11_s2_13_band_int16(shared_data: Path):
    path = shared_data / "sen1floods11_sample" / "Spain_7370579_S2Hand.tif"
    out = decode_image(path.read_bytes(), path.name)
    with rasterio.open(path) as ds:
        assert ds.count == 13 and ds.dtypes[0] == "int16"
        ref = ds.read()
    assert out.shape == (13, 512, 512)
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    label = decode_mask((path.parent / "Spain_7370579_LabelHand.tif").read_bytes())
    assert label.shape == (512, 512) and set(np.unique(label)) <= {-1, 0, 1}


def test_spacenet_uint16_geotiff(shared_data: Path):
    path = shared_data / "spacenet4_atlanta_solaris" / "sample_geotiff.tif"
    out = decode_image(path.read_bytes(), path.name)
    assert out.shape == (1, 900, 900) and out.max() > 255  # 16-bit values kept, not rescaled
    inst = decode_mask((path.parent / "instance_labels_derived.png").read_bytes())
    assert inst.shape == (900, 900) and inst.max() == 43


def test_loveda_png_and_mask(shared_data: Path):
    folder = shared_data / "loveda_potsdam_vaihingen_mmseg" / "loveda"
    img = decode_image((folder / "img_dir" / "0.png").read_bytes())
    assert img.shape == (3, 1024, 1024) and 0 <= img.min() and img.max() <= 255
    mask = decode_mask((folder / "ann_dir" / "0.png").read_bytes())
    assert mask.shape == (1024, 1024) and mask.dtype == np.int64
    assert set(np.unique(mask)) <= set(range(8))


# --------------------------------------------------------------------------- bad input


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is never reached)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _reason(data: bytes, **kw) -> tuple[str, str]:
    """(kind, message) of bytes that must not decode."""
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, "bad.img", **kw)
    assert isinstance(err.value, ValueError) and err.value.kind in KINDS
    # The message begins with the kind: text-only consumers count kinds by the first colon.
    assert str(err.value).startswith(f"{err.value.kind}: bad.img: ")
    return err.value.kind, str(err.value)


def test_empty_file():
    kind, msg = _reason(b"")
    assert kind == "empty" and "empty file (0 bytes)" in msg


def test_random_bytes():
    assert _reason(RNG.integers(1, 255, 4096, dtype=np.uint8).tobytes())[0] == "not_an_image"


def test_text_file():
    kind, reason = _reason(b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>")
    assert kind == "not_an_image" and "text" in reason and "xml" in reason


def test_truncated_png():
    data = png(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kind, msg = _reason(data[: len(data) // 2])
    assert kind == "truncated" and "truncated" in msg


def test_truncated_tiff():
    data = geotiff(RNG.integers(0, 65535, (3, 128, 128)).astype(np.uint16))
    kind, msg = _reason(data[: len(data) // 2])
    assert kind == "truncated" and "truncated" in msg
    kind, msg = _reason(data[:100])  # header cut: the directory itself is missing
    assert kind == "truncated" and "TIFF" in msg


def test_too_many_pixels_checked_before_decoding():
    for data, kw in [(png(np.zeros((100, 100), np.uint8)), {"max_pixels": 9_999}),
                     (geotiff(np.zeros((1, 100, 100), np.uint8)), {"max_pixels": 9_999}),
                     # 50_000 x 50_000 claimed by a tiny file: refused from the header alone.
                     (_png_with_size(50_000, 50_000), {"max_pixels": 64_000_000}),
                     (_png_with_size(50_000, 50_000), {})]:  # PIL's bomb guard
        kind, msg = _reason(data, **kw)
        assert kind == "too_large" and "too many pixels" in msg
    assert decode_image(png(np.zeros((100, 100), np.uint8)), max_pixels=10_000).shape == (1, 100, 100)


def test_band_out_of_range():
    kind, msg = _reason(png(np.zeros((4, 4, 3), np.uint8)), bands=[0, 3])
    assert kind == "band_mismatch" and "band index 3 out of range" in msg
    assert _reason(geotiff(np.zeros((2, 4, 4), np.int16)), bands=[-1])[0] == "band_mismatch"


# --------------------------------------------------------------------------- value range


def test_full_scale_from_band_statistics():
    assert full_scale({"mean": [127.5, 100.0, 90.0], "std": [73.6, 60.0, 50.0]}) == 255  # uniform 8-bit: 201
    assert full_scale({"mean": [0.45], "std": [0.25]}) == 1.0
    assert full_scale({"mean": [1500.0], "std": [900.0]}) == 65535  # 16-bit reflectance
    assert full_scale({"mean": [0.0], "std": [1.0]}) is None  # standardised: no full scale
    assert full_scale({"mean": [9e4], "std": [1e4]}) is None
    assert full_scale(None) is None


def test_16bit_rgb_tiff_flagged_for_an_8bit_checkpoint():
    scale = full_scale({"mean": [120.0] * 3, "std": [60.0] * 3})
    data = geotiff(RNG.integers(0, 65536, (3, 16, 16)).astype(np.uint16), photometric="RGB")
    problem = range_problem(decode_image(data), scale)
    assert problem is not None and problem.startswith("out_of_range: pixel values up to 6")
    assert "~255" in problem
    assert range_problem(decode_image(png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))), scale) is None
    assert range_problem(decode_image(data), None) is None  # a checkpoint that cannot tell: no judgement


def test_rgb_mask_rejected():
    with pytest.raises(ImageDecodeError, match="3 bands") as err:
        decode_mask(png(np.zeros((4, 4, 3), np.uint8)), "m.png")
    assert err.value.kind == "mask_mismatch"
    with pytest.raises(ImageDecodeError, match="RGB"):
        decode_mask(geotiff(np.zeros((3, 4, 4), np.uint8), photometric="RGB"), "m.tif")


def test_float_mask_must_hold_integers():
    assert decode_mask(geotiff(np.array([[[0, 1], [2, 3]]], np.float32))).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ImageDecodeError, match="non-integer"):
        decode_mask(geotiff(np.array([[[0.5, 1], [2, 3]]], np.float32)))
