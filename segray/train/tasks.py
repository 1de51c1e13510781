"""What differs between semantic and instance training, behind one small interface.

The loop in :mod:`segray.train.loop` is the same for both; a task supplies

- ``build_model()``: the network (before DDP wrapping);
- ``train_batches(shard, epoch)``: a Ray Data shard -> model-ready batches (semantic: stacked
  tensors, through a seeded local shuffle buffer with ``data.shuffle: buffer``; instance: a
  detection collate giving lists of image tensors and target dicts, augmented jointly);
- ``loss(model, batch)``: the training loss, its number of images and named parts;
- ``validate(model, shard, part)``: the validation metrics, reduced over all workers (semantic:
  ``all_reduce`` of a confusion matrix and loss sums; instance: ``all_gather_object`` of
  predictions and targets, COCOeval on rank 0, ``broadcast_object_list`` of the figures).
  When every worker reads the whole validation set (the trainer does not split it), ``part``
  is ``(rank, world_size)`` and each worker takes every world_size-th batch, so every image
  is evaluated once.

Tasks run inside Ray Train workers, but import Ray only where they read a shard.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from segray.config import TrainJobConfig
from segray.core.models import build_model
from segray.io.fs import fsspec_options

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def take_part(batches: Iterable, part: tuple[int, int] | None) -> Iterator:
    """Every ``world``-th batch from ``rank`` on (all batches when ``part`` is None)."""
    for i, batch in enumerate(batches):
        if part is None or i % part[1] == part[0]:
            yield batch


def _storage_options(job: TrainJobConfig) -> dict:
    url = (job.model.weights or getattr(job.model, "backbone_weights", None)  # (Mask R-CNN only)
           or getattr(job.model, "encoder_weights", None) or "")  # (smp only)
    return fsspec_options(url, job.data.storage) if url else {}


class SemanticTask:
    """Class maps: stacked image/mask tensors, a configured loss, a confusion matrix."""

    name = "semantic"

    @staticmethod
    def prepare(job: TrainJobConfig, decoded) -> TrainJobConfig:
        """On the driver, before training: ``loss.class_weights: auto`` -> median-frequency
        weights counted over the decoded training labels."""
        from segray.core.losses import resolve_class_weights
        from segray.data.plans import class_frequencies

        if job.loss.class_weights != "auto":
            return job
        k = max(job.model.num_classes, 2)
        pixels, image_pixels = class_frequencies(decoded, k, job.data.ignore_index)
        weights = resolve_class_weights(job.loss, job.model.num_classes, pixels, image_pixels)
        log.info("class weights (median frequency): %s", weights)
        return job.model_copy(update={"loss": job.loss.model_copy(update={"class_weights": weights})})

    def __init__(self, job: TrainJobConfig, band_stats: dict, device: torch.device, use_amp: bool):
        from segray.core.losses import build_loss

        self.job, self.device, self.use_amp = job, device, use_amp
        self.mean = torch.tensor(band_stats["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(band_stats["std"], device=device).view(1, -1, 1, 1)
        self.loss_fn = build_loss(job.loss, job.model.num_classes, job.data.ignore_index).to(device)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.job.model, _storage_options(self.job))

    def _tensors(self, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.stack(list(images)), dtype=torch.float32).to(self.device, non_blocking=True)
        y = torch.as_tensor(np.stack(list(masks)), dtype=torch.int64).to(self.device, non_blocking=True)
        return (x - self.mean) / self.std, y

    def train_batches(self, shard, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Equal-shape batches (crops or resizes make them so); drop_last, as BatchNorm needs > 1."""
        data = self.job.data
        shuffle = {}
        if data.shuffle == "buffer":  # block order is randomised upstream; rows mix here
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            shuffle = {"local_shuffle_buffer_size": data.shuffle_buffer_size,
                       "local_shuffle_seed": int(np.random.SeedSequence([self.job.train.seed, epoch, rank])
                                                 .generate_state(1)[0])}
        for batch in shard.iter_batches(batch_size=self.job.train.batch_size, batch_format="numpy",
                                        drop_last=True, **shuffle):
            yield self._tensors(batch["image"], batch["mask"])

    def val_batches(self, shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Whole images of any size: each batch is split into runs of one shape."""
        for batch in shard.iter_batches(batch_size=self.job.train.batch_size, batch_format="numpy"):
            groups: dict[tuple, list[int]] = {}
            for i, image in enumerate(batch["image"]):
                groups.setdefault(np.shape(image), []).append(i)
            for idx in groups.values():
                yield self._tensors([batch["image"][i] for i in idx], [batch["mask"][i] for i in idx])

    def loss(self, model, batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = batch
        return self.loss_fn(model(x), y), len(y), {}

    def validate(self, model, shard, part: tuple[int, int] | None = None) -> dict[str, float]:
        from segray.core.metrics import SegmentationMeter, segmentation_metrics

        meter = SegmentationMeter(self.job.model.num_classes, ignore_index=self.job.data.ignore_index)
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for x, y in take_part(self.val_batches(shard), part) if shard is not None else []:
                with torch.autocast(self.device.type, enabled=self.use_amp):
                    logits = model(x).float()
                sums[0] += self.loss_fn(logits, y).item() * len(y)
                sums[1] += len(y)
                meter.update(logits.cpu(), y.cpu())
        all_reduce(sums)
        cm = all_reduce(meter.cm.clone())
        if sums[1] == 0:
            return {}
        metrics = {"val_loss": (sums[0] / sums[1]).item()}
        metrics.update({f"val_{k}": v for k, v in segmentation_metrics(cm, self.job.data.class_names).items()})
        return metrics


class InstanceCollate:
    """Ray Data numpy batch -> (images, targets, meta) for torchvision detection models.

    Rows carry ``image`` (float32 [C, H, W], sizes may differ), ``target`` (``Instances`` JSON)
    and ``row_index``. Images are normalised with the band statistics; with ``augment`` the
    image, boxes and masks flip/rotate together. Crowd regions are not trained on; ``meta``
    keeps the full ground truth (crowd included) for evaluation.
    """

    def __init__(self, band_stats: dict, augment: Any | None = None):
        self.mean = np.asarray(band_stats["mean"], np.float32)[:, None, None]
        self.std = np.asarray(band_stats["std"], np.float32)[:, None, None]
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]):
        from segray.core.instances import Instances, augment_instances

        images, targets, meta = [], [], []
        rng = np.random.default_rng()  # fresh entropy: another augmentation every epoch
        for image, text, row in zip(batch["image"], batch["target"], batch["row_index"]):
            image = np.asarray(image, np.float32)
            inst = Instances.from_json(str(text))
            if self.augment is not None:
                image, inst = augment_instances(image, inst, self.augment, rng)
            x = torch.from_numpy(np.ascontiguousarray((image - self.mean) / self.std))
            train = inst.select(~inst.iscrowd)
            images.append(x)
            targets.append({"boxes": torch.from_numpy(train.boxes), "labels": torch.from_numpy(train.labels),
                            "masks": torch.from_numpy(train.masks)})
            meta.append((int(row), inst))
        return images, targets, meta


class InstanceTask:
    """Mask R-CNN: list batches, torchvision's summed detection losses, COCO bbox/segm AP."""

    name = "instance"

    @staticmethod
    def prepare(job: TrainJobConfig, decoded) -> TrainJobConfig:
        return job  # nothing to count: Mask R-CNN's losses take no class weights
    loss_names = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")

    def __init__(self, job: TrainJobConfig, band_stats: dict, device: torch.device, use_amp: bool):
        self.job, self.device, self.use_amp = job, device, use_amp
        self.train_collate = InstanceCollate(band_stats, job.data.augment)
        self.val_collate = InstanceCollate(band_stats, None)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.job.model, _storage_options(self.job))

    def _batches(self, shard, collate: InstanceCollate, part: tuple[int, int] | None = None) -> Iterator:
        batches = shard.iter_batches(batch_size=self.job.train.batch_size, batch_format="numpy", prefetch_batches=1)
        for batch in take_part(batches, part):  # skipped before the collate: no decoding for other ranks
            images, targets, meta = collate(batch)
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
            yield images, targets, meta

    def train_batches(self, shard, epoch: int) -> Iterable:
        return self._batches(shard, self.train_collate)  # shuffled upstream, anew every epoch

    def loss(self, model, batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        images, targets, _ = batch
        losses = model(images, targets)
        total = sum(losses.values())
        return total, len(images), {f"train_{k}": float(losses[k].detach()) for k in self.loss_names if k in losses}

    def predict(self, model, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Eval-mode forward -> per image boxes, labels, scores and RLE masks (cut at mask_threshold)."""
        from segray.core.instances import encode_rles

        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.use_amp):
            outputs = model(images)
        out = []
        for o in outputs:
            masks = (o["masks"][:, 0].float() > self.job.model.mask_threshold).cpu().numpy()
            out.append({"boxes": o["boxes"].float().cpu().numpy(), "labels": o["labels"].cpu().numpy(),
                        "scores": o["scores"].float().cpu().numpy(), "rles": encode_rles(masks)})
        return out

    def validate(self, model, shard, part: tuple[int, int] | None = None) -> dict[str, float]:
        from segray.core import coco_eval

        local: dict[int, tuple] = {}  # image id -> (image, ground truth, detections)
        for batch_images, _, meta in self._batches(shard, self.val_collate, part) if shard is not None else []:
            for (row, inst), pred in zip(meta, self.predict(model, batch_images)):
                h, w = inst.size
                local[row] = ({"id": row, "height": h, "width": w}, coco_eval.gt_records(row, inst),
                              coco_eval.detection_records(row, pred["boxes"], pred["labels"], pred["scores"],
                                                          pred["rles"]))
        if _distributed():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        else:
            parts = [local]
        result: list = [{}]
        if not _distributed() or dist.get_rank() == 0:
            merged = {k: v for p in parts for k, v in p.items()}  # an image seen twice counts once
            if merged:
                entries = [merged[k] for k in sorted(merged)]
                dets = [d for e in entries for d in e[2]]
                cats = coco_eval.categories(self.job.data.class_names)
                result[0] = coco_eval.evaluate([e[0] for e in entries], [g for e in entries for g in e[1]], dets,
                                               cats, prefix="val_")
                result[0].update(val_images=float(len(entries)), val_detections=float(len(dets)))
        if _distributed():
            dist.broadcast_object_list(result, src=0)
        return result[0]


# The training side of each model family, by the job's task (its data format and model family agree:
# the config checks that). Inference's side is segray.infer.families.
TASKS: dict[str, type] = {"semantic": SemanticTask, "instance": InstanceTask}


def make_task(job: TrainJobConfig, band_stats: dict, device: torch.device, use_amp: bool):
    return TASKS[job.task](job, band_stats, device, use_amp)
