"""Training data as Ray Datasets: image/mask pairs decoded once, shuffled and augmented anew every epoch.

The decoded rows are materialised in Ray's object store once. The training dataset handed to
Ray Train is a lazy plan over them, re-executed every epoch:

    decoded -> shuffle (seeded, reseeded every epoch) -> scale jitter -> random crop -> flips/rotations/colour

so every epoch sees a new order (batches mix files from all over the set, whatever order the
source lists them in) and new crops. Validation is decoded once and read as is (whole images,
or centre crops with ``data.val_crop: center``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray.config import DataConfig
from segray.core.transforms import (
    BandStats, augment, center_crop, compute_band_stats, random_crop, random_scale, resize_pair,
)
from segray.infer.steps import read_decode
from segray.io.fs import Sample, list_samples

log = logging.getLogger(__name__)
STATS_SAMPLE = 256


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


def decode_pairs(batch: dict[str, Any], data: dict) -> dict[str, Any]:
    """Reads and decodes pairs; bad pairs are dropped (and logged), training goes on."""
    cfg = DataConfig.model_validate(data)
    rows = read_decode(batch, storage=cfg.storage, bands=cfg.bands)
    images, masks, ids = [], [], []
    for i, status in enumerate(rows["status"]):
        if status != "ok" or not rows["has_gt"][i]:
            log.warning("skipping %s: %s", rows["source_path"][i], rows["error"][i] or "no mask")
            continue
        image, mask = rows["pixels"][i], rows["gt"][i]
        if cfg.image_size:
            image, mask = resize_pair(image, mask, cfg.image_size)
        images.append(image.astype(np.float32))
        masks.append(mask.astype(np.int64))
        ids.append(str(batch["image_id"][i]))
    return {"image": images, "mask": masks, "image_id": np.array(ids, dtype=object)}


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


def load_pairs(samples: list[Sample], cfg: DataConfig, parallelism: int = 8):
    """Decoded image/mask rows of ``samples``, materialised once."""
    rows = [{"image": s.image, "mask": s.mask, "image_id": s.image_id} for s in samples]
    return ordered_items(rows, parallelism).map_batches(
        decode_pairs, fn_kwargs={"data": cfg.model_dump(mode="json")}, batch_size=8, num_cpus=0.5).materialize()


def paired_samples(source, cfg: DataConfig, what: str) -> list[Sample]:
    samples = list_samples(source, cfg.storage)
    if not samples:
        raise ValueError(f"data.{what}: no images found")
    missing = [s.image for s in samples if not s.mask]
    if missing:
        raise ValueError(f"data.{what}.masks: no mask for {len(missing)} images, e.g. {missing[0]}")
    return samples


def build_datasets(cfg: DataConfig, seed: int, parallelism: int = 8) -> TrainingData:
    """Training and validation data of any format (images, chips cut from scenes, instances)."""
    if cfg.task == "instance":
        from segray.data.instance_datasets import build_instance_datasets

        return build_instance_datasets(cfg, seed, parallelism)
    if cfg.chips is not None:  # windows cut from GeoTIFF/COG scenes of any size
        from segray.data.chips import build_chip_datasets

        return build_chip_datasets(cfg, seed, parallelism)
    samples = paired_samples(cfg.source, cfg, "source")
    if cfg.val_source is not None:  # a named validation set: nothing cut from the training set
        train_s, val_s = samples, paired_samples(cfg.val_source, cfg, "val_source")
        overlap = {s.image for s in train_s} & {s.image for s in val_s}
        if overlap:
            raise ValueError(f"data.val_source: {len(overlap)} images are also in data.source, "
                             f"e.g. {sorted(overlap)[0]}")
    else:
        train_s, val_s = split_samples(samples, cfg.val_fraction, seed)
    decoded = load_pairs(train_s, cfg, parallelism)
    val_ds = load_pairs(val_s, cfg, parallelism) if val_s else None
    num_train = decoded.count()
    if num_train == 0:
        raise ValueError("data.source: no readable image/mask pair for training")
    if cfg.band_stats is not None:  # fixed by the config
        stats = BandStats(mean=list(cfg.band_stats.mean), std=list(cfg.band_stats.std))
    else:  # from a sample: enough for normalisation, cheap on a big archive
        stats = compute_band_stats(row["image"] for row in decoded.limit(STATS_SAMPLE).iter_rows())
    return TrainingData(train=train_plan(decoded, cfg, seed), val=val_plan(val_ds, cfg), band_stats=stats,
                        decoded=decoded, num_train=num_train)

