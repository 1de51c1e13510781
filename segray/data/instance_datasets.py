"""Instance training data as Ray Datasets: images decoded once with their objects; augmented per batch.

Rows hold ``image`` (float32 [C, H, W]; sizes may differ), ``target`` (the image's
``Instances`` as JSON with RLE masks, see :mod:`segray.core.instances`), ``row_index`` (a
global id, used as the COCO image id in validation) and ``image_id``. Augmentation happens in
the train workers' detection collate (:class:`segray.train.tasks.InstanceCollate`), where
images, boxes and masks flip together.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from segray.config import DataConfig
from segray.core.transforms import BandStats, compute_band_stats
from segray.data.plans import STATS_SAMPLE, TrainingData, ordered_items, shuffled, split_samples
from segray.io.sources import list_samples
from segray.io.instance_reads import category_ids_for, instance_items, read_decode_instances

log = logging.getLogger(__name__)


def decode_instance_rows(batch: dict[str, Any], data: dict, category_labels: list[list[int]]) -> dict[str, Any]:
    """Reads images and their ground truth; unreadable rows are dropped (and logged)."""
    cfg = DataConfig.model_validate(data)
    rows = read_decode_instances(batch, storage=cfg.storage, bands=cfg.bands, num_classes=len(cfg.class_names),
                                 ignore_index=cfg.ignore_index, category_labels=category_labels)
    keep = [i for i, s in enumerate(rows["status"]) if s == "ok" and rows["has_gt"][i]]
    for i, s in enumerate(rows["status"]):
        if i not in keep:
            log.warning("skipping %s: %s", rows["source_path"][i], rows["error"][i] or "no ground truth")
    return {
        "image": [rows["pixels"][i].astype(np.float32) for i in keep],
        "target": np.array([rows["target"][i] for i in keep], dtype=object),
        "row_index": np.asarray([rows["row_index"][i] for i in keep], np.int64),
        "image_id": np.array([str(rows["image_id"][i]) for i in keep], dtype=object),
    }


def build_instance_datasets(cfg: DataConfig, seed: int, parallelism: int = 8):
    """:class:`TrainingData`; ``category_ids[label]`` is the COCO category id of each class (the
    label itself without a COCO file)."""
    samples = list_samples(cfg.source, cfg.storage)
    items, cat_labels, coco = instance_items(samples, cfg.storage, cfg.class_names, cfg.coco_json, cfg.class_masks,
                                             cfg.source.mask_suffix)
    if cfg.format == "coco":
        labelled = [it for it in items if it["annotations"]]
        if not labelled:
            raise ValueError(f"data.coco_json: no image of {cfg.coco_json} matches the images of data.source")
        if len(labelled) < len(items):
            log.warning("%d listed images are not in %s: not used", len(items) - len(labelled), cfg.coco_json)
        items = labelled
    else:
        missing = [it["image"] for it in items if not it["mask"]]
        if missing:
            raise ValueError(f"data.source.masks: no instance mask for {len(missing)} images, e.g. {missing[0]}")
        if cfg.class_masks:
            no_class = [it["image"] for it in items if not it["class_mask"]]
            if no_class:
                raise ValueError(f"data.class_masks: no class map for {len(no_class)} images, e.g. {no_class[0]}")
    train_items, val_items = split_samples(items, cfg.val_fraction, seed)  # type: ignore[arg-type]

    def load(rows: list[dict]):
        ds = ordered_items(rows, parallelism)
        return ds.map_batches(
            decode_instance_rows,
            fn_kwargs={"data": cfg.model_dump(mode="json"),
                       "category_labels": [[c, lab] for c, lab in (cat_labels or {}).items()]},
            batch_size=4,
            num_cpus=0.5,
        ).materialize()

    train_ds = load(train_items)
    val_ds = load(val_items) if val_items else None
    num_train = train_ds.count()
    if num_train == 0:
        raise ValueError("data.source: no readable image with ground truth for training")
    if cfg.band_stats is not None:  # fixed by the config
        stats = BandStats(mean=list(cfg.band_stats.mean), std=list(cfg.band_stats.std))
    else:
        stats = compute_band_stats(row["image"] for row in train_ds.limit(STATS_SAMPLE).iter_rows())
    # Shuffled anew every epoch (augmentation happens in the workers' detection collate).
    return TrainingData(train=shuffled(train_ds, cfg, seed), val=val_ds, band_stats=stats, decoded=train_ds,
                        num_train=num_train, category_ids=category_ids_for(cfg.class_names, coco))
