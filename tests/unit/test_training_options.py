"""Crops, scale jitter, non-square resizes, median-frequency weights, the poly schedule and the
config fields of training (pure core, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segray.config import ConfigError, LossConfig, OptimConfig, TrainJobConfig, build_config
from segray.core.losses import build_loss, median_frequency_weights, resolve_class_weights
from segray.core.optim import lr_factor
from segray.core.transforms import center_crop, pad_to, random_crop, random_scale, resize_pair


def _coordinate_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Image bands hold each pixel's row and column; the mask is a function of both."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx]).astype(np.float32)
    mask = ((yy * 7 + xx * 3) % 11).astype(np.int64)
    return image, mask


def _mask_of(image: np.ndarray) -> np.ndarray:
    return ((image[0].astype(np.int64) * 7 + image[1].astype(np.int64) * 3) % 11)


@pytest.mark.parametrize("size", [(32, 48), (50, 20), 40])
def test_random_crop_keeps_image_and_mask_aligned(size):
    image, mask = _coordinate_pair(60, 70)
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(20):
        img, msk = random_crop(image, mask, size, rng)
        hw = (size, size) if isinstance(size, int) else size
        assert img.shape == (2, *hw) and msk.shape == hw
        np.testing.assert_array_equal(msk, _mask_of(img))  # every pixel still has its own label
        # a window: contiguous rows and columns of the source
        assert (np.diff(img[0][:, 0]) == 1).all() and (np.diff(img[1][0]) == 1).all()
        offsets.add((int(img[0, 0, 0]), int(img[1, 0, 0])))
    assert len(offsets) > 10  # offsets are drawn, not fixed


def test_crop_larger_than_image_pads_with_ignore_or_mirrors():
    image, mask = _coordinate_pair(10, 12)
    img, msk = random_crop(image, mask, (16, 16), np.random.default_rng(1), ignore_index=255)
    assert img.shape == (2, 16, 16)
    np.testing.assert_array_equal(msk[:10, :12], mask)  # padding goes bottom/right, so the offset is 0
    assert (msk[10:] == 255).all() and (msk[:, 12:] == 255).all()
    np.testing.assert_allclose(img[:, 10:, 0], image.reshape(2, -1).mean(1)[:, None].repeat(6, 1))
    img, msk = pad_to(image, mask, (25, 30), None)  # no ignore_index: both mirrored, still aligned
    assert msk.shape == (25, 30)
    np.testing.assert_array_equal(msk, _mask_of(img))


def test_center_crop_is_centred():
    image, mask = _coordinate_pair(40, 50)
    img, msk = center_crop(image, mask, (20, 10))
    assert (int(img[0, 0, 0]), int(img[1, 0, 0])) == (10, 20)
    np.testing.assert_array_equal(msk, _mask_of(img))


def test_random_scale_and_non_square_resize_keep_alignment():
    image, mask = _coordinate_pair(40, 60)
    img, msk = resize_pair(image, mask, (20, 90))
    assert img.shape == (2, 20, 90) and msk.shape == (20, 90) and msk.dtype == mask.dtype
    assert set(np.unique(msk)) <= set(np.unique(mask))  # nearest: no invented labels
    rng = np.random.default_rng(3)
    sizes = set()
    for _ in range(10):
        img, msk = random_scale(image, mask, (0.5, 2.0), rng)
        assert img.shape[1:] == msk.shape
        sizes.add(msk.shape)
        f = msk.shape[0] / 40
        assert 0.5 <= f <= 2.0 and abs(msk.shape[1] / 60 - f) < 0.05  # aspect ratio kept
    assert len(sizes) > 5


def test_median_frequency_weights_by_hand():
    # 3 images of 100 pixels: class 0 everywhere, class 1 in two images, class 2 in one, class 3 never.
    masks = [np.r_[np.zeros(70), np.ones(30)], np.r_[np.zeros(90), np.ones(10)], np.r_[np.zeros(50), np.full(50, 2)]]
    pixels = np.array([70 + 90 + 50, 30 + 10, 50, 0])
    image_pixels = np.array([300, 200, 100, 0])
    assert [int(sum((m == c).sum() for m in masks)) for c in range(4)] == pixels.tolist()
    freq = [210 / 300, 40 / 200, 50 / 100]
    median = sorted(freq)[1]
    expected = [median / f for f in freq] + [0.0]
    assert median_frequency_weights(pixels, image_pixels) == pytest.approx(expected)
    # binary: one logit, the weight goes to bce's pos_weight (foreground over background)
    w = resolve_class_weights(LossConfig(class_weights="auto"), 1, pixels[:2], image_pixels[:2])
    f0, f1 = 210 / 300, 40 / 200
    m = (f0 + f1) / 2
    assert w == pytest.approx([(m / f1) / (m / f0)])
    with pytest.raises(ValueError, match="resolve"):
        build_loss(LossConfig(class_weights="auto"), 4, None)


def test_poly_schedule_per_step():
    cfg = OptimConfig(schedule="poly", poly_power=0.9)
    assert lr_factor(cfg, 10, 0, 0, 100) == 1.0
    assert lr_factor(cfg, 10, 5, 50, 100) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(cfg, 10, 9, 100, 100) == 0.0
    assert lr_factor(OptimConfig(schedule="poly", warmup_steps=10), 10, 0, 5, 100) < lr_factor(cfg, 10, 0, 5, 100)
    with pytest.raises(ValueError, match="total"):
        lr_factor(cfg, 10, 0, 0, None)


def _job(**data) -> dict:
    return {"data": {"source": {"images": "a", "masks": "b"}, **data}}


def test_training_config_fields():
    job = build_config(TrainJobConfig, _job(crop_size=64, image_size=[96, 128], scale_jitter=[0.5, 2]))
    assert job.data.crop_size == (64, 64) and job.data.image_size == (96, 128)
    assert job.data.scale_jitter == (0.5, 2.0) and job.data.shuffle == "global"
    job = build_config(TrainJobConfig, _job(val_source={"images": "c", "masks": "d"}),
                       ["loss.class_weights=auto", "optim.schedule=poly", "train.accumulate_grad_batches=4"])
    assert job.data.has_val and job.loss.class_weights == "auto" and job.optim.schedule == "poly"
    # what a worker receives (model_dump) validates again
    assert TrainJobConfig.model_validate(job.model_dump(mode="json")) == job
    cases = {
        "data.scale_jitter": (_job(scale_jitter=[0.5, 2]), "crop_size"),
        "data.val_crop": (_job(val_crop="center"), "crop_size"),
        "data.crop_size": (_job(crop_size=[0, 4]), "positive"),
    }
    for field, (tree, words) in cases.items():
        with pytest.raises(ConfigError, match=words):
            build_config(TrainJobConfig, tree)
    with pytest.raises(ConfigError, match="model.sync_batch_norm.*GPU"):
        build_config(TrainJobConfig, _job(), ["model.sync_batch_norm=true"])
    assert build_config(TrainJobConfig, _job(), ["model.sync_batch_norm=true", "train.use_gpu=true"]).model.sync_batch_norm


def test_sync_batch_norm_conversion_keeps_checkpoint_keys():
    from segray.config import ModelConfig
    from segray.core.models import build_model

    model = build_model(ModelConfig(depth=2, base_width=4))
    keys = set(model.state_dict())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert set(converted.state_dict()) == keys  # checkpoints load into plain BatchNorm models


def test_demo_defaults_are_refined_not_replaced():
    from segray.config import DemoJobConfig

    cfg = DemoJobConfig()
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.patience) == (15, 4, None)
    assert cfg.optim.schedule == "poly"
    cfg = build_config(DemoJobConfig, {}, ["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.patience) == (5, 4, None)  # the rest stays
    cfg = build_config(DemoJobConfig, {}, ["task=instance"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.metric) == (3, 2, "val_segm_ap")
    assert cfg.model.name.startswith("maskrcnn")
