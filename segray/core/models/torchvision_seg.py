"""FCN-ResNet50 and DeepLabV3-ResNet50 from torchvision, randomly initialised, any band count."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from segray.config import TorchvisionSegConfig
from segray.core.models import register_model


class TorchvisionSegmentation(nn.Module):
    """Wraps a torchvision segmentation model so ``forward`` returns the ``'out'`` logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def _build(factory: Callable[..., nn.Module], cfg: TorchvisionSegConfig) -> TorchvisionSegmentation:
    # No weights at all: workers have no network, and RGB weights don't fit other band counts anyway.
    net = factory(weights=None, weights_backbone=None, num_classes=cfg.num_classes, aux_loss=False)
    if cfg.in_channels != 3:
        old = net.backbone.conv1
        net.backbone.conv1 = nn.Conv2d(
            cfg.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    return TorchvisionSegmentation(net)


# Dilated ResNet-50: output stride 8.
@register_model("fcn_resnet50", family="semantic", align=8, config=TorchvisionSegConfig,
                encoder=lambda m: m.net.backbone)
def build_fcn_resnet50(cfg: TorchvisionSegConfig) -> TorchvisionSegmentation:
    # Imported here so that importing the registry does not pay for torchvision.
    from torchvision.models.segmentation import fcn_resnet50

    return _build(fcn_resnet50, cfg)


@register_model("deeplabv3_resnet50", family="semantic", align=8, config=TorchvisionSegConfig,
                encoder=lambda m: m.net.backbone)
def build_deeplabv3_resnet50(cfg: TorchvisionSegConfig) -> TorchvisionSegmentation:
    from torchvision.models.segmentation import deeplabv3_resnet50

    return _build(deeplabv3_resnet50, cfg)
