"""Model configs: one class per model, picked by ``name``; each takes only its own fields.

``ModelConfig`` holds what every model has (name, bands, classes, weights, SyncBatchNorm) and is
the base of ``UNetConfig``, ``TorchvisionSegConfig``, ``SmpConfig`` and ``MaskRCNNConfig``. Job configs type
their ``model`` section ``AnyModelConfig``: the union of those classes keyed by ``name``
(``"unet"`` when absent, so configs written before the union keep loading). A field that belongs
to another model fails on one line naming it, e.g. ``model.min_size: not a field of model 'unet'
(it belongs to maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2)``.

``ModelConfig(**fields)`` and ``ModelConfig.model_validate(d)`` dispatch the same way, so code
that builds a config by hand needs no class of its own; ``ModelConfig.from_checkpoint(d)``
rebuilds one from a checkpoint's ``model_config``, old flat dumps included.

This module is the config layer: it imports nothing of segray beyond ``segray.config``. The
model registry (``segray.core.models``) points each registered builder at its class here, and a
unit test checks that the registry's names and ``MODEL_CONFIGS`` are the same set. To add a
model: a config class here (listed in ``_CLASSES``), a builder registered with
``@register_model(name, family=..., align=..., config=...)`` in ``segray/core/models/``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Union, get_args

from pydantic import Field, ValidationError, WrapValidator, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from segray.config.base import _Strict

Family = Literal["semantic", "instance"]
DEFAULT_MODEL = "unet"  # what a model section without ``name`` is


class ModelConfig(_Strict):
    """The fields every model takes; the base of each model's own config (see the module doc).

    ``ModelConfig(**fields)`` returns the subclass ``fields["name"]`` picks (``UNetConfig``
    without a name), ``ModelConfig.model_validate(d)`` likewise.
    """

    family: ClassVar[Family] = "semantic"  # the task the model serves; the registry entry repeats it

    name: str = Field(description="the model: picks its config class here and its builder in the registry")
    in_channels: int = Field(default=3, gt=0)
    num_classes: int = Field(
        default=2, gt=0, description="semantic: 1 = binary with one logit; Mask R-CNN: counts the background")
    weights: Optional[str] = Field(default=None, description="local/fsspec path of a state dict or segray checkpoint")
    sync_batch_norm: bool = Field(
        default=False, description="SyncBatchNorm across workers (small per-worker batches); GPU workers only")

    def __new__(cls, *args: Any, **data: Any) -> "ModelConfig":
        if cls is ModelConfig:  # dispatch on name; an unknown name stays here and fails validation
            cls = MODEL_CONFIGS.get(_name_of(data), ModelConfig)
        return super().__new__(cls)

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in MODEL_CONFIGS:
            raise ValueError(_unknown(v))
        return v

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "ModelConfig":  # type: ignore[override]
        if cls is ModelConfig and not isinstance(obj, ModelConfig):
            return _validate_model(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @classmethod
    def from_checkpoint(cls, dump: Mapping[str, Any]) -> "ModelConfig":
        """The config a checkpoint's ``model_config`` describes (any segray version).

        Checkpoints written before the per-model configs hold the flat config: every model's
        fields, most at their defaults. A field that another model owns is dropped, whatever
        its value: this model's builder never read it. Any other unknown field still fails.
        """
        data = dict(dump)
        target = MODEL_CONFIGS.get(_name_of(data))
        if target is not None:
            foreign = {f for c in _CLASSES for f in c.model_fields} - set(target.model_fields)
            data = {k: v for k, v in data.items() if k not in foreign}
        return _validate_model(data)


class UNetConfig(ModelConfig):
    """``unet``: a U-Net; tile offsets align to ``2**depth`` (the registry's align)."""

    name: Literal["unet"] = "unet"
    depth: int = Field(default=4, ge=1, le=7)
    base_width: int = Field(default=32, gt=0)
    batch_norm: bool = True
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    down: Literal["maxpool", "conv"] = "maxpool"
    up: Literal["transpose", "bilinear"] = "transpose"


class TorchvisionSegConfig(ModelConfig):
    """torchvision's FCN / DeepLabV3 on a ResNet-50 (output stride 8); no fields of their own."""

    name: Literal["fcn_resnet50", "deeplabv3_resnet50"]


SMP_ARCHS = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet",
             "Segformer", "UPerNet")


class SmpConfig(ModelConfig):
    """``smp``: a segmentation_models_pytorch architecture on any smp or timm (``tu-...``) encoder.

    The encoder name is checked against smp's and timm's lists when the model is built (the
    config layer does not import them). Tile offsets align to the encoder's output stride,
    which the registry reads from the built encoder.
    """

    name: Literal["smp"] = "smp"
    # PAN (pools its deepest features 8x more) and DPT (ViT encoders only) are left out.
    arch: Literal[SMP_ARCHS] = Field(default="Unet", description="smp architecture")  # type: ignore[valid-type]
    encoder: str = Field(default="resnet34", min_length=1,
                         description="smp encoder (resnet18, efficientnet-b0, mit_b0, ...) or tu-<timm model>")
    encoder_depth: int = Field(default=5, ge=3, le=5, description="encoder stages used (output stride 2**depth)")
    encoder_weights: Optional[str] = Field(
        default=None, description="encoder weights: a local path or fsspec URL (s3://...) of a state dict "
        "(timm/torchvision keys; 3-band stems are adapted to in_channels), a Hugging Face / timm cache "
        "folder, or a name smp downloads itself (imagenet, ...: needs network on every worker)")


