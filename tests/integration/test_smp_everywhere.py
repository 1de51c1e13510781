"""An smp checkpoint runs wherever a U-Net does: segment-scenes with tiles aligned to the
encoder's own output stride (read from the registry), and nightly runs over a growing folder."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segray.config import ModelConfig, NightlyJobConfig, SceneInferJobConfig, build_config
from segray.core.checkpoint import make_payload, save_payload
from segray.core.models import build_model, tile_align
from segray.infer.nightly import read_committed, run_nightly
from segray.infer.scenes import run_scenes
from segray.testing.raster import make_test_cog
from scenes_util import read_all

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _smp_checkpoint(path, arch: str, bands: int, classes: int) -> ModelConfig:
    torch.manual_seed(0)
    cfg = ModelConfig(name="smp", arch=arch, encoder="resnet18", in_channels=bands, num_classes=classes)
    stats = {"mean": [1000.0] * bands, "std": [500.0] * bands}
    save_payload(make_payload(build_model(cfg), cfg.model_dump(mode="json"), [f"c{i}" for i in range(classes)],
                              stats), str(path))
    return cfg


def test_segment_scenes_aligns_tiles_to_the_encoders_stride(tmp_path, ray_up):
    cfg = _smp_checkpoint(tmp_path / "c.pt", "DeepLabV3Plus", 4, 3)
    assert tile_align(cfg) == 16, "DeepLabV3Plus on ResNet: output stride 16"
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    make_test_cog(str(scenes / "s.tif"), 300, 420, 4, "uint16", blocksize=128)
    job = build_config(SceneInferJobConfig, {"source": {"images": str(scenes)}, "checkpoint": str(tmp_path / "c.pt"),
                                             "output": str(tmp_path / "out")},
                       ["tile_size=128", "overlap=64", "margin=24", "block_size=128", "batch_size=4",
                        "polygons=false", "per_tile_rows=true"])
    summary = run_scenes(job)
    assert summary["num_ok"] == 1, summary
    mask, meta = read_all(str(tmp_path / "out" / "masks" / "s.tif"))
    assert mask.shape == (1, 300, 420) and set(np.unique(mask)) <= {0, 1, 2}
    tiles = pq.read_table(tmp_path / "out" / "tiles.parquet").to_pydict()
    offsets = tiles["row_off"] + tiles["col_off"]
    assert all(o % 16 == 0 for o in offsets), "every tile offset on the encoder's stride grid"
    # The last column of tiles: 420 px -> a virtual width of 128 + ceil(292 / 16) * 16 = 432, offset 304
    # (on a 32 grid it would be 320): the stride came from this encoder, not from a default.
    assert max(tiles["col_off"]) == 304, sorted(set(tiles["col_off"]))


def _png(path, seed: int, h: int = 70, w: int = 90) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_nightly_with_an_smp_checkpoint(tmp_path, ray_up):
    _smp_checkpoint(tmp_path / "c.pt", "Unet", 3, 2)
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(3):
        _png(archive / f"a{i}.png", i)

    def night(day: str) -> NightlyJobConfig:
        return build_config(NightlyJobConfig, {"source": {"images": str(archive)}, "checkpoint": str(tmp_path / "c.pt"),
                                               "output": str(tmp_path / "nightly"), "run_date": day,
                                               "infer": {"batch_size": 2, "num_actors": 1}})

    first = run_nightly(night("2026-12-01"))
    assert (first["processed"], first["num_ok"]) == (3, 3), first
    _png(archive / "a3.png", 3, h=65, w=77)  # a new image, of an odd size
    second = run_nightly(night("2026-12-02"))
    assert (second["processed"], second["num_ok"], second["done_before"]) == (1, 1, 3), second
    rows = read_committed(str(tmp_path / "nightly"), columns=["image_id", "status", "height", "width"]).to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["a0", "a1", "a2", "a3"]
    assert all(r["status"] == "ok" for r in rows)
    assert {(r["height"], r["width"]) for r in rows if r["image_id"] == "a3"} == {(65, 77)}
