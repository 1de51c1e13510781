"""Training data as Ray Datasets: image/mask pairs decoded once; the epoch plans of
:mod:`segray.data.plans` shuffle and augment them anew every epoch. ``build_datasets`` is the
one entry: images, chips cut from scenes (:mod:`segray.data.chips`) or instances
(:mod:`segray.data.instance_datasets`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from segray.config import DataConfig
from segray.core.transforms import BandStats, compute_band_stats, resize_pair
from segray.data.chips import build_chip_datasets
from segray.data.instance_datasets import build_instance_datasets
from segray.data.plans import STATS_SAMPLE, TrainingData, ordered_items, split_samples, train_plan, val_plan
from segray.io.fs import Sample
from segray.io.sources import list_samples
from segray.io.reads import read_decode

log = logging.getLogger(__name__)


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


def build_image_datasets(cfg: DataConfig, seed: int, parallelism: int = 8) -> TrainingData:
    """Image/mask pairs: ``data.source``, and ``data.val_source`` or a seeded random cut."""
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


# One builder per kind of training input; a new input (a catalog, Zarr) is one more entry.
BUILDERS = {"images": build_image_datasets, "chips": build_chip_datasets, "instances": build_instance_datasets}


def input_kind(cfg: DataConfig) -> str:
    if cfg.task == "instance":  # instance masks or COCO annotations
        return "instances"
    return "chips" if cfg.chips is not None else "images"  # chips: windows cut from GeoTIFF/COG scenes


def build_datasets(cfg: DataConfig, seed: int, parallelism: int = 8) -> TrainingData:
    """Training and validation data of any kind (images, chips cut from scenes, instances)."""
    return BUILDERS[input_kind(cfg)](cfg, seed, parallelism)
