import numpy as np
import pytest
import torch

from segray.core.tiling import (
    EPS,
    Stitcher,
    blend_weights,
    blocks,
    crop_to,
    pad_to,
    stitch_window,
    tile_grid,
    tile_weights,
    tiles_touching,
)


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(300, 400, 128, 32), (256, 256, 128, 0), (1000, 129, 128, 64), (128, 128, 128, 16), (50, 700, 128, 32)]
    + [(7, 5, 128, 32)],
)
def test_grid_covers_scene_with_full_tiles_and_partitioning_cores(height, width, tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    cover, core = np.zeros((height, width), int), np.zeros((height, width), int)
    for t in tiles:
        assert t.height == min(tile, height) and t.width == min(tile, width)  # full size, or the scene
        assert t.row_off >= 0 and t.col_off >= 0
        assert t.row_off + t.height <= height and t.col_off + t.width <= width
        cover[t.slices] += 1
        r, c, h, w = t.core
        core[r : r + h, c : c + w] += 1
        rows, cols = t.core_slices
        assert 0 <= rows.start < rows.stop <= t.height and 0 <= cols.start < cols.stop <= t.width
    assert cover.min() >= 1
    assert (core == 1).all()  # cores partition the scene
    for offsets, size in [(sorted({t.row_off for t in tiles}), height), (sorted({t.col_off for t in tiles}), width)]:
        assert offsets[0] == 0 and offsets[-1] + min(tile, size) == size  # the last tile ends at the border
        steps = np.diff(offsets)
        assert (steps[:-1] == tile - overlap).all() and (steps[-1:] <= tile - overlap).all()


def test_grid_validates_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, 64, 64)
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, 64, -1)
    with pytest.raises(ValueError, match="tile_size"):
        tile_grid(100, 100, 0, 0)
    with pytest.raises(ValueError, match="non-empty"):
        tile_grid(0, 100, 64, 8)


def test_pad_and_crop_round_trip_numpy_and_torch():
    a = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    p = pad_to(a, 8, value=-1)
    assert p.shape == (3, 8, 8) and (p[:, 5:, :] == -1).all() and (p[:, :, 7:] == -1).all()
    np.testing.assert_array_equal(crop_to(p, 5, 7), a)
    t = pad_to(torch.from_numpy(a), (6, 9))
    assert t.shape == (3, 6, 9) and torch.equal(crop_to(t, 5, 7), torch.from_numpy(a))
    with pytest.raises(ValueError):
        pad_to(a, 4)


@pytest.mark.parametrize("kind", ["cosine", "linear", "uniform"])
def test_blend_weights_shape_range_and_scene_edges(kind):
    w = blend_weights(64, 16, kind)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.min() >= EPS and w.max() == 1.0 and w[16:48, 16:48].min() == 1.0
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    if kind != "uniform":
        assert (w[0] == np.float32(EPS)).all() and (np.diff(w[:16, 32]) > 0).all()  # ramps down to EPS
    # a corner tile keeps full weight on the two sides touching the scene edge
    corner = tile_grid(200, 200, 64, 16)[0]
    tw = tile_weights(corner, 200, 200, 16, kind)
    assert (tw[:48, :48] == 1.0).all()
    assert (tw[-1, :48] == w[-1, 32]).all()  # the interior side still falls off like an interior tile


def test_margin_weights_are_eps_and_cross_fade_sums_to_one():
    w = blend_weights(128, 32, "cosine", margin=4)[64]
    assert (w[:4] == np.float32(EPS)).all() and (w[-4:] == np.float32(EPS)).all()
    # neighbours at stride 96 overlap on 32 pixels: ramps are a partition of unity (up to EPS)
    np.testing.assert_allclose(w[96:] + w[:32], 1.0, atol=2 * EPS)
    with pytest.raises(ValueError, match="margin"):
        blend_weights(128, 8, margin=4)


@pytest.mark.parametrize("kind", ["cosine", "linear", "uniform"])
def test_stitching_constant_predictions_reproduces_the_constant(kind):
    height, width, overlap = 300, 400, 32
    const = np.array([1.0, -2.5, 3.7], np.float32)[:, None, None]
    stitcher = Stitcher(3, height, width, overlap, kind)
    for t in tile_grid(height, width, 128, overlap):
        stitcher.add(t, np.broadcast_to(const, (3, t.height, t.width)))
    out = stitcher.result()
    assert out.shape == (3, height, width)
    np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), rtol=1e-6)  # exact up to float32 rounding


