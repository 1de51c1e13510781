"""Model registry: ``build_model(cfg)`` -> ``nn.Module``; one ``ModelSpec`` per model name.

A builder registers with ``@register_model(name, family=..., align=..., config=...)`` (in the
style of torchvision's ``@register_model``). Its entry says everything the rest of segray asks of
a model without building it:

- ``family``: ``"semantic"`` (takes ``float32 [B, C, H, W]``, returns logits ``[B, K, H, W]`` at
  the input's ``H, W``; ``K = num_classes``, 1 for binary, read as ``sigmoid > 0.5``) or
  ``"instance"`` (Mask R-CNN's list-of-images interface, see ``maskrcnn``);
- ``align``: the output stride tile offsets must be multiples of for the pooling grids of
  neighbouring tiles to line up (scene tiling); an int, or a function of the config;
- ``radius``: how far an output pixel sees (its receptive-field radius), where it is known: scene
  stitching takes each pixel from one tile's core, exactly, when the margin covers it;
- ``encoder``: where the model's encoder is (``model -> nn.Module``, or None for a model
  without one): what fine-tuning freezes, gives its own LR and whose BatchNorm it can freeze;
- ``config``: the model's config class in ``segray.config`` (the config layer cannot import this
  registry, so the names ``AnyModelConfig`` accepts are listed there; a unit test checks the two
  agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import fsspec
import torch
from torch import nn

from segray.config import Family, ModelConfig

ModelBuilder = Callable[..., nn.Module]  # (cfg) or, with handles_weights, (cfg, storage_options)
Align = Union[int, Callable[[Any], int]]
EncoderOf = Callable[[nn.Module], nn.Module]  # the built (bare, not DDP-wrapped) model -> its encoder


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder and what is known of it before it is built."""

    name: str
    builder: ModelBuilder
    family: Family
    align: Align
    config: type[ModelConfig]
    handles_weights: bool = False  # the builder loads cfg.weights itself (Mask R-CNN: its own rules)
    encoder: EncoderOf | None = None  # None: no encoder that fine-tuning controls apply to
    radius: Align | None = None  # receptive-field radius in px (a function of the config); None: unknown

    def receptive_radius(self, cfg: ModelConfig) -> int | None:
        """How far an output pixel sees (``radius`` for this config), None when not known."""
        return None if self.radius is None else int(self.radius(cfg) if callable(self.radius) else self.radius)

    def output_align(self, cfg: ModelConfig) -> int:
        """``align`` for this config (U-Net: ``2**depth``)."""
        return int(self.align(cfg) if callable(self.align) else self.align)


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, config: type[ModelConfig], family: Family | None = None, align: Align = 1,
                   handles_weights: bool = False, encoder: EncoderOf | None = None,
                   radius: Align | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register the decorated builder as model ``name`` (``family`` defaults to the config class's)."""
    family = family or config.family
    if family != config.family:
        raise ValueError(f"model {name!r}: family {family!r}, but {config.__name__} is a {config.family!r} config")

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelSpec(name, builder, family, align, config, handles_weights, encoder, radius)
        return builder

    return decorator


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_family(name: str) -> Family:
    return model_spec(name).family


def model_encoder(name: str, model: nn.Module) -> nn.Module | None:
    """The encoder of a built model ``name`` (DDP unwrapped), None when its entry names none."""
    spec = model_spec(name)
    return spec.encoder(getattr(model, "module", model)) if spec.encoder is not None else None


def tile_align(model_config: ModelConfig | Mapping[str, Any]) -> int:
    """The factor tile offsets must be multiples of, for a config or a checkpoint's ``model_config``."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_checkpoint(model_config)
    return model_spec(cfg.name).output_align(cfg)


def receptive_radius(model_config: ModelConfig | Mapping[str, Any]) -> int | None:
    """The receptive-field radius of a config or a checkpoint's ``model_config``; None: unknown."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_checkpoint(model_config)
    return model_spec(cfg.name).receptive_radius(cfg)


def num_output_channels(cfg: ModelConfig) -> int:
    """Logit channels: one per class, a single logit for binary."""
    return cfg.num_classes


def load_weights(model: nn.Module, path: str, storage_options: dict | None = None) -> nn.Module:
    """Load a raw state dict or a segray checkpoint payload (``{'model_state': ...}``) into ``model``.

    ``path`` is a local path or any fsspec URL. Keys saved from a DDP-wrapped model lose
    their ``module.`` prefix. Loading is strict, so a config/weights mismatch fails loudly.
    """
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a checkpoint payload, got {type(state).__name__}")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model


def build_model(cfg: ModelConfig, storage_options: dict | None = None) -> nn.Module:
    """Build ``cfg.name``; load ``cfg.weights`` (opened with ``storage_options``) when set."""
    spec = model_spec(cfg.name)
    if not isinstance(cfg, spec.config):
        raise TypeError(f"model {cfg.name!r} takes a {spec.config.__name__}, got {type(cfg).__name__}")
    if spec.handles_weights:
        return spec.builder(cfg, storage_options)
    model = spec.builder(cfg)
    if cfg.weights:
        load_weights(model, cfg.weights, storage_options)
    return model


# Imported last: the modules register themselves with the decorator defined above.
from segray.core.models import maskrcnn, smp, torchvision_seg, unet  # noqa: E402,F401
