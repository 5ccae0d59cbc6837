"""M-SCN: the modified spatial configuration network of the paper (section 2.2, Fig. 4-5).

Dimension-generic (``spatial_dims`` = 3 for vertebra localisation, 2 for the Genant keypoints).

- Local network (LN, section 2.2.1): a U-shaped network whose blocks are residual double
  convolutions, with attention gates on the skip connections (eq. 4-6). Its decoder yields four
  feature maps (coarse to fine) and a 1x1 head gives the local heatmap ``H_L``.
- Global network (GN, section 2.2.2, eq. 7): single-convolution blocks with large (7^d) kernels.
  It re-extracts features from ``H_L`` at each decoder level, filters each LN decoder level by an
  element-wise ("dot") product ("multiple filtering"), then upsamples coarse to fine and
  re-convolves into the global heatmap ``H_G``.
- Output (eq. 8): ``H = H_L * tanh(H_G)``. The tanh bounds the global factor to (-1, 1), as in
  Payer et al.'s SCN; the product itself has no activation (section 2.2: "no activation function
  is used in the last layer").

Variants for the ablation (paper Table 4), selected with ``variant``:

``"scn"``   Payer et al. 2019: plain U-Net LN; GN = four 7^d convolutions at 1/4 resolution on
            ``H_L``, upsampled; ``H = H_L * tanh(H_G)``.
``"ln"``    LN only (plain U-Net, no attention, no residual): ``H = H_L``.
``"gn"``    GN only: the U-shaped 7^d single-conv network applied to the image: ``H = H_G``.
``"lngn"``  plain LN + GN on ``H_L`` without multiple filtering.
``"mscn"``  attention + residual LN, GN with multiple filtering (the paper's model).

The ``attention``, ``residual`` and ``multi_filter`` switches can override the variant's defaults
(Table 4 rows 5-7).

CPU note: the GN kernel at the full-resolution level defaults to 3 (``gn_kernels=(7, 7, 7, 3)``,
coarse to fine) because a 7^3 kernel there costs more than the whole LN on a CPU; the three
coarser levels use the paper's 7^3.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nets.blocks import AttentionGate, ConvBlock, SingleConvBlock, conv, resize

VARIANTS = ("scn", "ln", "gn", "lngn", "mscn")

_VARIANT_DEFAULTS = {
    #         attention residual multi_filter
    "scn": (False, False, False),
    "ln": (False, False, False),
    "gn": (False, False, False),
    "lngn": (False, False, False),
    "mscn": (True, True, True),
}


def _adaptive_pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return (F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d)(x, tuple(size))


def _level_sizes(size: Sequence[int], depth: int) -> list[tuple[int, ...]]:
    """Spatial sizes of the ``depth`` levels of a U-Net (floor halving, as max pooling), coarse first."""
    sizes = [tuple(size)]
    for _ in range(depth - 1):
        sizes.append(tuple(max(1, s // 2) for s in sizes[-1]))
    return sizes[::-1]


class LocalNet(nn.Module):
    """U-shaped local network (section 2.2.1) with optional attention gates and residual blocks.

    ``forward`` returns ``(H_L, decoder_features)``; the features are ordered coarse to fine
    (the bottleneck output first, the full-resolution decoder output last).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base: int = 8,
                 depth: int = 4, norm_kind: str = "instance", attention: bool = True,
                 residual: bool = True) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = [base * 2 ** i for i in range(depth)]
        ch = self.channels
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in ch:
            self.enc.append(ConvBlock(spatial_dims, cin, c, norm_kind, residual))
            cin = c
        self.dec = nn.ModuleList()
        self.gates = nn.ModuleList()
        for i in range(depth - 2, -1, -1):
            self.gates.append(AttentionGate(spatial_dims, ch[i], ch[i + 1]) if attention else nn.Identity())
            self.dec.append(ConvBlock(spatial_dims, ch[i] + ch[i + 1], ch[i], norm_kind, residual))
        self.head = conv(spatial_dims, ch[0], out_channels, 1)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mp = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = mp(x, 2)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        feats = [x]
        for gate, block in zip(self.gates, self.dec):
            skip = skips.pop()
            if self.attention:
                skip = gate(skip, x)
            x = block(torch.cat([skip, resize(x, tuple(skip.shape[2:]))], dim=1))
            feats.append(x)
        return self.head(x), feats


