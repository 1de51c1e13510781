"""The demo job (``segray demo``): a training run on generated scenes, semantic or instance."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from segray.config.base import _Strict
from segray.config.models import AnyModelConfig, MaskRCNNConfig, ModelConfig, model_names
from segray.config.train import OptimConfig, TrainLoopConfig


def demo_instance_model() -> MaskRCNNConfig:
    """The demo's Mask R-CNN: small inputs, small anchors, a light backbone update (CPU friendly)."""
    return MaskRCNNConfig(name="maskrcnn_resnet50_fpn", num_classes=4, trainable_backbone_layers=2, min_size=256,
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
    model: AnyModelConfig = Field(default_factory=lambda: ModelConfig(num_classes=5, depth=3, base_width=16))

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
        if self.task != self.model.family:
            raise ValueError(f"model.name: task {self.task!r} needs one of {model_names(self.task)}; "
                             f"{self.model.name!r} is a {self.model.family} model")
        return self

