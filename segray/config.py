"""Typed job configs: one per job, loadable from YAML, overridable with ``--set a.b=value``.

Every model forbids unknown fields, so a typo fails before any cluster work starts and the
error names the field (``train.epochs: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


def _hw(value: Any) -> Any:
    """An int n means [n, n]; a pair is [height, width]."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return tuple(value)
    raise ValueError("give a positive int or [height, width]")


Size2D = Annotated[tuple[int, int], BeforeValidator(_hw)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- shared pieces


class StorageOptions(_Strict):
    """fsspec/pyarrow options for object storage (an S3-compatible endpoint, keys)."""

    endpoint_url: Optional[str] = None
    key: Optional[str] = None
    secret: Optional[str] = None
    region: Optional[str] = None


class SourceConfig(_Strict):
    """Where images (and optionally masks) come from, on any fsspec URL.

    Exactly one of ``images`` (a folder), ``glob`` or ``manifest`` names the images.
    Masks pair with images by file stem (folder pair) or by the manifest's second column.
    """

    images: Optional[str] = None
    masks: Optional[str] = None
    glob: Optional[str] = None
    manifest: Optional[str] = None
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff"])
    mask_suffix: str = ""
    limit: Optional[int] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "SourceConfig":
        given = [n for n in ("images", "glob", "manifest") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of images, glob, manifest (got {given or 'none'})")
        return self


SEMANTIC_MODELS = ("unet", "fcn_resnet50", "deeplabv3_resnet50")
INSTANCE_MODELS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
# What an instance run reports each epoch (COCOeval over the validation set; -1 where undefined).
INSTANCE_METRICS = tuple(
    f"val_{t}_{m}" for t in ("segm", "bbox")
    for m in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar", "ar_small",
              "ar_medium", "ar_large")
) + ("train_loss",)


class ModelConfig(_Strict):
    name: Literal[
        "unet", "fcn_resnet50", "deeplabv3_resnet50", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"
    ] = "unet"
    in_channels: int = Field(default=3, gt=0)
    num_classes: int = Field(default=2, gt=0, description="1 = binary with one logit")
    depth: int = Field(default=4, ge=1, le=7)
    base_width: int = Field(default=32, gt=0)
    batch_norm: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    sync_batch_norm: bool = Field(
        default=False, description="SyncBatchNorm across workers (small per-worker batches); GPU workers only")
    down: Literal["maxpool", "conv"] = "maxpool"
    up: Literal["transpose", "bilinear"] = "transpose"
    weights: Optional[str] = Field(default=None, description="local/fsspec path of a state dict or segray checkpoint")
    # ---- Mask R-CNN only (ignored by the semantic models); num_classes counts the background.
    backbone_weights: Optional[str] = Field(
        default=None, description="Mask R-CNN: local/fsspec path of a ResNet-50 state dict for the backbone only")
    trainable_backbone_layers: int = Field(
        default=3, ge=0, le=5, description="Mask R-CNN: trainable ResNet stages from the top (5 = all, 0 = frozen)")
    frozen_batch_norm: bool = Field(
        default=False, description="Mask R-CNN: FrozenBatchNorm2d in the backbone (use with pretrained weights)")
    min_size: int = Field(default=800, gt=0, description="Mask R-CNN: resize so the short side is min_size ...")
    max_size: int = Field(default=1333, gt=0, description="... and the long side at most max_size")
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 256, 512], description="Mask R-CNN: one anchor size per FPN level (5)")
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], description="Mask R-CNN anchors")
    box_score_thresh: float = Field(default=0.05, ge=0, le=1, description="Mask R-CNN: minimum detection score")
    box_nms_thresh: float = Field(default=0.5, gt=0, le=1, description="Mask R-CNN: per-class NMS IoU")
    box_detections_per_img: int = Field(default=100, gt=0, description="Mask R-CNN: most detections per image")
    mask_threshold: float = Field(default=0.5, gt=0, lt=1, description="Mask R-CNN: mask probability -> pixel")
    rpn_proposals_train: int = Field(default=2000, gt=0, description="Mask R-CNN: RPN proposals kept in training")
    rpn_proposals_test: int = Field(default=1000, gt=0, description="Mask R-CNN: RPN proposals kept in inference")
    box_batch_size_per_image: int = Field(default=512, gt=0, description="Mask R-CNN: RoIs sampled per training image")

    @model_validator(mode="after")
    def _detection_fields(self) -> "ModelConfig":
        if self.name in INSTANCE_MODELS:
            if self.num_classes < 2:
                raise ValueError("num_classes: Mask R-CNN counts the background, so it needs at least 2")
            if self.min_size > self.max_size:
                raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
            if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) <= 0:
                raise ValueError("anchor_sizes: give 5 positive sizes, one per FPN level")
            if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
                raise ValueError("aspect_ratios: give positive ratios")
        elif self.backbone_weights:
            raise ValueError("backbone_weights: only Mask R-CNN models take backbone weights")
        return self


