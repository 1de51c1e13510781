"""Test-time augmentation: logits averaged over the identity and flipped / rotated copies of a batch.

Each transform is applied to the input, the model runs on it, and the inverse transform brings
the logits back to the input's frame before they are averaged with the identity's.

Logits are averaged, not probabilities: every runtime returns logits, the mean then works the
same for a one-logit binary model (sigmoid) and for K classes (softmax), and the class map and
confidence are taken from the mean exactly as without TTA. (Averaging logits is the geometric
mean of the softmax up to normalisation; the two differ only where the copies disagree.)

``rot90`` on a non-square ``H x W`` input runs the model on ``W x H``: fine for a fully
convolutional model that takes any size (U-Net pads to its pooling grid and crops back; the
tests check that rotating and rotating back gives the identity for an equivariant model).
Pure torch; no Ray.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# name -> (forward, inverse) on [B, C, H, W] tensors
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "hflip": (lambda x: torch.flip(x, dims=(-1,)), lambda y: torch.flip(y, dims=(-1,))),
    "vflip": (lambda x: torch.flip(x, dims=(-2,)), lambda y: torch.flip(y, dims=(-2,))),
    "rot90": (lambda x: torch.rot90(x, 1, dims=(-2, -1)), lambda y: torch.rot90(y, -1, dims=(-2, -1))),
}


def check_transforms(names: Sequence[str]) -> list[str]:
    """``names`` as a list, refusing unknown or repeated ones."""
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"tta: unknown transform {unknown[0]!r}; known: {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tta: a transform is listed twice: {list(names)}")
    return list(names)


def tta_logits(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               transforms: Sequence[str] = ()) -> torch.Tensor:
    """``run(x)`` averaged with ``inverse(run(forward(x)))`` for each listed transform (float32).

    With no transforms this is ``run(x)`` itself: one forward pass, nothing added.
    """
    total = run(x).float()
    for name in transforms:
        forward, inverse = TRANSFORMS[name]
        total = total + inverse(run(forward(x).contiguous()).float())
    return total / (1 + len(transforms)) if transforms else total
