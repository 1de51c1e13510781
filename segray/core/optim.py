"""Optimizer and learning-rate schedule from ``OptimConfig``: AdamW or SGD, per-epoch cosine/step
decay, and a linear warm-up over the first optimizer steps."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from segray.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # frozen layers (Mask R-CNN backbone) stay out
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


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