def test_stitcher_rejects_wrong_shapes_and_gaps():
    tiles = tile_grid(200, 200, 128, 32)
    s = Stitcher(2, 200, 200, 32)
    with pytest.raises(ValueError, match="values"):
        s.add(tiles[0], np.zeros((2, 100, 128)))
    s.add(tiles[0], np.zeros((2, 128, 128)))
    with pytest.raises(ValueError, match="no added tile"):
        s.result()


def _fcn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for cin, cout in [(3, 16), (16, 16), (16, 16), (16, 4)]:
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


@torch.no_grad()
def test_tiled_prediction_is_seam_free():
    # Four 3x3 convs with zero padding: receptive-field radius 4 px. Outputs within 4 px of an
    # interior tile edge saw padding instead of neighbours, everything else is exact. margin=4
    # gives those pixels weight EPS and overlap=32 > 2*margin lets the neighbour's exact pixels
    # cover them, so tiled == untiled up to float32 conv rounding (~1e-6, different input
    # shapes may pick different kernels) plus EPS * |error| (<1e-6): tolerance 1e-5. Scene-edge
    # sides see the same zero padding tiled or not, so the equality holds at the border too.
    model = _fcn()
    scene = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 300, 400)).astype(np.float32))
    full = model(scene[None])[0].numpy()
    tiles = tile_grid(300, 400, 128, 32)
    preds = {t: model(scene[(slice(None), *t.slices)][None])[0].numpy() for t in tiles}

    blended = Stitcher(4, 300, 400, overlap=32, kind="cosine", margin=4)
    cores = np.zeros_like(full)
    for t, p in preds.items():
        blended.add(t, p)
        r, c, h, w = t.core
        cores[:, r : r + h, c : c + w] = p[(slice(None), *t.core_slices)]
    np.testing.assert_allclose(blended.result(), full, atol=1e-5, rtol=0)
    # cores end >= 16 px from interior tile edges (> radius 4): cropping them is exact as well
    np.testing.assert_allclose(cores, full, atol=1e-5, rtol=0)

    # without a margin the padded edge pixels leak in with small but non-negligible weight
    no_margin = Stitcher(4, 300, 400, overlap=32, kind="cosine")
    for t, p in preds.items():
        no_margin.add(t, p)
    assert np.abs(no_margin.result() - full).max() > 1e-4


def test_streaming_blocks_equal_whole_scene_stitching():
    height, width, overlap = 300, 400, 32
    rng = np.random.default_rng(1)
    tiles = tile_grid(height, width, 128, overlap)
    preds = {t: rng.normal(size=(2, t.height, t.width)).astype(np.float32) for t in tiles}
    whole = Stitcher(2, height, width, overlap, "cosine", margin=4)
    for t, p in preds.items():
        whole.add(t, p)
    expected = whole.result()

    out = np.full_like(expected, np.nan)
    for r, c, h, w in blocks(height, width, 100):  # blocks not aligned with the tiles
        touching = tiles_touching(tiles, (r, c, h, w))
        assert len(touching) < len(tiles)
        block = stitch_window((r, c, h, w), [(t, preds[t]) for t in touching], height, width, overlap, "cosine", 4)
        assert block.shape == (2, h, w)  # memory per block, not per scene
        out[:, r : r + h, c : c + w] = block
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("h,w,tile,overlap", [(700, 900, 256, 64), (512, 1000, 256, 96), (300, 256, 256, 32),
                                              (1100, 1100, 512, 128), (100, 90, 128, 32)])
def test_alone_slices_hold_only_pixels_no_other_tile_covers(h, w, tile, overlap):
    tiles = tile_grid(h, w, tile, overlap)
    cover = np.zeros((h, w), np.int32)
    for t in tiles:
        cover[t.slices] += 1
    for t in tiles:
        rs, cs = t.alone_slices
        once = cover[t.slices] == 1
        assert once[rs, cs].all(), t
        if not once.any():  # neighbours cover the whole tile
            continue
        # and the bound is tight: within a pixel of the true (rectangular) alone part on every side
        rows, cols = np.flatnonzero(once.any(axis=1)), np.flatnonzero(once.any(axis=0))
        assert rs.start - rows[0] <= 1 and rows[-1] + 1 - rs.stop <= 1, t
        assert cs.start - cols[0] <= 1 and cols[-1] + 1 - cs.stop <= 1, t
