"""3D U-Net of the per-vertebra segmentation (paper section 2.3.1, eq. 10-11).

Input: one CT crop centred on a vertebra centroid (z-scored HU); output: logits of three classes
per voxel, 0 = background (including the neighbouring vertebrae), 1 = normal vertebra,
2 = fractured vertebra. The network only ever labels the vertebra in the centre of its crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nets.blocks import ConvBlock
from pipeline.nets.blocks import conv as conv_nd

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
        self.head = conv_nd(3, chans[0], n_classes, 1)

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


class ShallowRefiner(nn.Module):
    """The 1 mm boundary refiner: plain convolutions, cheap enough to run over every vertebra's
    box at 1 mm on a CPU (a U-Net there costs ~8 s per vertebra).

    Input: 2 channels (CT, coarse foreground probability); output: 1 logit of the foreground.
    The prior enters the output directly (a residual on its logit), so an untrained refiner
    already returns the coarse map.

    Three convolutions (dilations 1, 1, 2: a receptive field of 9 voxels), then, with
    ``extra_dilations``, residual convolutions of those dilations (``y + act(conv(y))``; e.g.
    ``(4, 8)`` widens the field to 33 voxels, enough to follow a transverse or spinous process
    that the 2 mm network lost). They start at zero, so a refiner with them starts as the one
    without (:meth:`load_base`) and fine-tuning can only move away from it where it pays.
    """

    def __init__(self, in_channels: int = 2, width: int = 8,
                 extra_dilations: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__()
        extra = tuple(int(d) for d in extra_dilations)
        self.config = {"in_channels": in_channels, "width": width}
        if extra:  # only then, so that the shipped file's config stays what it was
            self.config["extra_dilations"] = list(extra)
        self.c1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.c2 = nn.Conv3d(width, width, 3, padding=1)
        self.c3 = nn.Conv3d(width, width, 3, padding=2, dilation=2)
        self.extra = nn.ModuleList(nn.Conv3d(width, width, 3, padding=d, dilation=d) for d in extra)
        for conv in self.extra:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.out = conv_nd(3, width, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def base_config(self) -> dict:
        """The config of the same refiner without the extra layers."""
        return {k: v for k, v in self.config.items() if k != "extra_dilations"}

    def load_base(self, state: dict, config: dict) -> None:
        """Load a refiner without extra layers (``config`` must be :meth:`base_config`); the extra
        layers stay at zero, so this model then computes what that one does."""
        if config != self.base_config():
            raise ValueError(f"refiner {config} is not the base {self.base_config()} of {self.config}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("extra.") for k in missing):
            raise ValueError(f"not a base refiner: missing {missing}, unexpected {unexpected}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground logit of ``x [n, 2, z, y, x]``.

        ``mask [n, 1, z, y, x]`` (1 inside each input's own box, 0 in the zeros it was padded with
        to share a batch): the hidden activations are zeroed outside the box before the next
        convolution, as the convolution's own zero padding would see them, so each box gets the
        values it gets alone.
        """
        prior_logit = torch.logit(x[:, 1:2], eps=1e-3)
        y = F.leaky_relu(self._first(x), 0.1, inplace=True)
        if mask is not None:
            y = y * mask
        y = F.leaky_relu(self.c2(y), 0.1, inplace=True)
        if mask is not None:
            y = y * mask
        y = F.leaky_relu(self.c3(y), 0.1, inplace=True)
        for conv in self.extra:
            if mask is not None:
                y = y * mask
            y = y + F.leaky_relu(conv(y), 0.1, inplace=True)
        return prior_logit + self.out(y)

    #: Input channels the first convolution is given on the CPU (zero-padded): oneDNN has no fast
    #: kernel for 2 input channels and falls back to a slower generic convolution; the zero
    #: channels, with zero weights, add exact zeros.
    CPU_FIRST_CHANNELS = 4

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """``c1`` of ``x``; on the CPU without autograd with input and weights zero-padded to
        :data:`CPU_FIRST_CHANNELS` channels (the same values to float32 rounding)."""
        extra = self.CPU_FIRST_CHANNELS - x.shape[1]
        if x.device.type != "cpu" or torch.is_grad_enabled() or extra <= 0:
            return self.c1(x)
        w = F.pad(self.c1.weight, (0, 0, 0, 0, 0, 0, 0, extra))
        xp = F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra))
        if self.c1.weight.is_contiguous(memory_format=torch.channels_last_3d):
            w = w.contiguous(memory_format=torch.channels_last_3d)
            xp = xp.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(xp, w, self.c1.bias, padding=self.c1.padding)


class SegmentationModel(nn.Module):
    """What ``segmentation.pt`` holds: the 2 mm crop network (``coarse``) and, optionally, the
    1 mm boundary refiner (``refiner``, :mod:`pipeline.segmentation.refine`)."""

    def __init__(self, coarse: dict, refiner: dict | None = None) -> None:
        super().__init__()
        self.coarse = UNet3D(**coarse)
        self.refiner = ShallowRefiner(**refiner) if refiner else None
        self.config = {"coarse": dict(coarse), "refiner": dict(refiner) if refiner else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coarse(x)


def build_segmentation(coarse: dict, refiner: dict | None = None) -> SegmentationModel:
    return SegmentationModel(coarse, refiner)
