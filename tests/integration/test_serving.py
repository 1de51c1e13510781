"""Serving end to end on a real local Ray and real images: `segray infer` with ONNX Runtime gives
the eager class maps; test-time augmentation on a trained U-Net changes only unsure pixels; TTA
on scene tiles through segment-scenes; `segray export` of a checkpoint on S3."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from segray.cli import app
from segray.config import InferJobConfig, ModelConfig, SceneInferJobConfig, SourceConfig, StorageOptions, build_config
from segray.core.checkpoint import Checkpoint
from segray.core.export import onnx_metadata
from segray.core.masks import decode_png
from segray.core.models import build_model
from segray.infer.pipeline import run_inference
from segray.infer.scenes import run_scenes
from segray.infer.steps import Predictor
from segray.io.fs import read_bytes, write_bytes
from segray.io.images import decode_image
from segray.testing.raster import make_test_cog, scene_pattern
from scenes_util import make_checkpoint, read_all

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LOVEDA = ["nodata", "background", "building", "road", "water", "barren", "forest", "agriculture"]


def _images(shared: Path) -> list[Path]:
    root = shared / "loveda_potsdam_vaihingen_mmseg"
    return sorted((root / "loveda" / "img_dir").glob("*.png")) + sorted((root / "potsdam" / "img_dir").glob("*.png"))


@contextlib.contextmanager
def _torch_threads(n: int):
    """This process's torch on ``n`` threads: on a busy 2-core machine (the Ray workers of the same
    test) small convolutions on 2 threads run several times slower than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_unet(shared: Path, path: Path, steps: int = 100, crop: int = 64) -> None:
    """A depth-2 U-Net trained in-process (plain torch, ~10 s) on random 64 px crops of the three
    LoveDA tiles: confident on most pixels, unsure on some, as a real model is."""
    from PIL import Image

    root = shared / "loveda_potsdam_vaihingen_mmseg" / "loveda"
    imgs = [decode_image(p.read_bytes(), str(p)) for p in sorted((root / "img_dir").glob("*.png"))]
    labels = [np.array(Image.open(p)).astype(np.int64) for p in sorted((root / "ann_dir").glob("*.png"))]
    pix = np.stack(imgs)
    stats = {"mean": pix.mean(axis=(0, 2, 3)).tolist(), "std": pix.std(axis=(0, 2, 3)).tolist()}
    mean, std = torch.tensor(stats["mean"]).view(1, -1, 1, 1), torch.tensor(stats["std"]).view(1, -1, 1, 1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(name="unet", in_channels=3, num_classes=len(LOVEDA), depth=2, base_width=8)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):  # ~0.1 s a step on one thread
        xs, ys = [], []
        for _ in range(8):
            k, r, c = rng.integers(len(imgs)), *rng.integers(0, 1024 - crop, size=2)
            xs.append(imgs[k][:, r : r + crop, c : c + crop])
            ys.append(labels[k][r : r + crop, c : c + crop])
        x = (torch.from_numpy(np.stack(xs)) - mean) / std
        loss = F.cross_entropy(model(x), torch.from_numpy(np.stack(ys)), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    Checkpoint.of(model.eval(), cfg.model_dump(mode="json"), LOVEDA, stats, ignore_index=0).save(str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data) -> Path:
    path = tmp_path_factory.mktemp("serving") / "checkpoint.pt"
    with _torch_threads(1):
        _train_unet(shared_data, path)
    return path


def _masks(output: Path) -> dict[str, np.ndarray]:
    table = pads.dataset(str(output / "predictions"), format="parquet").to_table(
        columns=["image_id", "status", "mask_png"]).to_pylist()
    assert {r["status"] for r in table} == {"ok"}
    return {r["image_id"]: decode_png(r["mask_png"]) for r in table}


def _run(folder: Path, ckpt: str, out: Path, storage: StorageOptions | None = None, **fields) -> dict[str, np.ndarray]:
    """``segray infer`` (run_inference) over ``folder``; the class maps by image id."""
    cfg = InferJobConfig(source=SourceConfig(images=str(folder)), checkpoint=ckpt, output=str(out), batch_size=2,
                         num_actors=1, cpus_per_actor=1.0, storage=storage or StorageOptions(), **fields)
    summary = run_inference(cfg)
    assert summary["num_ok"] == summary["num_inputs"] > 0, summary
    return _masks(out)


def test_onnxruntime_infer_gives_the_eager_class_maps(trained, shared_data, tmp_path, ray_up):
    """predictor: onnxruntime (the actor exports the checkpoint at start) vs eager, on real LoveDA tiles."""
    folder = shared_data / "loveda_potsdam_vaihingen_mmseg" / "loveda" / "img_dir"
    eager = _run(folder, str(trained), tmp_path / "eager")
    ort = _run(folder, str(trained), tmp_path / "ort", predictor="onnxruntime")
    assert eager.keys() == ort.keys() and len(eager) == 3
    for k in eager:
        assert eager[k].shape == (1024, 1024) and np.array_equal(eager[k], ort[k]), k
    assert len(np.unique(np.concatenate([m.ravel() for m in eager.values()]))) >= 2  # a model, not a constant


def test_tta_changes_only_unsure_pixels(trained, shared_data, tmp_path, ray_up):
    """TTA (hflip, vflip, rot90) on a trained U-Net: some pixels change, and those are the ones the
    model was unsure of (their non-TTA confidence is far below the unchanged pixels'); the
    pipeline's TTA masks are the in-process Predictor's."""
    plain, tta = Predictor(str(trained), device="cpu"), Predictor(str(trained), device="cpu", tta=["hflip", "vflip", "rot90"])
    changed_conf, kept_conf = [], []
    for path in _images(shared_data):
        x = torch.from_numpy(decode_image(path.read_bytes(), str(path)))[None]
        with torch.inference_mode(), _torch_threads(1):
            probs = torch.softmax(plain.logits(x), dim=1)[0]
            conf, pred = probs.max(dim=0)
            pred_tta = tta.logits(x)[0].argmax(dim=0)
        diff = pred != pred_tta
        changed_conf.append(conf[diff].numpy())
        kept_conf.append(conf[~diff].numpy())
    changed, kept = np.concatenate(changed_conf), np.concatenate(kept_conf)
    frac = changed.size / (changed.size + kept.size)
    print(f"TTA changed {changed.size} of {changed.size + kept.size} pixels ({frac:.2%}); non-TTA confidence "
          f"changed: mean {changed.mean():.3f} median {np.median(changed):.3f}; unchanged: mean {kept.mean():.3f} "
          f"median {np.median(kept):.3f}")
    assert 0 < frac < 0.2
    assert changed.mean() < kept.mean() - 0.15 and np.median(changed) < np.median(kept) - 0.15
    folder = shared_data / "loveda_potsdam_vaihingen_mmseg" / "potsdam" / "img_dir"
    masks = _run(folder, str(trained), tmp_path / "tta", tta=["hflip", "vflip", "rot90"])
    for path in sorted(folder.glob("*.png")):
        expected = tta.predict([decode_image(path.read_bytes(), str(path))])[0][0]
        assert np.array_equal(masks[path.stem], expected)


def test_tta_on_scene_tiles(tmp_path, ray_up):
    """segment-scenes with tta: a valid, georeferenced mask of every class id, close to the plain run."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    make_test_cog(str(scenes / "s.tif"), 300, 420, 4, "uint16", blocksize=128)
    mean, std = [1200.0, 1500.0, 1800.0, 2100.0], [900.0] * 4
    make_checkpoint(str(tmp_path / "c.pt"), 4, 3, mean, std, depth=2,
                    calibrate_on=scene_pattern((0, 0, 300, 420), 4).astype(np.float32), class_names=["a", "b", "c"])
    grid = ["tile_size=128", "overlap=64", "margin=24", "block_size=128", "batch_size=4", "polygons=false"]
    out = {}
    for name, tta in (("plain", []), ("tta", ["hflip", "vflip", "rot90"])):
        cfg = build_config(SceneInferJobConfig, {"source": {"images": str(scenes)}, "checkpoint": str(tmp_path / "c.pt"),
                                                 "output": str(tmp_path / name), "tta": tta}, grid)
        summary = run_scenes(cfg)
        assert summary["num_ok"] == 1, summary
        out[name], _ = read_all(str(tmp_path / name / "masks" / "s.tif"))
    assert out["tta"].shape == (1, 300, 420) and set(np.unique(out["tta"])) <= {0, 1, 2}
    agree = (out["tta"] == out["plain"]).mean()
    assert 0.8 < agree <= 1.0, agree


def test_export_checkpoint_on_s3_and_serve_it(trained, shared_data, s3, s3_bucket, tmp_path, ray_up, monkeypatch):
    """`segray export s3://.../checkpoint.pt --output s3://.../model.onnx`, then `onnx_model:` in a run."""
    storage = s3.storage_options()
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    ckpt_url, onnx_url = f"s3://{s3_bucket}/run/checkpoint.pt", f"s3://{s3_bucket}/serving/model.onnx"
    write_bytes(ckpt_url, trained.read_bytes(), storage)
    result = CliRunner().invoke(app, ["export", ckpt_url, "--format", "onnx", "--output", onnx_url,
                                      "--endpoint-url", s3.endpoint_url])
    assert result.exit_code == 0, result.output
    meta = onnx_metadata(read_bytes(onnx_url, storage))
    assert json.loads(meta["class_names"]) == LOVEDA and meta["checkpoint_id"] == Checkpoint.load(str(trained)).id
    bad = CliRunner().invoke(app, ["export", f"s3://{s3_bucket}/nope.pt", "--output", onnx_url,
                                   "--endpoint-url", s3.endpoint_url])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    folder = shared_data / "loveda_potsdam_vaihingen_mmseg" / "potsdam" / "img_dir"
    eager = _run(folder, ckpt_url, tmp_path / "e", storage)
    served = _run(folder, ckpt_url, tmp_path / "o", storage, predictor="onnxruntime", onnx_model=onnx_url)
    assert all(np.array_equal(eager[k], served[k]) for k in eager)