class LossTerm(_Strict):
    name: Literal["ce", "bce", "dice", "focal"]
    weight: float = Field(default=1.0, gt=0)


class LossConfig(_Strict):
    terms: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="ce"), LossTerm(name="dice")])
    class_weights: Optional[list[float] | Literal["auto"]] = Field(
        default=None, description="per-class weights of ce/focal (binary: bce's pos_weight); 'auto' = median "
        "frequency balancing (SegNet) computed from the training labels, ignored pixels left out")
    focal_gamma: float = Field(default=2.0, ge=0)

    @field_validator("terms")
    @classmethod
    def _non_empty(cls, v: list[LossTerm]) -> list[LossTerm]:
        if not v:
            raise ValueError("at least one loss term")
        return v


class AugmentConfig(_Strict):
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.5, ge=0, le=1)
    rot90: float = Field(default=0.5, ge=0, le=1)
    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    brightness: float = Field(default=0.1, ge=0, le=1)
    contrast: float = Field(default=0.1, ge=0, le=1)


class BandStatsConfig(_Strict):
    """Per-band normalisation ``(x - mean) / std``, in the order of the bands read."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> "BandStatsConfig":
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per band (got {len(self.mean)} and {len(self.std)})")
        if min(self.std) <= 0:
            raise ValueError("std values must be positive")
        return self


class ChipsConfig(_Strict):
    """Training windows ("chips") cut from GeoTIFF/COG scenes of any size, read windowed.

    Labels come from the raster paired with each scene by ``source.masks`` or the manifest's
    second column (pixel-aligned with the scene; ``label_values`` remaps values,
    ``label_nodata`` pixels are ignored), or from polygons in ``vector_labels`` (GeoJSON or
    GeoParquet, reprojected to the scene's CRS and rasterised per chip; ``{stem}`` in the
    path becomes the scene's file stem). Pixels that are nodata in the image or the label, or
    outside the scene, get ``data.ignore_index``: they count in neither loss nor metrics.
    """

    size: int = Field(default=256, ge=16, description="chip side in pixels")
    mode: Literal["random", "grid"] = "random"
    per_scene: Optional[int] = Field(
        default=16, gt=0, description="random: windows per scene; grid: a seeded subset of this many (None = all)")
    overlap: int = Field(default=0, ge=0, description="grid: overlap of neighbouring chips")
    vector_labels: Optional[str] = Field(default=None, description="GeoJSON/GeoParquet polygons; '{stem}' = scene stem")
    label_attribute: Optional[str] = Field(
        default=None, description="vector: property/column holding the class; None = every polygon is class 1")
    class_map: Optional[dict[str, int]] = Field(
        default=None, description="vector: property value -> class id (default: the value as an integer)")
    label_values: Optional[dict[int, int]] = Field(
        default=None, description="raster: label value -> class id, e.g. {255: 1}; unlisted values stay")
    label_nodata: Optional[int] = Field(default=None, description="raster: label value meaning 'no label'")
    nodata: Optional[float] = Field(default=None, description="image nodata value; overrides the files' own tag when set")
    min_valid_fraction: float = Field(default=0.5, ge=0, le=1, description="drop chips with fewer labelled pixels")

    @model_validator(mode="after")
    def _consistent(self) -> "ChipsConfig":
        if self.mode == "grid" and self.overlap >= self.size:
            raise ValueError(f"overlap {self.overlap} must be smaller than size {self.size}")
        if self.mode == "random" and self.per_scene is None:
            raise ValueError("per_scene: random chips need a count per scene")
        if self.vector_labels is None and (self.label_attribute or self.class_map):
            raise ValueError("label_attribute/class_map only apply to vector_labels")
        return self


class DataConfig(_Strict):
    """Training data. ``format`` says what the labels are:

    - ``semantic``: ``source.masks`` are class maps (one class index per pixel);
    - ``instance_masks``: ``source.masks`` are instance-id maps (0 background, 1..N one object
      each; ``ignore_index`` pixels belong to none); the class of each object is the majority
      value of the class map in ``class_masks`` (paired by file stem), or 1 for all without it;
    - ``coco``: ``coco_json`` (polygons or RLE) describes the images named by ``source``,
      matched by ``file_name``; categories map to ``class_names`` by name.
    """

    source: SourceConfig
    format: Literal["semantic", "instance_masks", "coco"] = "semantic"
    coco_json: Optional[str] = Field(default=None, description="COCO instances JSON (format: coco), any fsspec URL")
    class_masks: Optional[str] = Field(
        default=None, description="folder of class maps paired with the instance masks by stem (format: instance_masks)")
    class_names: list[str] = Field(default_factory=lambda: ["background", "foreground"])
    ignore_index: Optional[int] = Field(default=None, description="label value excluded from loss and metrics")
    bands: Optional[list[int]] = Field(default=None, description="0-based bands to read, in order; None = all")
    image_size: Optional[Size2D] = Field(
        default=None, description="resize every image to [h, w] (an int: square) before training; None = as is")
    crop_size: Optional[Size2D] = Field(
        default=None, description="random [h, w] crop of each training image, drawn anew every epoch (an int: "
        "square); images smaller than the crop are padded (mask: ignore_index, else mirrored)")
    scale_jitter: Optional[tuple[float, float]] = Field(
        default=None, description="rescale each training image by a random factor in [lo, hi] before the crop")
    val_crop: Literal["whole", "center"] = Field(
        default="whole", description="validate on whole images (any size) or on centre crops of crop_size")
    shuffle: Literal["global", "buffer", "none"] = Field(
        default="global", description="training order, reshuffled every epoch from train.seed: 'global' = Ray "
        "Data random_shuffle of the whole set; 'buffer' = a local shuffle buffer (shuffle_buffer_size rows) "
        "after randomizing block order, for sets too big to shuffle; 'none' = source order (rarely right)")
    shuffle_buffer_size: int = Field(default=512, gt=1, description="rows held by the 'buffer' shuffle, per worker")
    val_fraction: float = Field(default=0.2, ge=0, lt=1, description="random cut for validation (without val_source)")
    val_source: Optional[SourceConfig] = Field(
        default=None, description="a separate validation set (folder, glob or manifest); replaces the random cut "
        "(val_fraction is then not used)")
    test_source: Optional[SourceConfig] = Field(
        default=None, description="a test set, evaluated once with the best checkpoint after training")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    chips: Optional[ChipsConfig] = Field(default=None, description="train on windows cut from GeoTIFF/COG scenes")
    band_stats: Optional[BandStatsConfig] = Field(
        default=None, description="fixed normalisation; None = computed from a sample of the training data")

    @property
    def task(self) -> str:
        return "semantic" if self.format == "semantic" else "instance"

    @property
    def has_val(self) -> bool:
        return self.val_source is not None or self.val_fraction > 0

    @model_validator(mode="after")
    def _sizes(self) -> "DataConfig":
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            if not 0 < lo <= hi:
                raise ValueError(f"scale_jitter: need 0 < lo <= hi, got [{lo}, {hi}]")
            if self.crop_size is None:
                raise ValueError("scale_jitter: rescaled images differ in size; give crop_size too")
        if self.val_crop == "center" and self.crop_size is None:
            raise ValueError("val_crop: 'center' crops to crop_size; give crop_size")
        if self.task == "instance" and (self.crop_size or self.scale_jitter or self.val_source or self.test_source):
            raise ValueError("crop_size/scale_jitter/val_source/test_source: semantic data only for now")
        return self

    @model_validator(mode="after")
    def _chips_fields(self) -> "DataConfig":
        if self.chips is None:
            return self
        if self.format != "semantic":
            raise ValueError("chips: scene chips carry semantic labels (format 'semantic')")
        if self.image_size is not None:
            raise ValueError("image_size: chips have chips.size; leave image_size unset")
        if self.val_source is not None or self.test_source is not None:
            raise ValueError("val_source/test_source: chips hold out whole scenes (val_fraction)")
        if self.ignore_index is None and (self.chips.label_nodata is not None or self.chips.nodata is not None):
            raise ValueError("ignore_index: nodata pixels need an ignore_index to be left out of loss and metrics")
        return self

    @model_validator(mode="after")
    def _format_fields(self) -> "DataConfig":
        if self.format == "coco" and not self.coco_json:
            raise ValueError("coco_json: format 'coco' needs the COCO JSON file")
        if self.format != "coco" and self.coco_json:
            raise ValueError(f"coco_json: only read with format 'coco' (format is {self.format!r})")
        if self.format != "instance_masks" and self.class_masks:
            raise ValueError(f"class_masks: only read with format 'instance_masks' (format is {self.format!r})")
        if self.format != "semantic" and self.image_size is not None:
            raise ValueError("image_size: instance data keeps its size; Mask R-CNN resizes by model.min_size/max_size")
        return self


class OptimConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["poly", "cosine", "step", "constant"] = Field(
        default="cosine", description="LR decay: poly (per step, (1 - t/T)**poly_power, torchvision's "
        "segmentation reference), cosine (per epoch), step, constant")
    poly_power: float = Field(default=0.9, gt=0, description="schedule 'poly': exponent")
    step_size: int = Field(default=10, gt=0, description="schedule 'step': epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1, description="schedule 'step': LR factor per decay")
    warmup_steps: int = Field(default=0, ge=0, description="linear LR warm-up over this many optimizer steps")
    warmup_factor: float = Field(default=0.001, gt=0, le=1, description="LR factor at the first warm-up step")
    grad_clip: Optional[float] = Field(default=None, gt=0, description="clip the gradient norm to this value")


class TrainLoopConfig(_Strict):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=8, gt=0, description="per worker")
    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    amp: bool = Field(default=True, description="mixed precision; only used on GPU")
    accumulate_grad_batches: int = Field(
        default=1, gt=0, description="optimizer step every N batches (effective batch = N x batch_size x workers)")
    seed: int = 0
    patience: Optional[int] = Field(default=5, gt=0, description="early stopping: epochs without improvement")
    metric: str = Field(default="val_miou", description="metric that picks the best checkpoint")
    mode: Literal["max", "min"] = "max"
    num_to_keep: int = Field(default=2, gt=0)
    max_failures: int = Field(default=2, ge=-1)
    storage_path: str = Field(default="runs", description="local path or s3:// URL for checkpoints")
    name: str = "segray-train"


class TrainJobConfig(_Strict):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)

    @property
    def task(self) -> str:
        return self.data.task

    @model_validator(mode="after")
    def _band_stats_channels(self) -> "TrainJobConfig":
        stats = self.data.band_stats
        if stats is not None and len(stats.mean) != self.model.in_channels:
            raise ValueError(f"data.band_stats has {len(stats.mean)} bands, model.in_channels is {self.model.in_channels}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "TrainJobConfig":
        n = self.model.num_classes
        names = self.data.class_names
        instance_model = self.model.name in INSTANCE_MODELS
        if self.data.task == "instance" and not instance_model:
            raise ValueError(f"model.name: data.format {self.data.format!r} needs one of {list(INSTANCE_MODELS)}")
        if self.data.task == "semantic" and instance_model:
            raise ValueError(f"data.format: model {self.model.name!r} needs 'instance_masks' or 'coco' data")
        if instance_model:
            if self.loss != LossConfig():  # (a dumped config carries the default loss: that is fine)
                raise ValueError("loss: Mask R-CNN trains with its own RPN/box/mask losses; remove the loss section")
            if len(names) != n:
                raise ValueError(f"data.class_names has {len(names)} names but model.num_classes is {n} "
                                 "(Mask R-CNN: the first name is the background)")
            if "metric" not in self.train.model_fields_set and self.train.metric == "val_miou":
                self.train.metric = "val_segm_ap"  # the default metric of the task
            if self.train.metric not in INSTANCE_METRICS:
                raise ValueError(f"train.metric: {self.train.metric!r} is not an instance metric; "
                                 f"use one of val_segm_ap, val_segm_ap50, val_bbox_ap, ... or train_loss")
            return self._data_fits()
        if len(names) != max(n, 2) and not (n == 1 and len(names) in (1, 2)):
            raise ValueError(f"data.class_names has {len(names)} names but model.num_classes is {n}")
        if isinstance(self.loss.class_weights, list) and len(self.loss.class_weights) != max(n, 1):
            raise ValueError(f"loss.class_weights needs {n} values")
        if self.model.num_classes == 1 and any(t.name == "ce" for t in self.loss.terms):
            raise ValueError("loss.terms: use 'bce', not 'ce', with model.num_classes=1")
        if self.model.num_classes > 1 and any(t.name == "bce" for t in self.loss.terms):
            raise ValueError("loss.terms: 'bce' needs model.num_classes=1")
        return self._data_fits()

    def _data_fits(self) -> "TrainJobConfig":
        """Checks shared by both model families."""
        if not self.data.has_val and self.train.metric.startswith("val_"):
            raise ValueError(f"train.metric: {self.train.metric!r} needs validation data "
                             "(data.val_fraction > 0 or data.val_source)")
        if self.model.sync_batch_norm and not self.train.use_gpu:
            raise ValueError("model.sync_batch_norm: torch's SyncBatchNorm runs on GPU workers only "
                             "(train.use_gpu: true)")
        if self.data.bands is not None and len(self.data.bands) != self.model.in_channels:
            raise ValueError("data.bands must list model.in_channels bands")
        return self


class InferJobConfig(_Strict):
    source: SourceConfig
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="output directory (local or s3://) for predictions.parquet and summary")
    batch_size: int = Field(default=16, gt=0)
    num_actors: int = Field(default=2, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    cpus_per_task: float = Field(default=0.5, gt=0, description="decode/encode tasks")
    max_pixels: int = Field(default=64_000_000, gt=0, description="larger images become error rows")
    overwrite: bool = False
    # ---- instance checkpoints (Mask R-CNN) only; with one, source.masks are instance-id maps
    coco_json: Optional[str] = Field(
        default=None, description="instance ground truth as COCO JSON (matched by file_name); adds COCO metrics")
    class_masks: Optional[str] = Field(
        default=None, description="class maps for instance-id ground truth in source.masks (paired by stem)")
    score_threshold: Optional[float] = Field(
        default=None, ge=0, le=1, description="instances: minimum score (default: the checkpoint's box_score_thresh)")
    max_detections: Optional[int] = Field(
        default=None, gt=0, description="instances: most per image (default: the checkpoint's box_detections_per_img)")
    mask_threshold: Optional[float] = Field(
        default=None, gt=0, lt=1, description="instances: mask probability cut (default: the checkpoint's)")
    storage: StorageOptions = Field(default_factory=StorageOptions)


def demo_instance_model() -> ModelConfig:
    """The demo's Mask R-CNN: small inputs, small anchors, a light backbone update (CPU friendly)."""
    return ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=4, trainable_backbone_layers=2, min_size=256,
                       max_size=320, anchor_sizes=[8, 16, 32, 64, 128])


