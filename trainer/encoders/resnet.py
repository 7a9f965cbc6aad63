"""A ResNet-18 trunk (BasicBlocks, 2-2-2-2) with configurable input channels and width."""

from __future__ import annotations

import torch
from torch import nn

from avbalance.errors import UserError


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max pool) and four stages of two BasicBlocks.

    Stage widths are ``width * (1, 2, 4, 8)``; the output is the last stage's feature map
    (N, 8 * width, H / 32, W / 32), before any pooling. ``width=64`` is torchvision's
    ResNet-18 (trained from scratch here: no pretrained weights).
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        if width < 1 or in_channels < 1:
            raise UserError(f"resnet18: width and in_channels must be >= 1 (got {width}, {in_channels})")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        c_in = width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.out_channels = c_in
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
