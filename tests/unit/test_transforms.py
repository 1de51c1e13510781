import json

import numpy as np
import pytest

from segray.config import AugmentConfig
from segray.core.transforms import (
    BandStats,
    augment,
    compute_band_stats,
    normalize,
    resize_pair,
    to_chw_float,
)

NO_AUG = dict(hflip=0, vflip=0, rot90=0, rotate_degrees=0, brightness=0, contrast=0)


# --------------------------------------------------------------------------- layout


def test_to_chw_float_layouts():
    hwc = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    chw = to_chw_float(hwc)
    assert chw.shape == (3, 4, 5) and chw.dtype == np.float32 and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw[1], hwc[..., 1])
    np.testing.assert_array_equal(to_chw_float(chw, layout="chw"), chw)
    assert to_chw_float(np.zeros((4, 5), np.uint16)).shape == (1, 4, 5)
    with pytest.raises(ValueError):
        to_chw_float(hwc, layout="nchw")
    with pytest.raises(ValueError):
        to_chw_float(np.zeros((1, 2, 3, 4)))


# --------------------------------------------------------------------------- band statistics


def _images(rng: np.random.Generator) -> list[np.ndarray]:
    # uint16-like reflectance: large offset, small spread (where naive sum-of-squares fails)
    return [
        (10_000 + 50 * rng.standard_normal((3, h, w))).astype(np.float32)
        for h, w in [(16, 20), (7, 9), (32, 3), (1, 1)]
    ]


def test_band_stats_match_numpy():
    imgs = _images(np.random.default_rng(0))
    stats = compute_band_stats(iter(imgs))  # a one-pass generator is enough
    flat = np.concatenate([i.reshape(3, -1) for i in imgs], axis=1).astype(np.float64)
    np.testing.assert_allclose(stats.mean, flat.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, flat.std(axis=1), rtol=1e-9)


@pytest.mark.parametrize("nodata", [0.0, float("nan")])
def test_band_stats_ignore_nodata(nodata):
    rng = np.random.default_rng(1)
    imgs = _images(rng)
    for img in imgs[:3]:
        img[rng.random(img.shape) < 0.3] = nodata
    stats = compute_band_stats(imgs, nodata=nodata)
    for b in range(3):
        vals = np.concatenate([i[b].ravel() for i in imgs]).astype(np.float64)
        vals = vals[~np.isnan(vals)] if np.isnan(nodata) else vals[vals != nodata]
        assert stats.mean[b] == pytest.approx(vals.mean(), rel=1e-12)
        assert stats.std[b] == pytest.approx(vals.std(), rel=1e-9)


def test_band_stats_edge_cases():
    const = compute_band_stats([np.full((2, 4, 4), 3.0, np.float32)])
    assert const.mean == [3.0, 3.0] and const.std == [1e-6, 1e-6]
    with pytest.raises(ValueError):
        compute_band_stats([])
    with pytest.raises(ValueError):
        compute_band_stats([np.zeros((3, 2, 2)), np.zeros((2, 2, 2))])
    with pytest.raises(ValueError):
        compute_band_stats([np.zeros((1, 2, 2))], nodata=0)
    with_nan = compute_band_stats([np.array([[[1.0, np.nan], [3.0, np.nan]]])])  # NaN never counts
    assert with_nan.mean == [2.0] and with_nan.std == [1.0]


def test_band_stats_dict_round_trip_and_normalize():
    imgs = _images(np.random.default_rng(2))
    stats = compute_band_stats(imgs)
    again = BandStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    out = normalize(imgs[0], again)
    assert out.dtype == np.float32 and out.shape == imgs[0].shape
    flat = np.concatenate([normalize(i, stats).reshape(3, -1) for i in imgs], axis=1)
    np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(flat.std(axis=1), 1, atol=1e-3)
    with pytest.raises(ValueError):
        normalize(imgs[0][:2], stats)


# --------------------------------------------------------------------------- augmentation


