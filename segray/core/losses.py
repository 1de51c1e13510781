"""Segmentation losses on logits ``[B, K, H, W]`` and class maps ``[B, H, W]`` (int64).

Every term excludes ``ignore_index`` pixels and returns 0 (not NaN) for a batch with no
valid pixel. ``class_weights`` weight the per-pixel terms (ce, bce, focal), never dice:
multi-class as in ``F.cross_entropy`` (weighted mean), binary as BCE's ``pos_weight``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segray.config import LossConfig


def _valid(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of pixels that count, and a target safe to index with (ignored pixels -> class 0)."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool), target
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # den == 0 only when num == 0 (no valid pixel): give 0, and keep the gradient finite.
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class _PixelLoss(nn.Module):
    """Shared state for per-pixel terms: ignore_index and optional class weights."""

    def __init__(self, ignore_index: int | None, class_weights: list[float] | None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights)

    def _pixel_weights(self, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Multi-class: ``class_weights[target]`` on valid pixels, 0 elsewhere."""
        w = valid.float()
        if self.class_weights is not None:
            w = w * self.class_weights.to(target.device)[target]
        return w

    def _binary_weights(self, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Binary: ``pos_weight`` on foreground pixels (as in BCE), 1 on background, 0 if ignored."""
        w = valid.float()
        if self.class_weights is not None:
            w = torch.where(target == 1, w * self.class_weights.to(target.device)[0], w)
        return w


class CrossEntropy(_PixelLoss):
    """``F.cross_entropy`` (weighted mean over valid pixels) that gives 0 when none is valid."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, target = _valid(target, self.ignore_index)
        w = self._pixel_weights(target, valid)
        nll = F.cross_entropy(logits.float(), target, reduction="none")
        return _ratio((nll * w).sum(), w.sum())


class BinaryCrossEntropy(_PixelLoss):
    """BCE on one logit, mean over valid pixels; ``class_weights[0]`` is the ``pos_weight``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, target = _valid(target, self.ignore_index)
        bce = F.binary_cross_entropy_with_logits(logits.float()[:, 0], target.float(), reduction="none")
        return _ratio((bce * self._binary_weights(target, valid)).sum(), valid.sum().float())


class FocalLoss(_PixelLoss):
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)**gamma * log(p_t)``; gamma=0 is ce/bce exactly.

    Softmax for several logits (normalised like weighted ce), sigmoid for one (like bce).
    """

    def __init__(self, gamma: float, ignore_index: int | None, class_weights: list[float] | None) -> None:
        super().__init__(ignore_index, class_weights)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, target = _valid(target, self.ignore_index)
        logits = logits.float()
        if logits.shape[1] == 1:
            log_pt = -F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
            w, den = self._binary_weights(target, valid), valid.sum().float()
        else:
            log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
            w = self._pixel_weights(target, valid)
            den = w.sum()
        # -expm1 is 1 - p_t without cancellation; the clamp keeps pow's gradient finite at p_t == 1.
        modulator = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny) ** self.gamma
        return _ratio((-modulator * log_pt * w).sum(), den)


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - mean_c Dice_c`` with Laplace smoothing, over the whole batch.

    Softmax for several logits, averaged over ALL classes: a class absent from the batch
    scores ~1 when the model does not predict it and is penalised when it does (smoothing
    makes 0/0 read as a perfect score). One logit: sigmoid, Dice of the foreground only.
    """

    def __init__(self, ignore_index: int | None, smooth: float = 1.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid, target = _valid(target, self.ignore_index)
        logits = logits.float()
        if logits.shape[1] == 1:
            probs = torch.sigmoid(logits)
            onehot = target.unsqueeze(1).float()
        else:
            probs = logits.softmax(dim=1)
            onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
        mask = valid.unsqueeze(1).float()
        probs, onehot = probs * mask, onehot * mask
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        dice = (2 * inter + self.smooth) / (probs.sum(dims) + onehot.sum(dims) + self.smooth)
        return 1 - dice.mean()


class CombinedLoss(nn.Module):
    """Weighted sum of named terms; ``last_terms`` keeps the detached unweighted values for logging."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})
        self.last_terms: dict[str, torch.Tensor] = {}

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted value (with grad)."""
        return {name: loss(logits, target) for name, loss in self.losses.items()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values = self.terms(logits, target)
        # Tensors, not floats: .item() here would sync the GPU every step.
        self.last_terms = {name: v.detach() for name, v in values.items()}
        return sum(self.weights[name] * v for name, v in values.items())


def build_loss(cfg: LossConfig, num_classes: int, ignore_index: int | None) -> CombinedLoss:
    """``cfg.terms`` as one ``CombinedLoss``; a term named twice has its weights added."""
    n_weights = max(num_classes, 1)
    if cfg.class_weights == "auto":
        raise ValueError("class_weights 'auto': resolve it from the training labels first (median_frequency_weights)")
    if cfg.class_weights is not None and len(cfg.class_weights) != n_weights:
        raise ValueError(f"class_weights needs {n_weights} values, got {len(cfg.class_weights)}")
    weights: dict[str, float] = {}
    for term in cfg.terms:
        if term.name == "ce" and num_classes == 1:
            raise ValueError("loss 'ce' needs num_classes > 1; use 'bce' for one logit")
        if term.name == "bce" and num_classes != 1:
            raise ValueError("loss 'bce' needs num_classes=1")
        weights[term.name] = weights.get(term.name, 0.0) + term.weight
    make = {
        "ce": lambda: CrossEntropy(ignore_index, cfg.class_weights),
        "bce": lambda: BinaryCrossEntropy(ignore_index, cfg.class_weights),
        "focal": lambda: FocalLoss(cfg.focal_gamma, ignore_index, cfg.class_weights),
        "dice": lambda: DiceLoss(ignore_index),
    }
    return CombinedLoss({name: (w, make[name]()) for name, w in weights.items()})


def median_frequency_weights(class_pixels, image_pixels) -> list[float]:
    """Median frequency balancing (Eigen & Fergus; SegNet): ``freq[c]`` is the pixels of class c
    over the pixels of the training images where c occurs, and ``weight[c] = median(freq) / freq[c]``
    (median over the classes that occur). A class that never occurs gets weight 0: it has no pixel
    to weight. Ignored pixels must be left out of both counts.
    """
    pixels = np.asarray(class_pixels, dtype=np.float64)
    images = np.asarray(image_pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError("class_weights 'auto': the training labels hold no labelled pixel")
    freq = np.where(present, pixels / np.maximum(images, 1), 0.0)
    median = float(np.median(freq[present]))
    return [float(median / f) if f > 0 else 0.0 for f in freq]


def resolve_class_weights(cfg: LossConfig, num_classes: int, class_pixels, image_pixels) -> list[float]:
    """``class_weights: auto`` as the list the loss takes: per class, or for one binary logit
    bce's ``pos_weight`` (foreground over background weight)."""
    weights = median_frequency_weights(class_pixels, image_pixels)
    if num_classes == 1:
        return [weights[1] / weights[0] if weights[0] > 0 else 1.0]
    return weights
