"""Segmentation metrics from a confusion matrix (rows = target, cols = prediction).

The matrix is a plain ``torch.LongTensor`` so the training loop can all-reduce it across
DDP workers before reading the metrics. Semantics follow torchmetrics' multiclass metrics
with ``ignore_index`` outside ``[0, K)``: a class absent from both target and prediction
is left out of every macro mean. One deliberate difference: its per-class IoU/Dice is NaN
here (torchmetrics reports 0), so "not measured" cannot be read as "always wrong".
"""

from __future__ import annotations

import math

import torch


def metric_num_classes(num_classes: int) -> int:
    """Binary (one logit) is scored as two classes: background and foreground."""
    return max(num_classes, 2)


def logits_to_pred(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class map ``[B, H, W]`` from logits ``[B, K, H, W]``: argmax, or ``logit > 0`` for one logit."""
    if num_classes == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """``[K, K]`` int64 counts, ``cm[t, p]``; target pixels equal to ``ignore_index`` or outside ``[0, K)`` are skipped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _class_names(class_names: list[str] | None, k: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(k)]
    if len(class_names) == k - 1 == 1:  # binary given only its foreground name
        return ["background", *class_names]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}-class confusion matrix")
    return list(class_names)


def segmentation_metrics(cm: torch.Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """Pixel accuracy, mean class accuracy (recall), mIoU, frequency-weighted IoU, mean Dice,
    and per class ``iou/<name>``, ``dice/<name>`` (NaN for a class absent from target and prediction).

    A class that is predicted but absent from the target has recall 0/0, counted as 0 (as torchmetrics).
    Everything is NaN for an empty matrix.
    """
    cm = cm.detach().cpu().double()
    names = _class_names(class_names, cm.shape[0])
    tp = cm.diag()
    support = cm.sum(1)  # target pixels per class
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    nan = torch.full_like(tp, math.nan)

    def per_class(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(present, num / den.clamp_min(1), nan)

    iou = per_class(tp, support + predicted - tp)
    dice = per_class(2 * tp, support + predicted)
    recall = per_class(tp, support)
    total = cm.sum()
    freq = support / total
    out = {
        "pixel_accuracy": (tp.sum() / total).item(),
        "mean_class_accuracy": recall.nanmean().item(),
        "miou": iou.nanmean().item(),
        # Classes absent from the target have frequency 0; nansum drops their NaN IoU.
        "fwiou": (freq * iou).nansum().item() if total > 0 else math.nan,
        "mean_dice": dice.nanmean().item(),
    }
    for i, name in enumerate(names):
        out[f"iou/{name}"] = iou[i].item()
        out[f"dice/{name}"] = dice[i].item()
    return out


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; all-reduce ``.cm`` across workers before ``compute()``."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, class_names: list[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.reset()

    def reset(self) -> None:
        k = metric_num_classes(self.num_classes)
        self.cm = torch.zeros(k, k, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits_to_pred(logits, self.num_classes)
        k = metric_num_classes(self.num_classes)
        # The matrix follows the data's device, so a GPU worker can all-reduce it with NCCL.
        self.cm = self.cm.to(logits.device) + confusion_matrix(pred, target, k, self.ignore_index)

    def compute(self) -> dict[str, float]:
        return segmentation_metrics(self.cm, self.class_names)