# What the demo trains with, per task; `--set train.x=...` refines these (it does not replace them).
# Semantic: 36 scenes of 128 px, 2 workers x 4, 15 epochs of the poly schedule = 60 optimizer steps,
# about a minute here, val mIoU ~0.65 (benchmarks/README.md). Instance: Mask R-CNN is ~50x slower a step.
DEMO_TRAIN = {
    "semantic": {"epochs": 15, "batch_size": 4, "patience": None},
    "instance": {"epochs": 3, "batch_size": 2, "patience": None, "metric": "val_segm_ap"},
}
DEMO_OPTIM = {"semantic": {"schedule": "poly", "lr": 0.003}, "instance": {}}


class DemoJobConfig(_Strict):
    workdir: str = "segray-demo"
    task: Literal["semantic", "instance"] = Field(
        default="semantic", description="semantic: U-Net on class maps; instance: Mask R-CNN on separate objects")
    num_images: int = Field(default=48, gt=3, description="scenes generated; a quarter are the validation set")
    image_size: int = Field(default=128, ge=32)
    seed: int = 0
    train: TrainLoopConfig = Field(default_factory=lambda: TrainLoopConfig(**DEMO_TRAIN["semantic"]))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(**DEMO_OPTIM["semantic"]))
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(num_classes=5, depth=3, base_width=16))

    @model_validator(mode="before")
    @classmethod
    def _task_bases(cls, data: Any) -> Any:
        """Fields given refine the task's demo defaults (task=instance: the demo's Mask R-CNN)."""
        if not isinstance(data, dict):
            return data
        task = data.get("task", "semantic")
        data = dict(data)
        for key, base in (("train", DEMO_TRAIN), ("optim", DEMO_OPTIM)):
            given = data.get(key)
            if given is None or isinstance(given, dict):
                data[key] = {**base.get(task, {}), **(given or {})}
        if task == "instance":
            model = data.get("model")
            if model is None or (isinstance(model, dict) and "name" not in model):
                data["model"] = {**demo_instance_model().model_dump(), **(model or {})}
        return data

    @model_validator(mode="after")
    def _task_model(self) -> "DemoJobConfig":
        if self.task == "instance" and self.model.name not in INSTANCE_MODELS:
            raise ValueError(f"model.name: task 'instance' needs one of {list(INSTANCE_MODELS)}")
        if self.task == "semantic" and self.model.name in INSTANCE_MODELS:
            raise ValueError("task: a Mask R-CNN model needs task 'instance'")
        return self