class GlobalNet(nn.Module):
    """Global network (section 2.2.2): U-shaped, single large-kernel convolution blocks.

    At each level (coarse to fine) the input (``H_L``, or the image for the GN-only ablation) is
    average-pooled to the level's size and re-convolved into ``level_channels[l]`` features; with
    ``multi_filter`` these are multiplied element-wise with the LN decoder feature of that level
    (projected to the same channels by a 1x1 convolution). The coarsest result is then upsampled
    level by level and merged with the next finer one by another single-convolution block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 level_channels: Sequence[int], kernels: Sequence[int] = (7, 7, 7, 3),
                 norm_kind: str = "instance", multi_filter: bool = True,
                 decoder_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        n = len(level_channels)
        if len(kernels) != n:
            raise ValueError(f"{n} levels need {n} kernels, got {len(kernels)}")
        self.multi_filter = multi_filter
        self.refeature = nn.ModuleList(
            SingleConvBlock(spatial_dims, in_channels, c, k, norm_kind) for c, k in zip(level_channels, kernels))
        if multi_filter:
            if decoder_channels is None:
                raise ValueError("multiple filtering needs the LN decoder channels")
            self.project = nn.ModuleList(
                conv(spatial_dims, d, c, 1) for d, c in zip(decoder_channels, level_channels))
        self.merge = nn.ModuleList(
            SingleConvBlock(spatial_dims, level_channels[i - 1] + level_channels[i], level_channels[i],
                            kernels[i], norm_kind) for i in range(1, n))
        self.head = conv(spatial_dims, level_channels[-1], out_channels, 1)

    def forward(self, x: torch.Tensor, sizes: Sequence[Sequence[int]],
                decoder_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        filtered = []
        for i, (size, block) in enumerate(zip(sizes, self.refeature)):
            r = block(_adaptive_pool(x, size))
            if self.multi_filter:
                r = r * self.project[i](decoder_features[i])
            filtered.append(r)
        g = filtered[0]
        for i, block in enumerate(self.merge, start=1):
            g = block(torch.cat([resize(g, tuple(sizes[i])), filtered[i]], dim=1))
        return self.head(g)


class SCNSpatial(nn.Module):
    """Payer et al.'s spatial-configuration component: 7^d convolutions at 1/``factor`` resolution."""

    def __init__(self, spatial_dims: int, channels: int, width: int, factor: int = 4,
                 layers: int = 4, norm_kind: str = "instance") -> None:
        super().__init__()
        self.factor = factor
        blocks = []
        cin = channels
        for _ in range(layers):
            blocks.append(SingleConvBlock(spatial_dims, cin, width, 7, norm_kind))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = conv(spatial_dims, width, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        size = tuple(h.shape[2:])
        small = tuple(max(1, s // self.factor) for s in size)
        return resize(self.head(self.blocks(_adaptive_pool(h, small))), size)


class MSCN(nn.Module):
    """M-SCN and its ablation variants (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT).
        out_channels: heatmap channels (one per vertebra level, or per keypoint).
        base: LN channels at full resolution, doubled per level.
        depth: resolution levels of the LN (its decoder yields ``depth`` feature maps).
        gn_channels: GN channels per level (coarse to fine); default ``base`` at every level.
        gn_kernels: GN kernel per level (coarse to fine).
        variant: one of :data:`VARIANTS`.
        attention, residual, multi_filter: override the variant's switches.
        norm: normalisation of all blocks (``instance`` | ``group`` | ``batch`` | ``none``).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 26,
                 base: int = 8, depth: int = 4, gn_channels: Sequence[int] | None = None,
                 gn_kernels: Sequence[int] = (7, 7, 7, 3), variant: str = "mscn",
                 attention: bool | None = None, residual: bool | None = None,
                 multi_filter: bool | None = None, norm: str = "instance") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        att0, res0, mf0 = _VARIANT_DEFAULTS[variant]
        attention = att0 if attention is None else attention
        residual = res0 if residual is None else residual
        multi_filter = mf0 if multi_filter is None else multi_filter
        if variant in ("scn", "ln", "gn") and multi_filter:
            raise ValueError(f"variant {variant!r} has no LN->GN multiple filtering")
        gn_kernels = tuple(int(k) for k in gn_kernels)
        gn_channels = tuple(gn_channels) if gn_channels is not None else (base,) * depth
        self.config: dict[str, Any] = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "base": base, "depth": depth, "gn_channels": list(gn_channels), "gn_kernels": list(gn_kernels),
            "variant": variant, "attention": attention, "residual": residual,
            "multi_filter": multi_filter, "norm": norm,
        }
        self.variant = variant
        self.depth = depth
        self.local = None
        self.glob = None
        self.spatial = None
        if variant != "gn":
            self.local = LocalNet(spatial_dims, in_channels, out_channels, base, depth, norm,
                                  attention, residual)
        if variant == "scn":
            self.spatial = SCNSpatial(spatial_dims, out_channels, gn_channels[-1] * 2, 4, 4, norm)
        elif variant == "gn":
            # GN alone has to carry all the capacity: LN-sized channels per level.
            chans = [base * 2 ** i for i in range(depth)][::-1]
            self.glob = GlobalNet(spatial_dims, in_channels, out_channels, chans, gn_kernels, norm, False)
        elif variant in ("lngn", "mscn"):
            dec = self.local.channels[::-1]
            self.glob = GlobalNet(spatial_dims, out_channels, out_channels, gn_channels, gn_kernels,
                                  norm, multi_filter, dec)
        self._init_heads()

    def _init_heads(self) -> None:
        """Heatmap heads start near zero (the background), the global factor near tanh(1).

        With both factors of ``H_L * tanh(H_G)`` near zero each one's gradient would vanish (a
        saddle); starting ``tanh(H_G)`` at ~0.76 lets the LN learn from the first step and the GN
        modulate it as it learns.
        """
        heads = [m.head for m in (self.local, self.glob) if m is not None]
        if self.spatial is not None:
            heads.append(self.spatial.head)
        for head in heads:
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)
        factor = self.spatial if self.spatial is not None else (self.glob if self.variant != "gn" else None)
        if factor is not None and self.local is not None:
            nn.init.constant_(factor.head.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "gn":
            return self.glob(x, _level_sizes(x.shape[2:], self.depth))
        h_local, feats = self.local(x)
        if self.variant == "ln":
            return h_local
        if self.variant == "scn":
            return h_local * torch.tanh(self.spatial(h_local))
        sizes = [tuple(f.shape[2:]) for f in feats]
        h_global = self.glob(h_local, sizes, feats)
        return h_local * torch.tanh(h_global)


def build_mscn(**config: Any) -> MSCN:
    """Build an :class:`MSCN` from its ``config`` dict (what checkpoints store)."""
    return MSCN(**config)
