"""Typed job configs: one per job, loadable from YAML, overridable with ``--set a.b=value``.

Every model forbids unknown fields, so a typo fails before any cluster work starts and the
error names the field (``train.epochs: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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


class ModelConfig(_Strict):
    name: Literal["unet", "fcn_resnet50", "deeplabv3_resnet50"] = "unet"
    in_channels: int = Field(default=3, gt=0)
    num_classes: int = Field(default=2, gt=0, description="1 = binary with one logit")
    depth: int = Field(default=4, ge=1, le=7)
    base_width: int = Field(default=32, gt=0)
    batch_norm: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    down: Literal["maxpool", "conv"] = "maxpool"
    up: Literal["transpose", "bilinear"] = "transpose"
    weights: Optional[str] = Field(default=None, description="local/fsspec path of a state dict or segray checkpoint")


class LossTerm(_Strict):
    name: Literal["ce", "bce", "dice", "focal"]
    weight: float = Field(default=1.0, gt=0)


class LossConfig(_Strict):
    terms: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="ce"), LossTerm(name="dice")])
    class_weights: Optional[list[float]] = None
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


class DataConfig(_Strict):
    source: SourceConfig
    class_names: list[str] = Field(default_factory=lambda: ["background", "foreground"])
    ignore_index: Optional[int] = Field(default=None, description="label value excluded from loss and metrics")
    bands: Optional[list[int]] = Field(default=None, description="0-based bands to read, in order; None = all")
    image_size: Optional[int] = Field(default=None, gt=0, description="resize (square) before training; None = as is")
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    storage: StorageOptions = Field(default_factory=StorageOptions)


class OptimConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)


class TrainLoopConfig(_Strict):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=8, gt=0, description="per worker")
    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    amp: bool = Field(default=True, description="mixed precision; only used on GPU")
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

    @model_validator(mode="after")
    def _consistent(self) -> "TrainJobConfig":
        n = self.model.num_classes
        names = self.data.class_names
        if len(names) != max(n, 2) and not (n == 1 and len(names) in (1, 2)):
            raise ValueError(f"data.class_names has {len(names)} names but model.num_classes is {n}")
        if self.loss.class_weights is not None and len(self.loss.class_weights) != max(n, 1):
            raise ValueError(f"loss.class_weights needs {n} values")
        if self.model.num_classes == 1 and any(t.name == "ce" for t in self.loss.terms):
            raise ValueError("loss.terms: use 'bce', not 'ce', with model.num_classes=1")
        if self.model.num_classes > 1 and any(t.name == "bce" for t in self.loss.terms):
            raise ValueError("loss.terms: 'bce' needs model.num_classes=1")
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
    storage: StorageOptions = Field(default_factory=StorageOptions)


class DemoJobConfig(_Strict):
    workdir: str = "segray-demo"
    num_images: int = Field(default=48, gt=1)
    image_size: int = Field(default=128, ge=32)
    seed: int = 0
    train: TrainLoopConfig = Field(default_factory=lambda: TrainLoopConfig(epochs=3, batch_size=8, patience=None))
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(num_classes=5, depth=3, base_width=16))


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


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML from a local path or fsspec URL, apply overrides, validate."""
    data: dict = {}
    if path is not None:
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
