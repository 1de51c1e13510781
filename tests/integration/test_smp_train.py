"""``model.name: smp`` on a real local Ray: every architecture takes a DDP step on 2 workers (3 and
13 bands, one Ray Train run), and a full ``run_training`` on real LoveDA tiles with encoder
weights from S3 (SeaweedFS) and a frozen encoder, then ``segray infer`` on arbitrary sizes."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
import timm
import torch
from PIL import Image

from segray.config import InferJobConfig, build_config
from segray.config.models import SMP_ARCHS
from segray.config.train import TrainJobConfig
from segray.core.checkpoint import FILENAME
from segray.core.masks import decode_png
from segray.infer.pipeline import run_inference
from segray.io.fs import get_fs
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray]

LOVEDA_CLASSES = ["nodata", "background", "building", "road", "water", "barren", "forest", "agriculture"]


def _every_arch_one_step(config: dict) -> None:
    """Per worker: each (arch, bands) builds with segray's registry, takes one DDP step with a real
    loss and AdamW; the loss is finite and both ranks end with the same, moved, parameters."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from segray.config import LossConfig, ModelConfig
    from segray.core.losses import build_loss
    from segray.core.models import build_model

    rank = ray.train.get_context().get_world_rank()
    loss_fn = build_loss(LossConfig(), 3, None)
    for arch in config["archs"]:
        for bands in (3, 13):
            torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
            cfg = ModelConfig(name="smp", arch=arch, encoder="mit_b0" if arch == "Segformer" else "resnet18",
                              in_channels=bands, num_classes=3)
            model = ray.train.torch.prepare_model(build_model(cfg))
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(rank)  # each rank its own batch
            x, y = torch.randn(2, bands, 64, 48, generator=g), torch.randint(0, 3, (2, 64, 48), generator=g)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, after)
            assert torch.isfinite(loss), (arch, bands)
            assert all(torch.equal(gathered[0], t) for t in gathered), f"{arch}/{bands}: ranks differ"
            assert not torch.equal(before, after), f"{arch}/{bands}: no parameter moved"
    # Ray Train keeps reported metrics only with a checkpoint: each rank leaves a note instead.
    with open(os.path.join(config["notes"], f"rank{rank}.txt"), "w") as f:
        f.write(str(len(config["archs"]) * 2))


@pytest.mark.timeout(300)
def test_every_arch_takes_one_ddp_step_on_two_workers(ray_up, tmp_path):
    from ray import cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    trainer = TorchTrainer(
        _every_arch_one_step, train_loop_config={"archs": list(SMP_ARCHS), "notes": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name="archs", failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit()
    assert result.error is None
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [str(2 * len(SMP_ARCHS))] * 2


def _odd_size_png(path) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 75, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.s3
@pytest.mark.timeout(420)
def test_loveda_trains_with_s3_encoder_weights_frozen_then_infers_any_size(tmp_path, shared_data, s3, s3_bucket,
                                                                           ray_up):
    # A timm ResNet-18 encoder state dict (3 bands, fc.* included), on S3.
    torch.manual_seed(1)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    buf = io.BytesIO()
    torch.save(weights, buf)
    fs, _ = get_fs(f"s3://{s3_bucket}", s3.storage_options())
    fs.pipe(f"{s3_bucket}/weights/resnet18.pth", buf.getvalue())

    loveda = shared_data / "loveda_potsdam_vaihingen_mmseg" / "loveda"
    job = build_config(TrainJobConfig, {
        "data": {"source": {"images": str(loveda / "img_dir"), "masks": str(loveda / "ann_dir")},
                 "class_names": LOVEDA_CLASSES, "ignore_index": 0, "image_size": 64, "val_fraction": 0.34,
                 "storage": s3.storage_options().model_dump()},
        "model": {"name": "smp", "arch": "Unet", "encoder": "resnet18", "num_classes": 8,
                  "encoder_weights": f"s3://{s3_bucket}/weights/resnet18.pth"},
        "finetune": {"freeze_encoder_epochs": 1, "encoder_batch_norm": "frozen"},
        "train": {"epochs": 1, "batch_size": 1, "num_workers": 2, "patience": None,
                  "storage_path": str(tmp_path / "runs"), "name": "smp"},
    })
    result = run_training(job)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert 0 <= result.history[0]["val_miou"] <= 1

    # The encoder was frozen for the whole (one-epoch) run, BatchNorm statistics included: the
    # checkpoint's encoder is the S3 file's, and the decoder trained.
    payload = torch.load(os.path.join(result.best_checkpoint, FILENAME), weights_only=True)
    state = {k.removeprefix("module."): v for k, v in payload["model_state"].items()}
    encoder = {k.removeprefix("net.encoder."): v for k, v in state.items() if k.startswith("net.encoder.")}
    assert encoder and all(torch.equal(v, weights[k]) for k, v in encoder.items() if "num_batches" not in k)
    assert payload["model_config"]["encoder_weights"].startswith("s3://")  # recorded, never re-read by inference

    # segray infer through the real pipeline: 1024 px LoveDA with ground truth, 512 px Potsdam and
    # an odd 100 x 75 image (not a multiple of the stride, 32).
    potsdam = shared_data / "loveda_potsdam_vaihingen_mmseg" / "potsdam" / "img_dir"
    first = sorted((loveda / "img_dir").iterdir())[0]
    rows = [f"{first},{loveda / 'ann_dir' / first.name}", *map(str, sorted(potsdam.iterdir())),
            _odd_size_png(tmp_path / "odd.png")]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mask\n" + "\n".join(rows) + "\n")
    cfg = InferJobConfig.model_validate({"source": {"manifest": str(manifest)}, "checkpoint": result.run_path,
                                         "output": str(tmp_path / "out"), "batch_size": 1})
    summary = run_inference(cfg)
    assert summary["num_inputs"] == summary["num_ok"] == 3 and summary["num_with_ground_truth"] == 1
    table = pads.dataset(str(tmp_path / "out" / "predictions"), format="parquet").to_table().to_pylist()
    assert sorted((r["height"], r["width"]) for r in table) == [(100, 75), (512, 512), (1024, 1024)]
    for r in table:
        assert r["model_name"] == "smp" and r["status"] == "ok"
        mask = decode_png(r["mask_png"])
        assert mask.shape == (r["height"], r["width"]) and mask.max() < 8