class SceneInferJobConfig(_Strict):
    """Segment GeoTIFF/COG scenes of any size: tiles with overlap -> actor pool -> blended,
    georeferenced outputs per scene (COG mask, optional probabilities, Parquet rows, polygons).

    Stitching is exact for a fully-convolutional model when ``margin`` covers the model's
    receptive-field radius and ``overlap > 2 * margin`` (U-Net, maxpool/transpose: radius
    ``6 * 2**depth - 2`` px, e.g. 22 for depth 2, 46 for depth 3); smaller margins still blend
    seam-free but differ slightly from an untiled pass near tile edges.
    """

    source: SourceConfig = Field(description="scenes (.tif/.png/...); masks, if given, are ground truth for metrics")
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="output folder, local or s3://")
    tile_size: int = Field(default=512, ge=32)
    overlap: int = Field(default=128, ge=0)
    margin: int = Field(default=32, ge=0, description="tile-edge pixels given ~0 weight (receptive-field radius)")
    blend: Literal["cosine", "linear"] = "cosine"
    tile_align: Optional[int] = Field(
        default=None, gt=0, description="tile offsets are multiples of this; None = the model's downsampling factor")
    block_size: int = Field(default=512, ge=128, description="output COG block = stitching block (multiple of 16)")
    bands: Optional[list[int]] = Field(default=None, description="0-based bands, in order; None = the checkpoint's")
    nodata: Optional[float] = Field(default=None, description="input nodata value; overrides the files' own tag when set")
    label_values: Optional[dict[int, int]] = Field(default=None, description="ground truth value -> class id")
    label_nodata: Optional[int] = Field(default=None, description="ground truth value excluded from metrics")
    write_probabilities: bool = False
    probabilities_dtype: Literal["uint8", "float32"] = Field(
        default="uint8", description="uint8: round(p * 254), nodata 255; float32: p, nodata NaN")
    per_tile_rows: bool = Field(default=False, description="also write tiles.parquet, one row per tile")
    polygons: bool = True
    min_polygon_pixels: int = Field(default=0, ge=0, description="drop smaller polygons (after merging)")
    polygon_max_vertices: int = Field(
        default=100_000, gt=0, description="a region growing past this many vertices (e.g. a class percolating "
        "through the scene as one web with countless holes) is emitted as its per-block pieces, flagged whole=false; "
        "so are the largest open regions while those pending hold over 20x this many (memory bound)")
    compress: Literal["deflate", "lzw", "zstd", "none"] = "deflate"
    work_dir: Optional[str] = Field(
        default=None, description="per-tile probabilities between predict and stitch; default <output>/_work. "
        "Must be reachable from every node (object storage or a shared filesystem)")
    keep_work: bool = False
    batch_size: int = Field(default=8, gt=0, description="tiles per model batch")
    num_actors: int = Field(default=2, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    cpus_per_task: float = Field(default=0.5, gt=0, description="read, write and stitch tasks")
    max_stitch_tasks: int = Field(default=2, gt=0, description="scenes stitched at once")
    gdal_cache_mb: int = Field(
        default=64, gt=0, description="GDAL block cache per worker process (GDAL's default, 5% of RAM, grows "
        "with every block read or written until full)")
    # ---- instance (Mask R-CNN) checkpoints only
    score_threshold: Optional[float] = Field(default=None, ge=0, le=1, description="instances: minimum score")
    max_detections: Optional[int] = Field(default=None, gt=0, description="instances: most per tile")
    mask_threshold: Optional[float] = Field(default=None, gt=0, lt=1, description="instances: mask probability cut")
    merge_ios: float = Field(
        default=0.5, gt=0, le=1, description="instances: merge detections from different tiles whose masks overlap "
        "by at least this fraction of the smaller one")
    write_instances: bool = Field(default=True, description="instances: also write instances/<scene>.tif (uint32 ids)")
    overwrite: bool = False
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @model_validator(mode="after")
    def _consistent(self) -> "SceneInferJobConfig":
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap {self.overlap} must be smaller than tile_size {self.tile_size}")
        if self.margin and self.overlap <= 2 * self.margin:
            raise ValueError(f"margin: need overlap > 2 * margin (overlap {self.overlap}, margin {self.margin})")
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        return self


class NightlyJobConfig(_Strict):
    """Nightly incremental inference over a growing archive (``segray nightly``, jobs/nightly.py).

    Each run lists the archive, skips every image whose (path, size, etag/mtime) a committed
    earlier run already processed, segments the rest into ``<output>/run_date=YYYY-MM-DD/`` and
    commits the partition with a ``_SUCCESS`` record written last (segray/infer/nightly.py).
    Only semantic checkpoints; the actor settings mean what they mean in InferJobConfig.
    """

    source: SourceConfig = Field(description="the archive: images (a folder/prefix), glob, or manifest")
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="root of the partitioned output, local or s3:// (run_date=YYYY-MM-DD/ below)")
    run_date: Optional[_dt.date] = Field(
        default=None, description="the night to run (YYYY-MM-DD); default: today in UTC. Set it for backfills")
    rebuild: bool = Field(
        default=False, description="rerun a night that is already committed (default: rerunning it is a no-op)")
    batch_size: int = Field(default=16, gt=0)
    num_actors: int = Field(default=2, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    cpus_per_task: float = Field(default=0.5, gt=0, description="decode/encode tasks")
    max_pixels: int = Field(default=64_000_000, gt=0, description="larger images become error rows")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    def night(self) -> _dt.date:
        return self.run_date or _dt.datetime.now(_dt.timezone.utc).date()

    def infer_config(self, output: str) -> InferJobConfig:
        """The InferJobConfig of one night (same source, checkpoint and actor settings)."""
        keep = ("source", "checkpoint", "batch_size", "num_actors", "num_gpus_per_actor", "cpus_per_actor",
                "cpus_per_task", "max_pixels", "storage")
        return InferJobConfig(output=output, **{k: getattr(self, k) for k in keep})


# --------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "model.up=bilinear"]`` -> [(path, YAML-parsed value)]."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{field}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(cls: type[C], data: dict | None = None, overrides: list[str] | None = None) -> C:
    tree = copy.deepcopy(data or {})  # never mutate the caller's dict
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


ENV_PREFIX = "env:"


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML from a local path or fsspec URL, apply overrides, validate."""
    data: dict = {}
    if path is not None and str(path).startswith(ENV_PREFIX):
        # env:NAME = the YAML text in environment variable NAME (how `segray submit` ships a
        # config that lives outside the uploaded working dir).
        name = str(path)[len(ENV_PREFIX):]
        if name not in os.environ:
            raise ConfigError(f"config: environment variable {name} is not set")
        data = yaml.safe_load(os.environ[name]) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    elif path is not None:
        import fsspec

        try:
            with fsspec.open(str(path), "r") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return build_config(cls, data, overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
