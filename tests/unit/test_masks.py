import io

import numpy as np
import pytest
from PIL import Image

from segray.core.masks import class_fractions, colorize, decode_png, default_palette, encode_png, overlay


@pytest.mark.parametrize(
    "arr, dtype",
    [
        (np.random.default_rng(0).integers(0, 5, (37, 53)), np.uint8),
        (np.random.default_rng(1).integers(0, 256, (64, 64)).astype(np.uint8), np.uint8),
        (np.random.default_rng(2).integers(0, 65536, (31, 17)), np.uint16),
        (np.array([[0, 256], [3, 1]], dtype=np.int32), np.uint16),
        (np.array([[0, 65535]], dtype=np.uint16), np.uint16),
        (np.array([[255, 0]], dtype=np.int64), np.uint8),
    ],
)
def test_png_round_trip_exact(arr, dtype):
    out = decode_png(encode_png(arr))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)


def test_bool_map_round_trips_as_zero_one():
    arr = np.random.default_rng(3).random((20, 30)) > 0.5
    np.testing.assert_array_equal(decode_png(encode_png(arr)), arr.astype(np.uint8))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), np.uint8),
        np.zeros(5, np.uint8),
        np.zeros((0, 4), np.uint8),
        np.array([[0, -1]]),
        np.array([[0, 65536]]),
        np.zeros((3, 3), np.float32),
    ],
)
def test_encode_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_decode_rejects_rgb_png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError):
        decode_png(buf.getvalue())


def test_class_fractions():
    m = np.array([[0, 1, 1, 2], [2, 2, 255, 255]])
    f = class_fractions(m, 3, ignore_value=255)
    assert f.dtype == np.float64
    np.testing.assert_allclose(f, [1 / 6, 2 / 6, 3 / 6])
    assert f.sum() == pytest.approx(1.0)
    rnd = np.random.default_rng(0).integers(0, 7, (50, 50))
    assert class_fractions(rnd, 10).sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(class_fractions(np.full((3, 3), 255), 3, ignore_value=255), np.zeros(3))
    with pytest.raises(ValueError):
        class_fractions(m, 3)  # 255 is out of range when not ignored


def test_palette_is_distinct():
    for n in (5, 22, 60):
        pal = default_palette(n)
        assert pal.shape == (n, 3) and pal.dtype == np.uint8
        assert len({tuple(c) for c in pal}) == n
    assert tuple(default_palette(1)[0]) == (0, 0, 0)


def test_colorize():
    m = np.array([[0, 1], [4, 1]])
    rgb = colorize(m)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 1], rgb[1, 1])
    assert not np.array_equal(rgb[0, 0], rgb[1, 0])
    custom = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0], [9, 9, 9]])
    np.testing.assert_array_equal(colorize(m, custom)[1, 0], [9, 9, 9])
    with pytest.raises(ValueError):
        colorize(m, custom[:3])


def test_overlay_keeps_background():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = np.zeros((16, 16), np.int64)
    m[4:8, 4:8] = 2
    out = overlay(img, m)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out[m == 0], img[m == 0])
    assert not np.array_equal(out[m == 2], img[m == 2])
    np.testing.assert_array_equal(overlay(img, m, alpha=0.0), img)
    with pytest.raises(ValueError):
        overlay(img, m[:8])
