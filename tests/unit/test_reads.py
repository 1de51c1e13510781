"""Reading rows of real files on disk: every bad input is an error row with a stable kind.

No Ray: ``read_decode`` is a plain batch function. Files are written for real (odd names,
symlinks, broken bytes) and listed with the same listers inference uses.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from rasterio.io import MemoryFile

from segray.config import SourceConfig
from segray.infer.steps import error_reasons
from segray.io.fs import path_bytes, readable_path, real_path
from segray.io.sources import list_samples
from segray.io.images import KINDS
from segray.io.instance_reads import instance_items, read_decode_instances
from segray.io.reads import path_item, read_decode

RNG = np.random.default_rng(1)
ODD = b"scene_\xff\xfe.png"  # not valid UTF-8: a name from an old Windows share or a Latin-1 disk
EIGHT_BIT = 255.0


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiff16(c: int = 3, size: int = 16) -> bytes:
    arr = RNG.integers(300, 65536, (c, size, size)).astype(np.uint16)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=c, dtype="uint16", photometric="RGB") as ds:
            ds.write(arr)
        return mem.read()


def _batch(paths: list[str], masks: list[str | None] | None = None) -> dict:
    masks = masks or [None] * len(paths)
    rows = [{**path_item("image", p), **path_item("mask", m), "image_id": str(i)}
            for i, (p, m) in enumerate(zip(paths, masks))]
    return {k: [r[k] for r in rows] for k in rows[0]}


def _row(out: dict, i: int) -> dict:
    return {k: out[k][i] for k in ("status", "error", "error_kind", "warnings", "source_path", "source_path_bytes")}


# --------------------------------------------------------------------------- path names


@pytest.mark.parametrize("raw", [ODD, "é_ok.png".encode(), b"plain.png", b"/d/\x80\\x80.tif"])
def test_readable_and_raw_path_round_trip(raw):
    path = os.fsdecode(raw)  # what os.listdir gives: surrogate escapes for bytes that are not UTF-8
    readable = readable_path(path)
    readable.encode("utf-8")  # always valid UTF-8: an Arrow string
    pa.array([readable], pa.string())
    try:
        raw.decode("utf-8")
        assert readable == path and path_bytes(path) is None
    except UnicodeDecodeError:
        assert path_bytes(path) == raw and readable == raw.decode("utf-8", "backslashreplace")
    assert real_path(readable, path_bytes(path)) == path  # lossless with the bytes column
    assert readable_path(raw) == readable


def test_listing_keeps_odd_names_and_dangling_symlinks(tmp_path: Path):
    good = _png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "a.png").write_bytes(good)
    with open(os.path.join(os.fsencode(tmp_path), ODD), "wb") as f:
        f.write(good)
    os.symlink(tmp_path / "a.png", tmp_path / "linked.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "sub", tmp_path / "sub_link.png")  # a folder's link is not a file
    for source in (SourceConfig(images=str(tmp_path)), SourceConfig(glob=str(tmp_path / "*.png"))):
        samples = list_samples(source)
        ids = sorted(s.image_id for s in samples)
        assert ids == ["a", "dangling", "linked", "scene_\\xff\\xfe"], source
        odd = next(s for s in samples if s.image_id.startswith("scene_"))
        assert os.fsencode(odd.image) == os.fsencode(tmp_path) + b"/" + ODD  # opens the real file


# --------------------------------------------------------------------------- read_decode


def test_odd_name_is_read_and_kept_losslessly(tmp_path: Path):
    rgb = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = os.path.join(os.fsencode(tmp_path), ODD)
    with open(path, "wb") as f:
        f.write(_png(rgb))
    batch = _batch([os.fsdecode(path)])
    pa.table({k: batch[k] for k in ("image", "image_path_bytes")})  # what Ray's from_items builds
    out = read_decode(batch)
    row = _row(out, 0)
    assert row["status"] == "ok" and row["error_kind"] == "" and row["source_path_bytes"] == path
    assert row["source_path"] == path.decode("utf-8", "backslashreplace")
    np.testing.assert_array_equal(out["pixels"][0], rgb.transpose(2, 0, 1))


def test_every_broken_file_is_a_row_with_its_kind(tmp_path: Path):
    good = _png(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    files = {
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "truncated.tif": _tiff16()[:120],
        "text.png": b"<html><body>404 Not Found</body></html>",
        "big.png": _png(np.zeros((64, 64, 3), np.uint8)),
        "ok.png": good,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    names = list(files) + ["dangling.png", "missing.png"]
    out = read_decode(_batch([str(tmp_path / n) for n in names]), max_pixels=32 * 32)
    kinds = dict(zip(names, out["error_kind"]))
    assert kinds == {"empty.png": "empty", "truncated.png": "truncated", "truncated.tif": "truncated",
                     "text.png": "not_an_image", "big.png": "too_large", "ok.png": "",
                     "dangling.png": "unreadable", "missing.png": "unreadable"}
    for i, name in enumerate(names):
        status, error, kind = out["status"][i], out["error"][i], out["error_kind"][i]
        assert (status == "ok") == (kind == "") and (kind == "" or kind in KINDS)
        assert error.startswith(f"{kind}: ") or status == "ok"
    assert "dangling symlink" in out["error"][names.index("dangling.png")]
    assert "not found" in out["error"][names.index("missing.png")]
    assert (out["height"][names.index("ok.png")], out["width"][names.index("ok.png")]) == (32, 32)


def test_bad_ground_truth_is_a_mask_mismatch(tmp_path: Path):
    img = _png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "a.png").write_bytes(img)
    (tmp_path / "m_small.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    (tmp_path / "m_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "m_ok.png").write_bytes(_png(np.ones((8, 8), np.uint8)))
    masks = [str(tmp_path / m) for m in ("m_small.png", "m_broken.png", "m_missing.png", "m_ok.png")]
    out = read_decode(_batch([str(tmp_path / "a.png")] * 4, masks))
    assert list(out["error_kind"]) == ["mask_mismatch"] * 3 + [""]
    assert "(4, 4)" in out["error"][0] and "ground-truth mask" in out["error"][1]
    assert out["has_gt"] == [False, False, False, True]


def test_out_of_range_warns_or_refuses(tmp_path: Path):
    (tmp_path / "a16.tif").write_bytes(_tiff16())
    (tmp_path / "a8.png").write_bytes(_png(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    paths = [str(tmp_path / "a16.tif"), str(tmp_path / "a8.png")]
    warned = read_decode(_batch(paths), full_scale=EIGHT_BIT)
    assert list(warned["status"]) == ["ok", "ok"] and warned["warnings"][1] == ""
    assert warned["warnings"][0].startswith("out_of_range: pixel values up to ") and "~255" in warned["warnings"][0]
    refused = read_decode(_batch(paths), full_scale=EIGHT_BIT, out_of_range="refuse")
    assert list(refused["error_kind"]) == ["out_of_range", ""]
    assert refused["error"][0].startswith("out_of_range: pixel values up to ")
    assert read_decode(_batch(paths))["warnings"][0] == ""  # no checkpoint statistics: not judged


def test_decode_ms_is_per_row(tmp_path: Path):
    (tmp_path / "big.png").write_bytes(_png(RNG.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)))
    (tmp_path / "tiny.png").write_bytes(_png(np.zeros((2, 2), np.uint8)))
    out = read_decode(_batch([str(tmp_path / "big.png"), str(tmp_path / "tiny.png")]))
    big, tiny = out["decode_ms"]
    assert big > tiny > 0 and big > 2 * tiny  # a batch average would make them equal


def test_instance_reads_keep_odd_names_and_kinds(tmp_path: Path):
    with open(os.path.join(os.fsencode(tmp_path), ODD), "wb") as f:
        f.write(_png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (tmp_path / "empty.png").write_bytes(b"")
    samples = list_samples(SourceConfig(images=str(tmp_path)))
    items, _, _ = instance_items(samples, None, ["background", "object"])
    batch = {k: [it[k] for it in items] for k in items[0]}
    out = read_decode_instances(batch)
    by_id = {str(i): k for i, k in zip(out["image_id"], out["error_kind"])}
    assert by_id == {"empty": "empty", "scene_\\xff\\xfe": ""}
    assert os.path.join(os.fsencode(tmp_path), ODD) in list(out["source_path_bytes"])


# --------------------------------------------------------------------------- summaries


def test_error_reasons_count_kinds_most_frequent_first():
    kinds = ["truncated", "empty", "truncated", None, "", "unreadable", "truncated", "empty"]
    assert error_reasons(kinds) == [{"kind": "truncated", "count": 3}, {"kind": "empty", "count": 2},
                                    {"kind": "unreadable", "count": 1}]
    # Messages count the same kinds (they begin with it), paths and all.
    messages = ["truncated: /d/a.png: corrupt or truncated PNG: x", "unreadable: s3://b/k.png: not found",
                "truncated: /d/b.tif: corrupt or truncated TIFF: y"]
    assert error_reasons(messages) == [{"kind": "truncated", "count": 2}, {"kind": "unreadable", "count": 1}]
    assert error_reasons([]) == [] and len(error_reasons([f"k{i}" for i in range(30)], most=5)) == 5
