"""The per-epoch plans of training rows, shared by every kind of training data (images, chips, instances).

The decoded rows are materialised in Ray's object store once. The training dataset handed to
Ray Train is a lazy plan over them, re-executed every epoch:

    decoded -> shuffle (seeded, reseeded every epoch) -> scale jitter -> random crop -> flips/rotations/colour

so every epoch sees a new order (batches mix files from all over the set, whatever order the
source lists them in) and new crops. Validation is decoded once and read as is (whole images,
or centre crops with ``data.val_crop: center``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segray.config import DataConfig
from segray.core.transforms import BandStats, augment, center_crop, random_crop, random_scale
from segray.io.fs import Sample

STATS_SAMPLE = 256  # rows read for band statistics


@dataclass
class TrainingData:
    """What the trainer hands to Ray Train, plus what the driver needs to know about it."""

    train: Any  # ray.data.Dataset: shuffled and augmented lazily, every epoch anew
    val: Any | None  # ray.data.Dataset or None
    band_stats: BandStats
    decoded: Any  # the training rows as decoded (materialised), before shuffling and augmentation
    num_train: int
    category_ids: list[int] | None = None  # instance data: COCO category id of each label


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded shuffle then a cut: the same config always gives the same split (each part in
    source order; the training order is shuffled every epoch later, see :func:`shuffled`)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction))
    if val_fraction > 0 and len(samples) > 1:
        n_val = min(max(n_val, 1), len(samples) - 1)
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val


def shuffled(ds, cfg: DataConfig, seed: int):
    """The training order, seeded by ``train.seed`` and different in every epoch.

    Ray Data re-executes the plan each epoch; ``RandomSeedConfig(reseed_after_execution=True)``
    combines the seed with the execution index, so epoch k's order is the same in every run of
    the same config and differs from epoch k+1's. 'global' is a full random_shuffle (exact, moves
    every decoded row once per epoch: right for sets that fit the object store); 'buffer' only
    randomises block order here and the workers mix rows in a local shuffle buffer
    (``SemanticTask``), for sets too big to shuffle whole.
    """
    from ray.data import RandomSeedConfig

    if cfg.shuffle == "global":
        return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if cfg.shuffle == "buffer":
        return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds


def ordered_items(rows: list[dict], parallelism: int = 8):
    """``rows`` as a Ray Dataset that keeps their order through its tasks (its own DataContext,
    shared by the datasets derived from it): decoded blocks then come in the same order in every
    run, which a seeded shuffle needs to give the same orders."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), parallelism)))
    ds.context.execution_options.preserve_order = True
    return ds


def restart_epoch_count(ds) -> None:
    """Make epoch k's order depend on ``train.seed`` and k alone.

    Ray Data counts executions in the dataset's DataContext, and a reseeded shuffle mixes that
    count into its seed; the count also grows with everything executed before in the process
    (materialize, count, band statistics, an earlier training run). Restarting it just before
    the trainer takes the dataset gives the same orders in every run of the same config.
    """
    if hasattr(ds.context, "_execution_idx"):  # Ray >= 2.50; older releases reseed by their own rules
        ds.context._execution_idx = 0


def _stack(images: list[np.ndarray], masks: list[np.ndarray], ids: Any, hint: str) -> dict[str, Any]:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{hint}: training images differ in size {sorted(shapes)}; set data.crop_size "
                         "(random crops) or data.image_size (resize)")
    return {"image": np.stack(images), "mask": np.stack(masks), "image_id": np.asarray(ids, dtype=object)}


def augment_batch(batch: dict[str, Any], data: dict) -> dict[str, Any]:
    """Scale jitter -> random crop -> photometric/geometric augmentation, per row."""
    cfg = DataConfig.model_validate(data)
    rng = np.random.default_rng()  # fresh entropy: other crops and flips every epoch
    images, masks = [], []
    for image, mask in zip(batch["image"], batch["mask"]):
        if cfg.scale_jitter is not None:
            image, mask = random_scale(image, mask, cfg.scale_jitter, rng)
        if cfg.crop_size is not None:
            image, mask = random_crop(image, mask, cfg.crop_size, rng, cfg.ignore_index)
        image, mask = augment(image, mask, cfg.augment, rng, ignore_index=cfg.ignore_index)
        images.append(image)
        masks.append(mask)
    return _stack(images, masks, batch["image_id"], "data.augment")


def center_crop_batch(batch: dict[str, Any], crop_size: list[int], ignore_index: int | None) -> dict[str, Any]:
    pairs = [center_crop(im, m, tuple(crop_size), ignore_index) for im, m in zip(batch["image"], batch["mask"])]
    return _stack([p[0] for p in pairs], [p[1] for p in pairs], batch["image_id"], "data.val_crop")


def label_histogram(batch: dict[str, Any], num_classes: int, ignore_index: int | None) -> dict[str, Any]:
    """Per row: pixels of each class, and the pixel count of the row wherever a class occurs
    (the two sums median-frequency balancing needs); ignored pixels are counted in neither."""
    pixels, image_pixels = [], []
    for mask in batch["mask"]:
        m = np.asarray(mask).ravel()
        m = m[(m >= 0) & (m < num_classes) & (m != (-1 if ignore_index is None else ignore_index))]
        counts = np.bincount(m, minlength=num_classes)[:num_classes].astype(np.int64)
        pixels.append(counts)
        image_pixels.append(np.where(counts > 0, m.size, 0).astype(np.int64))
    return {"pixels": np.stack(pixels), "image_pixels": np.stack(image_pixels)}


def class_frequencies(decoded, num_classes: int, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Summed :func:`label_histogram` over a dataset of decoded training rows."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    hist = decoded.map_batches(label_histogram, fn_kwargs={"num_classes": num_classes, "ignore_index": ignore_index},
                               batch_size=16, num_cpus=0.5)
    for batch in hist.iter_batches(batch_size=256, batch_format="numpy"):
        pixels += batch["pixels"].sum(axis=0)
        image_pixels += batch["image_pixels"].sum(axis=0)
    return pixels, image_pixels


def train_plan(decoded, cfg: DataConfig, seed: int):
    """The lazy per-epoch plan of training rows: shuffle, then augment (chips share it)."""
    return shuffled(decoded, cfg, seed).map_batches(
        augment_batch, fn_kwargs={"data": cfg.model_dump(mode="json")}, batch_size=8, num_cpus=0.5)


def val_plan(val, cfg: DataConfig):
    if val is None or cfg.val_crop != "center":
        return val
    return val.map_batches(center_crop_batch, fn_kwargs={"crop_size": list(cfg.crop_size or ()),
                                                          "ignore_index": cfg.ignore_index},
                           batch_size=8, num_cpus=0.5)
