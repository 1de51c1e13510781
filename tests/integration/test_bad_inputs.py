"""Every bad input is a row that tells what happened: ``segray infer`` (the CLI, in its own process,
on a real local Ray) over a local folder of real files in real formats, good and bad.

The folder holds a name that is not valid UTF-8, a palette PNG, a CMYK JPEG, a 16-bit RGB TIFF
(into a checkpoint of 8-bit data), a 4-band PNG (a 3-band model), a dangling symlink, empty,
truncated and text files, and good images. The job exits 0 with one row per input; each row's
status, kind and warnings are as the README says, and the summary's counts add up.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from rasterio.io import MemoryFile

from scenes_util import make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SEGRAY = str(REPO / ".venv" / "bin" / "segray")
ODD = b"scene_\xff\xfe.png"  # a file name that is not valid UTF-8
RNG = np.random.default_rng(7)
SIZE = 32


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb() -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _tiff16() -> bytes:
    arr = RNG.integers(0, 65536, (3, SIZE, SIZE)).astype(np.uint16)
    arr[0, 0, 0] = 65535
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint16", photometric="RGB",
                      crs="EPSG:32616", transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 3700000)) as ds:
            ds.write(arr)
        return mem.read()


# name -> (bytes, expected status, kind)
def _files() -> dict[str, tuple[bytes, str, str | None]]:
    palette = Image.fromarray(RNG.integers(0, 8, (SIZE, SIZE), dtype=np.uint8), "L").convert("P")
    palette.putpalette([v for c in range(256) for v in (c * 30 % 256, 255 - c * 20 % 256, c * 9 % 256)])
    cmyk = Image.fromarray(RNG.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8), "CMYK")
    good = _save(_rgb(), "PNG")
    return {
        "good_a.png": (good, "ok", None),
        "good_b.png": (_save(_rgb(), "PNG"), "ok", None),
        "palette.png": (_save(palette, "PNG"), "ok", None),
        "cmyk.jpg": (_save(cmyk, "JPEG"), "ok", None),
        "rgb16.tif": (_tiff16(), "ok", None),  # predicted, with an out_of_range warning
        "rgba.png": (_save(Image.fromarray(RNG.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)), "PNG"),
                     "error", "band_mismatch"),
        "empty.png": (b"", "error", "empty"),
        "truncated.png": (good[: len(good) // 2], "error", "truncated"),
        "notes.png": (b"this is not an image\n", "error", "not_an_image"),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    images = root / "images"
    images.mkdir()
    files = _files()
    for name, (data, _, _) in files.items():
        (images / name).write_bytes(data)
    odd_path = os.path.join(os.fsencode(images), ODD)
    with open(odd_path, "wb") as f:
        f.write(_save(_rgb(), "PNG"))
    os.symlink(images / "gone.png", images / "dangling.png")
    checkpoint = root / "ckpt.pt"
    # A checkpoint of 8-bit data (its band statistics): a 16-bit image is beyond it.
    make_checkpoint(str(checkpoint), 3, 3, [120.0] * 3, [60.0] * 3, depth=2)
    config = root / "infer.yaml"
    config.write_text(f"source:\n  images: {images}\n  extensions: [.png, .jpg, .tif]\ncheckpoint: {checkpoint}\n"
                      "batch_size: 4\nnum_actors: 1\ncpus_per_actor: 0.5\ncpus_per_task: 0.5\n")
    return {"root": root, "images": images, "files": files, "odd_path": odd_path, "config": config}


def _infer(folder: dict, output: Path, *sets: str) -> tuple[dict, dict]:
    """Runs ``segray infer``; returns ({image_id: row}, summary)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [SEGRAY, "infer", str(folder["config"]), "--set", f"output={output}", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = sorted((output / "predictions").glob("*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    summary = pq.read_table(output / "summary.parquet").to_pylist()[0]
    return {r["image_id"]: r for r in rows}, summary


def _check_counts(rows: dict, summary: dict, num_inputs: int) -> None:
    assert len(rows) == num_inputs == summary["num_inputs"]
    assert summary["num_ok"] + summary["num_error"] == summary["num_inputs"]
    kinds = [r["error_kind"] for r in rows.values() if r["status"] == "error"]
    reasons = summary["error_reasons"]
    assert sum(r["count"] for r in reasons) == summary["num_error"] == len(kinds)
    assert {r["kind"]: r["count"] for r in reasons} == {k: kinds.count(k) for k in set(kinds)}
    assert [r["count"] for r in reasons] == sorted((r["count"] for r in reasons), reverse=True)


def test_every_input_is_a_row_that_tells_what_happened(folder):
    rows, summary = _infer(folder, folder["root"] / "out")
    files = folder["files"]
    _check_counts(rows, summary, len(files) + 2)
    for name, (_, status, kind) in files.items():
        row = rows[Path(name).stem]
        assert (row["status"], row["error_kind"]) == (status, kind), (name, row["error"])
        assert (row["error"] is None) == (status == "ok")
        if kind:
            assert row["error"].startswith(f"{kind}: ")
        assert row["source_path_bytes"] is None and row["source_path"] == str(folder["images"] / name)
        assert row["decode_ms"] > 0
    for name in ("good_a", "palette", "cmyk"):
        assert rows[name]["bands"] == 3 and rows[name]["mask_png"] and rows[name]["warnings"] == []
    assert rows["rgb16"]["warnings"] == ["out_of_range: pixel values up to 65535, the checkpoint's data reached ~255"]

    dangling = rows["dangling"]
    assert (dangling["status"], dangling["error_kind"]) == ("error", "unreadable")
    assert "dangling symlink" in dangling["error"] and "gone.png" in dangling["error"]

    odd = rows[ODD[:-4].decode("utf-8", "backslashreplace")]  # the id is the readable form too
    assert odd["status"] == "ok" and (odd["height"], odd["width"], odd["bands"]) == (SIZE, SIZE, 3)
    assert odd["source_path_bytes"] == folder["odd_path"]  # the exact bytes: lossless
    assert odd["source_path"] == folder["odd_path"].decode("utf-8", "backslashreplace")
    assert os.path.exists(os.fsdecode(odd["source_path_bytes"]))


def test_refuse_makes_out_of_range_images_error_rows(folder):
    rows, summary = _infer(folder, folder["root"] / "out_refuse", "out_of_range=refuse")
    _check_counts(rows, summary, len(folder["files"]) + 2)
    row = rows["rgb16"]
    assert (row["status"], row["error_kind"], row["warnings"]) == ("error", "out_of_range", [])
    assert row["error"].startswith("out_of_range: pixel values up to 65535")
    assert {"kind": "out_of_range", "count": 1} in summary["error_reasons"]
