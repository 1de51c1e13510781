"""Optimizer and learning-rate schedule from ``OptimConfig``: AdamW or SGD, per-epoch cosine/step
decay, and a linear warm-up over the first optimizer steps; fine-tuning's parameter groups
(``FinetuneConfig``: the encoder's own LR factor, 0 while frozen) and frozen encoder BatchNorm."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import nn

from segray.config import OptimConfig
from segray.config.train import FinetuneConfig

ParamsOrGroups = Union[Iterable[nn.Parameter], Iterable[dict[str, Any]]]


def build_optimizer(cfg: OptimConfig, params: ParamsOrGroups) -> torch.optim.Optimizer:
    """AdamW or SGD over parameters or parameter groups (``param_groups``); parameters that do not
    require grad (Mask R-CNN's frozen backbone, frozen BatchNorm) stay out."""
    items = list(params)
    if items and isinstance(items[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    else:
        params = [p for p in items if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, epochs: int, epoch: int, step: int, total_steps: int | None = None) -> float:
    """Multiplier of ``cfg.lr`` during ``epoch`` (0-based) at global optimizer ``step`` (0-based).

    poly: ``(1 - step / total_steps) ** poly_power`` per step (torchvision's segmentation
    reference); cosine: ``(1 + cos(pi * epoch / epochs)) / 2``; step: ``gamma ** (epoch // step_size)``;
    warm-up: linear from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``.
    """
    if cfg.schedule == "poly":
        if not total_steps:
            raise ValueError("schedule 'poly' needs the run's total number of optimizer steps")
        main = (1.0 - min(step, total_steps) / total_steps) ** cfg.poly_power
    elif cfg.schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    elif cfg.schedule == "step":
        main = cfg.gamma ** (epoch // cfg.step_size)
    else:
        main = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        main *= cfg.warmup_factor * (1 - alpha) + alpha
    return main


def set_lr(opt: torch.optim.Optimizer, lr: float, scales: dict[str, float] | None = None) -> None:
    """Every group's LR: ``lr`` times its factor in ``scales`` (by the group's ``name``; 1 if absent)."""
    for group in opt.param_groups:
        group["lr"] = lr * (scales or {}).get(group.get("name", ""), 1.0)


# ------------------------------------------------------------------ fine-tuning


def param_groups(model: nn.Module, encoder: nn.Module | None) -> list[dict[str, Any]]:
    """Two named groups, ``encoder`` and ``rest`` (the same groups, in the same order, on every
    rank and every resume: the optimizer state loads by position)."""
    if encoder is None:
        return [{"params": list(model.parameters()), "name": "rest"}]
    own = {id(p) for p in encoder.parameters()}
    return [{"params": list(encoder.parameters()), "name": "encoder"},
            {"params": [p for p in model.parameters() if id(p) not in own], "name": "rest"}]


def group_scales(cfg: FinetuneConfig, epoch: int) -> dict[str, float]:
    """LR factor of each group during ``epoch`` (0-based): the encoder's is 0 while frozen.

    An LR of 0 freezes without touching ``requires_grad`` (which DDP fixes when it wraps the
    model): SGD and AdamW (decoupled decay ``p *= 1 - lr * wd``) then leave the weights as they are.
    """
    return {"encoder": 0.0 if epoch < cfg.freeze_encoder_epochs else cfg.encoder_lr_mult, "rest": 1.0}


def encoder_batch_norms(encoder: nn.Module) -> list[nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norm(encoder: nn.Module) -> list[nn.Module]:
    """Fix the encoder's BatchNorm affine parameters (call before DDP wraps the model and before
    the optimizer is built); returns the layers for ``batch_norm_eval`` after every ``train()``."""
    layers = encoder_batch_norms(encoder)
    for m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return layers


def batch_norm_eval(layers: Iterable[nn.Module]) -> None:
    """Running statistics stay fixed: eval mode, whatever the model's ``train()`` set."""
    for m in layers:
        m.eval()
