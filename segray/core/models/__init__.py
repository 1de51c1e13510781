"""Model registry: ``build_model(ModelConfig)`` -> ``nn.Module`` returning logits ``[B, K, H, W]``.

Every model takes ``float32 [B, C, H, W]`` and returns logits at the input's ``H, W``;
``K = num_classes`` (1 for binary, read as ``sigmoid > 0.5``).
"""

from __future__ import annotations

from typing import Callable

import fsspec
import torch
from torch import nn

from segray.config import ModelConfig

ModelBuilder = Callable[[ModelConfig], nn.Module]

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


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
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; available: {sorted(MODELS)}")
    builder = MODELS[cfg.name]
    if getattr(builder, "handles_weights", False):  # Mask R-CNN: full or backbone weights, its own rules
        return builder(cfg, storage_options)
    model = builder(cfg)
    if cfg.weights:
        load_weights(model, cfg.weights, storage_options)
    return model


# Imported last: the modules register themselves with the decorator defined above.
from segray.core.models import maskrcnn, torchvision_seg, unet  # noqa: E402,F401
