"""Configurable U-Net (Ronneberger et al. 2015) with same-padded convolutions.

Widths double per level: ``base_width * 2**level``. Inputs of any size are padded
(bottom/right, edge-replicated) to a multiple of ``2**depth`` and the logits cropped back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segray.config import UNetConfig
from segray.core.models import register_model


def _conv_bn_relu(in_ch: int, out_ch: int, batch_norm: bool, stride: int = 1) -> list[nn.Module]:
    # BN already has a shift, so the conv bias would be redundant.
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, dropout: float = 0.0) -> None:
        layers = _conv_bn_relu(in_ch, out_ch, batch_norm) + _conv_bn_relu(out_ch, out_ch, batch_norm)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Down(nn.Sequential):
    """Halve H, W (max-pool or strided conv), then a double conv to the next width."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, mode: str, dropout: float = 0.0) -> None:
        pool = [nn.MaxPool2d(2)] if mode == "maxpool" else _conv_bn_relu(in_ch, in_ch, batch_norm, stride=2)
        super().__init__(*pool, DoubleConv(in_ch, out_ch, batch_norm, dropout))


class Up(nn.Module):
    """Double H, W and halve the width, concatenate the skip, then a double conv."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, mode: str) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(in_ch, out_ch, 1)
            )
        self.conv = DoubleConv(2 * out_ch, out_ch, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 4,
        base_width: int = 32,
        batch_norm: bool = True,
        dropout: float = 0.0,
        down: Literal["maxpool", "conv"] = "maxpool",
        up: Literal["transpose", "bilinear"] = "transpose",
    ) -> None:
        super().__init__()
        if down not in ("maxpool", "conv") or up not in ("transpose", "bilinear"):
            raise ValueError(f"unknown down={down!r} or up={up!r}")
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0], batch_norm)
        # Dropout only at the bottleneck, as in the original U-Net.
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], batch_norm, down, dropout if i == depth - 1 else 0.0) for i in range(depth)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], batch_norm, up) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        if h % m or w % m:
            x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)[..., :h, :w]


def unet_encoder(model: UNet) -> nn.Module:
    """The contracting path (stem and downs); a view sharing the model's modules."""
    return nn.ModuleList([model.stem, model.downs])


# Tile offsets align to the deepest pooling grid: 2**depth.
# radius: two 3x3 convs per level, in and out, at stride 2**level (input-gradient checked: 22 px at
# depth 2, 46 at depth 3: tests/unit/test_models.py).
@register_model("unet", family="semantic", align=lambda cfg: 2**cfg.depth, config=UNetConfig, encoder=unet_encoder,
                radius=lambda cfg: 6 * 2**cfg.depth - 2)
def build_unet(cfg: UNetConfig) -> UNet:
    return UNet(
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        depth=cfg.depth,
        base_width=cfg.base_width,
        batch_norm=cfg.batch_norm,
        dropout=cfg.dropout,
        down=cfg.down,
        up=cfg.up,
    )
