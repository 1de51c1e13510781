"""What tiles leave for stitching: blending from the overlap strips alone gives what blending
whole tiles gives, with a fraction of the bytes."""

from __future__ import annotations

import numpy as np
import pytest

from segray.core.tiling import blocks, stitch_window, tile_grid, tiles_touching
from segray.infer.scene_grid import class_map
from segray.infer.tile_blobs import StripTiles, tile_blobs


def _tile_probs(tiles, k: int, h: int, w: int, seed: int = 0):
    """Per-tile float16 probabilities: a smooth scene field plus per-tile noise (tiles disagree
    in their overlaps, as a model's tiles do near their edges), and a nodata corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(k, h // 32 + 2, w // 32 + 2))
    field = np.kron(coarse, np.ones((32, 32)))[:, :h, :w]
    valid = np.ones((h, w), bool)
    valid[: h // 5, : w // 7] = False
    out = []
    for t in tiles:
        logits = field[(slice(None), *t.slices)] + 0.3 * rng.normal(size=(k, t.height, t.width))
        p = np.exp(logits - logits.max(0))
        out.append(((p / p.sum(0)).astype(np.float16), valid[t.slices]))
    return out


@pytest.mark.parametrize("kind,k,probs", [("cosine", 5, False), ("linear", 1, False), ("cosine", 3, True)])
def test_strips_blend_like_whole_tiles(kind, k, probs):
    h, w, size, overlap, margin = 700, 900, 256, 64, 16
    tiles = tile_grid(h, w, size, overlap)
    task = {"blend": kind, "vheight": h, "vwidth": w, "overlap": overlap, "margin": margin, "prob_url": probs or None}
    blobs = tile_blobs(task)
    assert isinstance(blobs, StripTiles)
    per_tile = _tile_probs(tiles, k, h, w)
    encoded = [blobs.encode(p, v, t) for t, (p, v) in zip(tiles, per_tile)]
    decoded = [blobs.decode(b) for b in encoded]
    whole = []
    for p, v in per_tile:  # the reference: every tile's whole float16 probabilities, NaN where nodata
        p = p.copy()
        p[:, ~v] = np.nan
        whole.append(p)
    index = {t: i for i, t in enumerate(tiles)}
    for win in blocks(h, w, 256):
        near = tiles_touching(tiles, win)
        got = blobs.block(win, ((t, decoded[index[t]]) for t in near))
        ref = stitch_window(win, ((t, whole[index[t]]) for t in near), h, w, overlap, kind, margin)
        valid = ~np.isnan(ref[0])
        pred, conf = class_map(np.nan_to_num(ref, nan=0.0))
        assert (got.valid == valid).all()
        # Float noise only: a tile's own pixels are its float16 values, blended ones p*w/w.
        np.testing.assert_allclose(got.conf[valid], conf[valid], atol=1e-6)
        top2 = np.sort(np.nan_to_num(ref, nan=0.0), axis=0)[-2:] if k > 1 else None
        decided = valid & ((top2[1] - top2[0] > 1e-5) if k > 1 else (np.abs(ref[0] - 0.5) > 1e-5))
        assert (got.pred[decided] == pred[decided]).all()
        if probs:
            np.testing.assert_allclose(got.probs[:, valid], ref[:, valid], atol=1e-6)
    # Bytes: written probabilities are needed everywhere (as many bytes as whole tiles), and one
    # binary probability is smaller than a class and a confidence; otherwise only the strips'
    # (here 0.90 of whole tiles: a grid of 256 px tiles, 64 px overlaps and shifted last tiles).
    ratio = sum(len(b) for b in encoded) / sum(p.nbytes for p in whole)
    assert ratio <= (1.02 if probs or k == 1 else 0.92), ratio  # 1.02: npz headers
