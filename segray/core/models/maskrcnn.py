"""torchvision Mask R-CNN (ResNet-50 FPN, v1 and v2), built from ``MaskRCNNConfig``; nothing is downloaded.

Unlike the semantic models, these take a *list* of ``float32 [C, H, W]`` images (any sizes) and,
in training, a list of target dicts (``boxes`` xyxy, ``labels``, ``masks``); they return a dict
of losses in training and one dict per image (``boxes``, ``labels``, ``scores``, ``masks``
``[N, 1, H, W]`` probabilities at the input size) in eval mode.

Images are normalised by segray (band statistics) before the model, so the model's own
``GeneralizedRCNNTransform`` only resizes (mean 0, std 1). Any band count works: the stem
convolution is rebuilt for ``in_channels``. Weights come from files only:

- ``weights``: a full Mask R-CNN state dict (torchvision's or a segray checkpoint). Class
  dependent layers (box predictor, mask logits) whose shape differs from ``num_classes`` are
  skipped, so COCO weights fine-tune to other classes; any other mismatch fails.
- ``backbone_weights``: a ResNet-50 state dict (``fc.*`` is ignored).

For either, a 3-band stem is adapted to ``in_channels`` by averaging over its input bands.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import torch
from torch import nn

from segray.config import MaskRCNNConfig
from segray.core.models import register_model

log = logging.getLogger(__name__)

_CLASS_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def _read_state(path: str, storage_options: dict | None) -> dict[str, torch.Tensor]:
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:  # a segray checkpoint
        state = state["model_state"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):  # torchvision references
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """[64, c, 7, 7] -> [64, in_channels, 7, 7], keeping the response to a flat input."""
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def _load_backbone(backbone: nn.Module, path: str, in_channels: int, storage_options: dict | None) -> None:
    state = {k: v for k, v in _read_state(path, storage_options).items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = _adapt_stem(state["conv1.weight"], in_channels)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a ResNet-50 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_maskrcnn_weights(model: nn.Module, path: str, in_channels: int, storage_options: dict | None = None) -> None:
    """Full-model weights; class-dependent layers of another class count are left as initialised."""
    state = _read_state(path, storage_options)
    own = model.state_dict()
    if "backbone.body.conv1.weight" in state:
        state["backbone.body.conv1.weight"] = _adapt_stem(state["backbone.body.conv1.weight"], in_channels)
    skipped = [k for k, v in state.items() if k.startswith(_CLASS_LAYERS) and k in own and own[k].shape != v.shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit this Mask R-CNN (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); check model.name and model.in_channels")
    if skipped:
        log.info("%s: class layers %s re-initialised for num_classes", path, skipped)


def _build(cfg: MaskRCNNConfig, v2: bool, storage_options: dict | None) -> nn.Module:
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import misc as misc_nn_ops

    norm = misc_nn_ops.FrozenBatchNorm2d if cfg.frozen_batch_norm else nn.BatchNorm2d
    body = resnet50(weights=None, norm_layer=norm)
    if cfg.in_channels != 3:
        body.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if cfg.backbone_weights:
        _load_backbone(body, cfg.backbone_weights, cfg.in_channels, storage_options)
    backbone = _resnet_fpn_extractor(body, cfg.trainable_backbone_layers, norm_layer=nn.BatchNorm2d if v2 else None)

    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
    kwargs: dict[str, Any] = dict(
        num_classes=cfg.num_classes,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=[0.0] * cfg.in_channels,  # segray normalises with band statistics
        image_std=[1.0] * cfg.in_channels,
        rpn_anchor_generator=anchors,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        rpn_pre_nms_top_n_train=cfg.rpn_proposals_train,
        rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
        rpn_pre_nms_top_n_test=cfg.rpn_proposals_test,
        rpn_post_nms_top_n_test=cfg.rpn_proposals_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
    if v2:
        kwargs.update(
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
            mask_head=MaskRCNNHeads(backbone.out_channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
        )
    else:
        kwargs["rpn_head"] = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    model = MaskRCNN(backbone, **kwargs)
    if cfg.weights:
        load_maskrcnn_weights(model, cfg.weights, cfg.in_channels, storage_options)
    return model


def set_inference_limits(model: nn.Module, score_threshold: float | None = None,
                         max_detections: int | None = None) -> None:
    """Change the score cut and detection cap of a built model (unwraps DDP)."""
    heads = getattr(model, "module", model).roi_heads
    if score_threshold is not None:
        heads.score_thresh = float(score_threshold)
    if max_detections is not None:
        heads.detections_per_img = int(max_detections)


# The builders load cfg.weights / cfg.backbone_weights themselves (not strictly): handles_weights.
# align 1: every tile is resized (min_size/max_size), so no pooling grid lines up across tiles anyway.
@register_model("maskrcnn_resnet50_fpn", family="instance", align=1, config=MaskRCNNConfig, handles_weights=True)
def build_maskrcnn_resnet50_fpn(cfg: MaskRCNNConfig, storage_options: dict | None = None) -> nn.Module:
    return _build(cfg, v2=False, storage_options=storage_options)


@register_model("maskrcnn_resnet50_fpn_v2", family="instance", align=1, config=MaskRCNNConfig, handles_weights=True)
def build_maskrcnn_resnet50_fpn_v2(cfg: MaskRCNNConfig, storage_options: dict | None = None) -> nn.Module:
    return _build(cfg, v2=True, storage_options=storage_options)


__all__ = ["load_maskrcnn_weights", "set_inference_limits"]