class MaskRCNNConfig(ModelConfig):
    """torchvision's Mask R-CNN (ResNet-50 FPN, v1 and v2); ``num_classes`` counts the background."""

    family: ClassVar[Family] = "instance"

    name: Literal["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
    backbone_weights: Optional[str] = Field(
        default=None, description="local/fsspec path of a ResNet-50 state dict for the backbone only")
    trainable_backbone_layers: int = Field(
        default=3, ge=0, le=5, description="trainable ResNet stages from the top (5 = all, 0 = frozen)")
    frozen_batch_norm: bool = Field(
        default=False, description="FrozenBatchNorm2d in the backbone (use with pretrained weights)")
    min_size: int = Field(default=800, gt=0, description="resize so the short side is min_size ...")
    max_size: int = Field(default=1333, gt=0, description="... and the long side at most max_size")
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 256, 512], description="one anchor size per FPN level (5)")
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], description="anchor aspect ratios")
    box_score_thresh: float = Field(default=0.05, ge=0, le=1, description="minimum detection score")
    box_nms_thresh: float = Field(default=0.5, gt=0, le=1, description="per-class NMS IoU")
    box_detections_per_img: int = Field(default=100, gt=0, description="most detections per image")
    mask_threshold: float = Field(default=0.5, gt=0, lt=1, description="mask probability -> pixel")
    rpn_proposals_train: int = Field(default=2000, gt=0, description="RPN proposals kept in training")
    rpn_proposals_test: int = Field(default=1000, gt=0, description="RPN proposals kept in inference")
    box_batch_size_per_image: int = Field(default=512, gt=0, description="RoIs sampled per training image")

    @model_validator(mode="after")
    def _detection_fields(self) -> "MaskRCNNConfig":
        if self.num_classes < 2:
            raise ValueError("num_classes: Mask R-CNN counts the background, so it needs at least 2")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) <= 0:
            raise ValueError("anchor_sizes: give 5 positive sizes, one per FPN level")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError("aspect_ratios: give positive ratios")
        return self


# --------------------------------------------------------------------------- the union

_CLASSES: tuple[type[ModelConfig], ...] = (UNetConfig, TorchvisionSegConfig, SmpConfig, MaskRCNNConfig)
# name -> config class: exactly the names AnyModelConfig accepts (and the registry registers).
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    name: cls for cls in _CLASSES for name in get_args(cls.model_fields["name"].annotation)
}
SEMANTIC_MODELS = tuple(n for n, c in MODEL_CONFIGS.items() if c.family == "semantic")
INSTANCE_MODELS = tuple(n for n, c in MODEL_CONFIGS.items() if c.family == "instance")


def model_config_class(name: str) -> type[ModelConfig]:
    """The config class of model ``name``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(_unknown(name))
    return MODEL_CONFIGS[name]


def model_names(family: Family | None = None) -> list[str]:
    return [n for n, c in MODEL_CONFIGS.items() if family is None or c.family == family]


def _name_of(data: Mapping[str, Any]) -> Any:
    name = data.get("name", DEFAULT_MODEL)
    return name if isinstance(name, str) else None


def _unknown(name: Any) -> str:
    return f"unknown model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}"


def _explain(err: ValidationError, name: str) -> ValidationError:
    """Spell out fields that are not this model's: whose they are, or which fields it has."""
    if not any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in err.errors()):
        return err
    own = MODEL_CONFIGS[name].model_fields
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            field = str(e["loc"][0])
            owners = [n for n, c in MODEL_CONFIGS.items() if field in c.model_fields]
            msg = f"not a field of model {name!r} " + (
                f"(it belongs to {', '.join(owners)})" if owners else f"(its fields: {', '.join(own)})")
        lines.append(InitErrorDetails(type=PydanticCustomError(e["type"], msg), loc=e["loc"], input=e["input"]))
    return ValidationError.from_exception_data(err.title, lines)


def _validate_model(value: Any, **kwargs: Any) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError.from_exception_data("ModelConfig", [InitErrorDetails(
            type=PydanticCustomError("model_type", "give a mapping of model fields"), loc=(), input=value)])
    name = _name_of(value)
    if name not in MODEL_CONFIGS:
        raise ValidationError.from_exception_data("ModelConfig", [InitErrorDetails(
            type=PydanticCustomError("unknown_model", _unknown(value.get("name"))), loc=("name",),
            input=value.get("name"))])
    try:
        return MODEL_CONFIGS[name].model_validate(value, **kwargs)
    except ValidationError as err:
        raise _explain(err, name) from None


def _dispatch(value: Any, handler: Any) -> ModelConfig:
    return _validate_model(value)


# The type of a job's ``model`` section: each model's class, picked by ``name`` (default unet).
AnyModelConfig = Annotated[Union[_CLASSES], WrapValidator(_dispatch)]  # type: ignore[valid-type]
