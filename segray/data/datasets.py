"""Training data as Ray Datasets: image/mask pairs decoded once, augmented on the fly each epoch."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from segray.config import DataConfig
from segray.core.transforms import BandStats, augment, compute_band_stats, resize_pair
from segray.infer.steps import read_decode
from segray.io.fs import Sample, list_samples

log = logging.getLogger(__name__)
STATS_SAMPLE = 256


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded shuffle then a cut: the same config always gives the same split."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction))
    if val_fraction > 0 and len(samples) > 1:
        n_val = min(max(n_val, 1), len(samples) - 1)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val


def decode_pairs(batch: dict[str, Any], data: dict, image_size: int | None) -> dict[str, Any]:
    """Reads and decodes pairs; bad pairs are dropped (and logged), training goes on."""
    cfg = DataConfig.model_validate(data)
    rows = read_decode(batch, storage=cfg.storage, bands=cfg.bands)
    images, masks = [], []
    for i, status in enumerate(rows["status"]):
        if status != "ok" or not rows["has_gt"][i]:
            log.warning("skipping %s: %s", rows["source_path"][i], rows["error"][i] or "no mask")
            continue
        image, mask = rows["pixels"][i], rows["gt"][i]
        if image_size:
            image, mask = resize_pair(image, mask, image_size)
        images.append(image.astype(np.float32))
        masks.append(mask.astype(np.int64))
    return {"image": images, "mask": masks}


def augment_batch(batch: dict[str, np.ndarray], augment_cfg: dict, ignore_index: int | None) -> dict[str, Any]:
    from segray.config import AugmentConfig

    cfg = AugmentConfig.model_validate(augment_cfg)
    rng = np.random.default_rng()  # fresh entropy: a different augmentation every epoch
    pairs = [augment(im, m, cfg, rng, ignore_index=ignore_index) for im, m in zip(batch["image"], batch["mask"])]
    shapes = {p[0].shape for p in pairs}
    if len(shapes) > 1:
        raise ValueError(f"data.image_size: training images differ in size {sorted(shapes)}; set data.image_size")
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}


def build_datasets(cfg: DataConfig, seed: int, parallelism: int = 8):
    """Returns (train_ds, val_ds, band_stats); decoded pixels are materialized once, augmentation is lazy.

    Instance data (``cfg.format`` 'instance_masks' or 'coco') goes to
    :func:`segray.data.instance_datasets.build_instance_datasets`.
    """
    import ray

    if cfg.task == "instance":
        from segray.data.instance_datasets import build_instance_datasets

        return build_instance_datasets(cfg, seed, parallelism)[:3]

    if cfg.chips is not None:  # windows cut from GeoTIFF/COG scenes of any size
        from segray.data.chips import build_chip_datasets

        return build_chip_datasets(cfg, seed, parallelism)
    samples = list_samples(cfg.source, cfg.storage)
    missing = [s.image for s in samples if not s.mask]
    if missing:
        raise ValueError(f"data.source.masks: no mask for {len(missing)} images, e.g. {missing[0]}")
    train_s, val_s = split_samples(samples, cfg.val_fraction, seed)

    def load(items: list[Sample]):
        rows = [{"image": s.image, "mask": s.mask, "image_id": s.image_id} for s in items]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), parallelism)))
        return ds.map_batches(
            decode_pairs,
            fn_kwargs={"data": cfg.model_dump(mode="json"), "image_size": cfg.image_size},
            batch_size=8,
            num_cpus=0.5,
        ).materialize()

    train_ds = load(train_s)
    val_ds = load(val_s) if val_s else None
    if train_ds.count() == 0:
        raise ValueError("data.source: no readable image/mask pair for training")
    # Band statistics from a sample: enough for normalisation, cheap on a big archive.
    if cfg.band_stats is not None:  # fixed by the config
        stats = BandStats(mean=list(cfg.band_stats.mean), std=list(cfg.band_stats.std))
    else:
        stats = compute_band_stats(row["image"] for row in train_ds.limit(STATS_SAMPLE).iter_rows())
    train_ds = train_ds.map_batches(
        augment_batch,
        fn_kwargs={"augment_cfg": cfg.augment.model_dump(), "ignore_index": cfg.ignore_index},
        batch_size=8,
        num_cpus=0.5,
    )
    return train_ds, val_ds, stats
