import math

import pytest
import torch
import torch.nn.functional as F

from segray.config import LossConfig, LossTerm
from segray.core.losses import build_loss

IGNORE = 255


def _loss(name: str, classes: int, ignore_index: int | None = IGNORE, **cfg):
    return build_loss(LossConfig(terms=[LossTerm(name=name)], **cfg), classes, ignore_index)


def _batch(classes: int, seed: int = 0, ignore_fraction: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 9, 11, generator=g)
    target = torch.randint(0, max(classes, 2), (2, 9, 11), generator=g)
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = IGNORE
    return logits, target


TERMS = [("ce", 4), ("dice", 4), ("focal", 4), ("bce", 1), ("dice", 1), ("focal", 1)]


@pytest.mark.parametrize("name, classes", TERMS)
def test_terms_finite_non_negative(name, classes):
    logits, target = _batch(classes)
    value = _loss(name, classes)(logits, target)
    assert value.ndim == 0 and torch.isfinite(value) and value >= 0


@pytest.mark.parametrize("name, classes", TERMS)
def test_ignored_pixels_do_not_count(name, classes):
    logits, target = _batch(classes)
    loss = _loss(name, classes)
    ignored = target == IGNORE
    changed = logits.clone()
    changed[ignored.unsqueeze(1).expand_as(logits)] = 50.0  # wildly different logits where ignored
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)


@pytest.mark.parametrize("name, classes", TERMS)
def test_all_ignored_batch_gives_zero_and_finite_grad(name, classes):
    logits, target = _batch(classes)
    logits.requires_grad_(True)
    value = _loss(name, classes)(logits, torch.full_like(target, IGNORE))
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("classes", [1, 4])
def test_perfect_prediction_has_zero_dice(classes):
    _, target = _batch(classes)
    if classes == 1:
        logits = torch.where(target == 1, 30.0, -30.0).float().unsqueeze(1)
    else:
        logits = 60.0 * F.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2).float()
    assert _loss("dice", classes)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_ce_matches_torch_with_class_weights():
    logits, target = _batch(4)
    weights = [0.5, 1.0, 2.0, 4.0]
    ours = _loss("ce", 4, class_weights=weights)(logits, target)
    ref = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours.item() != pytest.approx(_loss("ce", 4)(logits, target).item(), rel=1e-3)


def test_bce_matches_torch_with_pos_weight():
    logits, target = _batch(1)
    valid = target != IGNORE
    ours = _loss("bce", 1, class_weights=[3.0])(logits, target)
    ref = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], target[valid].float(), pos_weight=torch.tensor(3.0)
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("classes, base", [(4, "ce"), (1, "bce")])
def test_focal_with_gamma_zero_is_cross_entropy(classes, base):
    logits, target = _batch(classes)
    weights = [0.5, 1.0, 2.0, 4.0][: max(classes, 1)] if classes > 1 else [2.0]
    focal = _loss("focal", classes, focal_gamma=0.0, class_weights=weights)(logits, target)
    assert focal.item() == pytest.approx(_loss(base, classes, class_weights=weights)(logits, target).item(), rel=1e-6)
    # gamma > 0 down-weights easy pixels, so it can only be smaller.
    assert _loss("focal", classes, focal_gamma=2.0)(logits, target) < _loss(base, classes)(logits, target)


def test_focal_gradient_finite_on_certain_pixels():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 200.0  # p_t == 1.0 exactly in float32
    logits.requires_grad_(True)
    _loss("focal", 3, focal_gamma=0.5)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


def test_combined_is_weighted_sum_and_keeps_terms():
    logits, target = _batch(4)
    cfg = LossConfig(terms=[LossTerm(name="ce", weight=0.5), LossTerm(name="dice", weight=2.0)])
    loss = build_loss(cfg, 4, IGNORE)
    total = loss(logits, target)
    terms = loss.terms(logits, target)
    assert set(loss.last_terms) == {"ce", "dice"}
    assert total.item() == pytest.approx(0.5 * terms["ce"].item() + 2.0 * terms["dice"].item(), rel=1e-6)
    assert not loss.last_terms["ce"].requires_grad


def test_no_ignore_index_uses_every_pixel():
    logits, target = _batch(3, ignore_fraction=0.0)
    ours = _loss("ce", 3, ignore_index=None)(logits, target)
    assert math.isclose(ours.item(), F.cross_entropy(logits, target).item(), rel_tol=1e-6)


@pytest.mark.parametrize(
    "name, classes, weights", [("ce", 1, None), ("bce", 3, None), ("ce", 3, [1.0, 2.0])]
)
def test_inconsistent_config_rejected(name, classes, weights):
    with pytest.raises(ValueError):
        _loss(name, classes, class_weights=weights)
