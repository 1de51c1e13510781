"""Training sections (loss, optimizer, loop) and the training job, which checks that its data,
model and loss fit together (a model's family decides which data formats and losses apply)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from segray.config.base import _Strict
from segray.config.data import DataConfig
from segray.config.models import AnyModelConfig, UNetConfig, model_names

# What an instance run reports each epoch (COCOeval over the validation set; -1 where undefined).
INSTANCE_METRICS = tuple(
    f"val_{t}_{m}" for t in ("segm", "bbox")
    for m in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar", "ar_small",
              "ar_medium", "ar_large")
) + ("train_loss",)


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


class FinetuneConfig(_Strict):
    """Fine-tuning a pretrained encoder (models whose registry entry names an encoder).

    Freezing is done with the learning rate, not ``requires_grad``: the encoder's parameter
    group gets LR 0 for the first ``freeze_encoder_epochs`` epochs, so DDP's set of trained
    parameters never changes mid-run (AdamW and SGD scale weight decay by the LR, so nothing moves).
    """

    freeze_encoder_epochs: int = Field(default=0, ge=0, description="encoder LR 0 for this many first epochs")
    encoder_lr_mult: float = Field(default=1.0, ge=0, description="encoder LR = optim.lr x this (after the freeze)")
    encoder_batch_norm: Literal["train", "frozen"] = Field(
        default="train", description="frozen: the encoder's BatchNorm layers stay in eval mode with fixed "
        "statistics and affine parameters (small batches on pretrained weights)")

    @property
    def active(self) -> bool:
        """True when any field asks something of the model's encoder."""
        return self != FinetuneConfig()


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
    model: AnyModelConfig = Field(default_factory=UNetConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
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
        instance_model = self.model.family == "instance"
        if self.data.task != self.model.family:  # the data's task and the model's family must agree
            raise ValueError(f"model.name: data.format {self.data.format!r} ({self.data.task} data) needs one of "
                             f"{model_names(self.data.task)}; {self.model.name!r} is a {self.model.family} model")
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
