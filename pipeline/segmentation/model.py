"""3D U-Net of the per-vertebra segmentation (paper section 2.3.1, eq. 10-11).

Input: one CT crop centred on a vertebra centroid (z-scored HU); output: logits of three classes
per voxel, 0 = background (including the neighbouring vertebrae), 1 = normal vertebra,
2 = fractured vertebra. The network only ever labels the vertebra in the centre of its crop.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from pipeline.nets.blocks import ConvBlock

N_CLASSES = 3
BACKGROUND, NORMAL, FRACTURED = 0, 1, 2


class UNet3D(nn.Module):
    """A plain 3D U-Net (Cicek et al.) with the residual double-conv blocks of
    :class:`pipeline.nets.blocks.ConvBlock` (the same block as the localization network).

    Args:
        base: channels of the first level; doubled at each of the ``depth - 1`` downsamplings.
        depth: number of resolution levels.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = N_CLASSES, base: int = 8,
                 depth: int = 4) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "n_classes": n_classes, "base": base, "depth": depth}
        chans = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(ConvBlock(3, cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for i in range(depth - 1, 0, -1):
            self.upconv.append(nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2))
            self.up.append(ConvBlock(3, 2 * chans[i - 1], chans[i - 1]))
        self.head = nn.Conv3d(chans[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for upconv, block in zip(self.upconv, self.up):
            x = upconv(x)
            x = block(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)
