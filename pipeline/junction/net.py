"""The junction classifier: a small 3D CNN over a 96 mm cube of CT on a 4 mm grid.

Three stages of two 3x3x3 convolutions (instance norm, ReLU) and a max pooling, global average
pooling and one linear unit: the logit that the vertebra at the crop's query point is the last
mobile one with the sacrum right below it.
"""
from __future__ import annotations

import torch
from torch import nn


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.ReLU(inplace=True),
        nn.MaxPool3d(2))


class JunctionNet(nn.Module):
    """``[B, 1, D, H, W]`` normalised CT -> ``[B]`` logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.config = {"width": width}
        self.features = nn.Sequential(_stage(1, width), _stage(width, 2 * width),
                                      _stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).mean(dim=(2, 3, 4))
        return self.head(f)[:, 0]


def build_junction(width: int = 16) -> JunctionNet:
    """The registry's builder (``pipeline.junction.net:build_junction``)."""
    return JunctionNet(width)
