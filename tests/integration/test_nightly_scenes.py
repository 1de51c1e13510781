"""Nightly runs over scenes (``workload: scenes``) on a real local Ray: each night segments only the
new or changed GeoTIFF/COG scenes of the archive with segment-scenes into its partition
(run_date=.../scenes/: COG masks, polygons), and commits one scene row per input."""

from __future__ import annotations

import pytest

from segray.config import NightlyJobConfig, build_config
from segray.infer.nightly import committed_runs, read_committed, run_nightly
from segray.io.commit import read_manifest
from segray.io.raster import is_cog, open_info
from segray.testing.raster import make_test_cog

from scenes_util import make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

MEAN, STD = [1200.0, 1500.0, 1800.0, 2100.0], [900.0, 900.0, 900.0, 900.0]


def _config(archive, ckpt, out, night: str, **kw) -> NightlyJobConfig:
    return build_config(NightlyJobConfig, {
        "source": {"images": str(archive)}, "checkpoint": str(ckpt), "output": str(out), "run_date": night,
        "workload": "scenes", "scenes": {"tile_size": 128, "overlap": 32, "margin": 8, "block_size": 128,
                                         "batch_size": 4, "num_actors": 1}, **kw})


def test_nights_of_scenes_segment_only_new_scenes_and_commit_one_row_each(tmp_path, ray_local):
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a", "b"):
        make_test_cog(str(archive / f"{name}.tif"), 200, 260, 4, "uint16", blocksize=128)
    ckpt = tmp_path / "ckpt.pt"
    make_checkpoint(str(ckpt), 4, 3, MEAN, STD, depth=2, class_names=["x", "y", "z"])
    out = tmp_path / "nightly"

    first = run_nightly(_config(archive, ckpt, out, "2026-03-01"))
    assert (first["status"], first["processed"], first["num_ok"]) == ("committed", 2, 2)
    make_test_cog(str(archive / "c.tif"), 150, 180, 4, "uint16", blocksize=128)
    (archive / "notes.tif").write_bytes(b"not a tiff")  # a bad scene is a row, not a failed night
    second = run_nightly(_config(archive, ckpt, out, "2026-03-02"))
    assert (second["processed"], second["done_before"], second["num_ok"], second["num_error"]) == (2, 2, 1, 1)
    assert run_nightly(_config(archive, ckpt, out, "2026-03-02"))["status"] == "already committed"

    assert [c.run_date for c in committed_runs(str(out))] == ["2026-03-01", "2026-03-02"]
    rows = read_committed(str(out), columns=["source_path", "scene_id", "status", "mask_path", "height"])
    by_id = {r["scene_id"]: r for r in rows.to_pylist()}
    assert sorted(by_id) == ["a", "b", "c", "notes"] and by_id["notes"]["status"] == "error"
    for sid in ("a", "b", "c"):
        mask = by_id[sid]["mask_path"]
        assert "run_date=" in mask and "/scenes/masks/" in mask and is_cog(mask)
        assert open_info(mask).height == by_id[sid]["height"]
    night2 = out / "run_date=2026-03-02" / "scenes"
    assert read_manifest(str(night2))["job"] == "segment-scenes"
    assert sorted(p.name for p in (night2 / "masks").iterdir()) == ["c.tif"]

    with pytest.raises(Exception, match="workload"):
        run_nightly(_config(archive, ckpt, out, "2026-03-03", workload="images"))