def _labelled_pair(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mask of random ids; image band 0 equals the mask, band 1 is a position code."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 6, (h, w)).astype(np.uint8)
    image = np.stack([mask.astype(np.float32), np.arange(h * w, dtype=np.float32).reshape(h, w)])
    return image, mask


@pytest.mark.parametrize("shape", [(24, 24), (16, 28)])
def test_flips_and_rot90_keep_alignment(shape):
    image, mask = _labelled_pair(*shape)
    cfg = AugmentConfig(**{**NO_AUG, "hflip": 0.5, "vflip": 0.5, "rot90": 0.5})
    seen = set()
    for seed in range(16):
        img, msk = augment(image, mask, cfg, np.random.default_rng(seed))
        assert img.dtype == np.float32 and msk.dtype == np.uint8
        assert img.flags.c_contiguous and msk.flags.c_contiguous
        assert msk.shape == img.shape[1:] and sorted(msk.shape) == sorted(shape)
        if shape[0] != shape[1]:  # non-square pairs keep their shape (rot90 turns them by 180 only)
            assert msk.shape == shape
        np.testing.assert_array_equal(img[0], msk)
        seen.add(img[1].tobytes())
    # the transforms actually vary: the 8 symmetries of a square, the 4 flips of a rectangle
    assert len(seen) > 4 if shape[0] == shape[1] else len(seen) == 4
    # the input is left untouched
    np.testing.assert_array_equal(image, _labelled_pair(*shape)[0])


def test_augment_is_deterministic_per_rng():
    image, mask = _labelled_pair(20, 20)
    cfg = AugmentConfig()
    a = augment(image, mask, cfg, np.random.default_rng(3))
    b = augment(image, mask, cfg, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_no_augmentation_is_identity():
    image, mask = _labelled_pair(10, 12)
    img, msk = augment(image, mask, AugmentConfig(**NO_AUG), np.random.default_rng(0))
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(msk, mask)


def _block_pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Large constant blocks, so bilinear and nearest agree away from block edges."""
    mask = (np.arange(size)[:, None] // 16 * 4 + np.arange(size)[None, :] // 16).astype(np.int64) + 1
    return np.stack([mask.astype(np.float32), np.ones((size, size), np.float32)]), mask


def test_rotation_keeps_labels_consistent_and_fills_outside():
    image, mask = _block_pair()
    cfg = AugmentConfig(**{**NO_AUG, "rotate_degrees": 25})
    corner_filled = 0
    for seed in range(10):
        img, msk = augment(image, mask, cfg, np.random.default_rng(seed), ignore_index=255)
        assert img.shape == image.shape and msk.dtype == np.int64
        inside = msk != 255
        agree = np.isclose(img[0][inside], msk[inside], atol=1e-3).mean()
        assert agree > 0.85, agree
        assert set(np.unique(msk[inside])) <= set(np.unique(mask))
        if msk[0, 0] == 255:
            corner_filled += 1
            np.testing.assert_array_equal(img[:, 0, 0], 0)
    assert corner_filled >= 5


def test_rotation_fill_defaults_to_zero_and_must_fit_dtype():
    image, mask = _block_pair()
    cfg = AugmentConfig(**{**NO_AUG, "rotate_degrees": 45})
    _, msk = augment(image, mask, cfg, np.random.default_rng(0))
    assert (msk == 0).any() and msk.max() <= mask.max()
    with pytest.raises(ValueError):
        augment(image, mask.astype(np.uint8), cfg, np.random.default_rng(0), ignore_index=-1)


def test_photometric_jitter_touches_image_only():
    image, mask = _labelled_pair(16, 16)
    image[1] = np.random.default_rng(1).random((16, 16)) * 100
    cfg = AugmentConfig(**{**NO_AUG, "brightness": 0.5, "contrast": 0.5})
    img, msk = augment(image, mask, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(msk, mask)
    assert not np.allclose(img, image)
    # an affine change with positive gain: per band, the order of pixel values is kept
    for b in range(2):
        assert np.corrcoef(img[b].ravel(), image[b].ravel())[0, 1] > 0.9999


def test_shape_mismatch_raises():
    image, mask = np.zeros((3, 8, 8), np.float32), np.zeros((8, 9), np.uint8)
    with pytest.raises(ValueError):
        augment(image, mask, AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError):
        resize_pair(image, mask, 4)


# --------------------------------------------------------------------------- resize


def test_resize_pair():
    image = np.random.default_rng(0).random((3, 30, 50)).astype(np.float32)
    mask = np.random.default_rng(0).integers(0, 4, (30, 50)).astype(np.uint16)
    img, msk = resize_pair(image, mask, 64)
    assert img.shape == (3, 64, 64) and img.dtype == np.float32
    assert msk.shape == (64, 64) and msk.dtype == np.uint16
    assert set(np.unique(msk)) <= set(np.unique(mask))
    small = np.array([[1, 2], [3, 4]], np.int64)
    _, up = resize_pair(np.zeros((1, 2, 2), np.float32), small, 4)
    np.testing.assert_array_equal(up, np.kron(small, np.ones((2, 2), np.int64)))
