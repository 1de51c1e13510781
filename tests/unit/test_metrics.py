import math

import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from segray.core.metrics import (
    SegmentationMeter,
    confusion_matrix,
    logits_to_pred,
    metric_num_classes,
    segmentation_metrics,
)

K = 6
IGNORE = 255


def _labels(seed: int):
    """Random maps where class 4 is only predicted (never in target) and class 5 appears nowhere."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 5, (3, 17, 19), generator=g)
    target = torch.randint(0, 4, (3, 17, 19), generator=g)
    # Bias towards agreement so the scores are not all near chance.
    agree = torch.rand(target.shape, generator=g) < 0.5
    target = torch.where(agree & (pred < 4), pred, target)
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
    return pred, target


def _tm(metric_cls, **kw):
    return metric_cls(num_classes=K, ignore_index=IGNORE, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed):
    pred, target = _labels(seed)
    cm = confusion_matrix(pred, target, K, IGNORE)
    assert torch.equal(cm, _tm(MulticlassConfusionMatrix)(pred, target))
    m = segmentation_metrics(cm)

    assert m["pixel_accuracy"] == pytest.approx(_tm(MulticlassAccuracy, average="micro")(pred, target).item(), abs=1e-6)
    assert m["mean_class_accuracy"] == pytest.approx(
        _tm(MulticlassAccuracy, average="macro")(pred, target).item(), abs=1e-6
    )
    assert m["miou"] == pytest.approx(_tm(MulticlassJaccardIndex, average="macro")(pred, target).item(), abs=1e-6)
    assert m["mean_dice"] == pytest.approx(_tm(MulticlassF1Score, average="macro")(pred, target).item(), abs=1e-6)

    iou = _tm(MulticlassJaccardIndex, average=None)(pred, target)
    dice = _tm(MulticlassF1Score, average=None)(pred, target)
    for c in range(5):
        assert m[f"iou/{c}"] == pytest.approx(iou[c].item(), abs=1e-6)
        assert m[f"dice/{c}"] == pytest.approx(dice[c].item(), abs=1e-6)
    # Deliberate difference: torchmetrics reports 0 for a class seen nowhere, we report NaN.
    assert iou[5].item() == 0.0 and dice[5].item() == 0.0
    assert math.isnan(m["iou/5"]) and math.isnan(m["dice/5"])
    assert m["iou/4"] == 0.0  # predicted, never true: a real miss, counted in the mean


def test_fwiou_and_perfect_prediction():
    cm = torch.tensor([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    m = segmentation_metrics(cm, ["sea", "land", "cloud"])
    iou = [8 / 11, 4 / 7]
    assert m["fwiou"] == pytest.approx((10 * iou[0] + 5 * iou[1]) / 15, abs=1e-12)
    assert m["miou"] == pytest.approx(sum(iou) / 2, abs=1e-12)
    assert math.isnan(m["iou/cloud"]) and m["iou/sea"] == pytest.approx(iou[0])

    perfect = segmentation_metrics(torch.diag(torch.tensor([5, 3, 2])))
    assert all(perfect[k] == 1.0 for k in ("pixel_accuracy", "mean_class_accuracy", "miou", "fwiou", "mean_dice"))


def test_empty_matrix_is_nan():
    m = segmentation_metrics(torch.zeros(2, 2, dtype=torch.long))
    assert all(math.isnan(v) for v in m.values())


def test_target_outside_range_is_skipped_and_bad_pred_rejected():
    target = torch.tensor([0, 1, 2, -1, 7])
    pred = torch.tensor([0, 1, 1, 0, 0])
    assert confusion_matrix(pred, target, 3, None).sum() == 3
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3, None)


def test_ignore_index_inside_class_range_drops_those_pixels():
    pred, target = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0])
    cm = confusion_matrix(pred, target, 3, ignore_index=0)
    assert cm[0].sum() == 0 and cm.sum() == 2


def test_binary_one_logit():
    logits = torch.tensor([[[[-2.0, 0.5], [3.0, -0.1]]]])  # [1, 1, 2, 2]
    target = torch.tensor([[[0, 1], [0, IGNORE]]])
    assert metric_num_classes(1) == 2 and metric_num_classes(4) == 4
    assert torch.equal(logits_to_pred(logits, 1), torch.tensor([[[0, 1], [1, 0]]]))
    meter = SegmentationMeter(1, IGNORE, class_names=["building"])
    meter.update(logits, target)
    assert meter.cm.tolist() == [[1, 1], [0, 1]]
    m = meter.compute()
    assert m["iou/building"] == pytest.approx(0.5) and m["iou/background"] == pytest.approx(0.5)


def test_meter_accumulates_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    meter = SegmentationMeter(3, class_names=["a", "b", "c"])
    meter.update(logits[:2], target[:2])
    meter.update(logits[2:], target[2:])
    assert torch.equal(meter.cm, confusion_matrix(logits.argmax(1), target, 3))
    assert meter.compute() == segmentation_metrics(meter.cm, ["a", "b", "c"])
    meter.reset()
    assert meter.cm.sum() == 0


def test_wrong_number_of_class_names():
    with pytest.raises(ValueError):
        segmentation_metrics(torch.eye(3, dtype=torch.long), ["a", "b"])
