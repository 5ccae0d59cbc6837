"""Dimension-generic building blocks (``spatial_dims`` = 2 or 3).

The convolution blocks follow the paper's Fig. 5: the local network's block is a double
convolution with a residual connection; the global network's block is a single convolution with a
large kernel (7x7x7). The attention gate is Oktay et al.'s additive gate (paper eq. 4-5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("instance", "group", "batch", "none")


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """A 1 x 1 (x 1) convolution of ``x [n, c, ...]`` as a matrix product over the channels, for
    an input contiguous in either layout (channels first or channels last); ``None`` otherwise.

    oneDNN runs such convolutions with few channels many times slower than the same product
    (bench/process.py measures the pipeline); the sums are the same to float32 rounding.
    """
    n, c = x.shape[:2]
    o = weight.shape[0]
    w = weight.reshape(o, c)
    spatial = x.shape[2:]
    if x.is_contiguous():
        flat = x.reshape(n, c, -1)
        y = (torch.matmul(w, flat) if bias is None else
             torch.baddbmm(bias.view(1, o, 1).expand(n, o, 1), w.expand(n, o, c), flat))
        return y.view(n, o, *spatial)
    last = x.permute(0, *range(2, x.dim()), 1)
    if last.is_contiguous():
        y = torch.matmul(last.reshape(n, -1, c), w.t())
        if bias is not None:
            y = y + bias
        return y.view(n, *spatial, o).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return None


class _Pointwise:
    """A 1 x 1 (x 1) convolution computed by :func:`pointwise` on the CPU (the convolution
    elsewhere, or for a strided input); same parameters, so the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = pointwise(x, self.weight, self.bias)
            if y is not None:
                return y
        return super().forward(x)


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    pass


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    pass


def conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, bias: bool = True) -> nn.Module:
    """A same-padded convolution of ``spatial_dims`` dimensions (:class:`PointwiseConv3d` or
    :class:`PointwiseConv2d` for ``kernel`` 1)."""
    if kernel == 1:
        cls = {2: PointwiseConv2d, 3: PointwiseConv3d}[spatial_dims]
        return cls(cin, cout, 1, bias=bias)
    cls = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    return cls(cin, cout, kernel, padding=kernel // 2, bias=bias)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer by name (``instance`` | ``group`` | ``batch`` | ``none``)."""
    if kind == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(4, channels), channels)
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def pool(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average-pool by ``factor`` in every spatial dimension."""
    if factor == 1:
        return x
    return (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor)


def resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(Bi/tri)linear resize to ``size``; a no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class ConvBlock(nn.Module):
    """Local-network block: two 3^d convolutions, norm, leaky ReLU; residual when ``residual``.

    Paper Fig. 5 (LN block: double convolution with a residual connection).
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm_kind: str = "instance",
                 residual: bool = True) -> None:
        super().__init__()
        self.conv1 = conv(spatial_dims, cin, cout, 3, bias=False)
        self.norm1 = norm(norm_kind, spatial_dims, cout)
        self.conv2 = conv(spatial_dims, cout, cout, 3, bias=False)
        self.norm2 = norm(norm_kind, spatial_dims, cout)
        self.residual = residual
        if residual:
            self.skip = conv(spatial_dims, cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.1)
        y = self.norm2(self.conv2(y))
        if self.residual:
            y = y + self.skip(x)
        return F.leaky_relu(y, 0.1)


class SingleConvBlock(nn.Module):
    """Global-network block: one large-kernel convolution, norm, leaky ReLU (paper Fig. 5)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int = 7,
                 norm_kind: str = "instance") -> None:
        super().__init__()
        self.conv = conv(spatial_dims, cin, cout, kernel, bias=False)
        self.norm = norm(norm_kind, spatial_dims, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.1)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018; paper eq. 4-5).

    ``x`` is the skip connection, ``g`` the gating signal from the coarser decoder level; the gate
    is ``sigmoid(psi(relu(W_x x + W_g g + b)))`` and multiplies ``x``.
    """

    def __init__(self, spatial_dims: int, x_channels: int, g_channels: int,
                 inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(1, x_channels // 2)
        self.wx = conv(spatial_dims, x_channels, inter, 1, bias=False)
        self.wg = conv(spatial_dims, g_channels, inter, 1, bias=True)
        self.psi = conv(spatial_dims, inter, 1, 1, bias=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = resize(self.wg(g), tuple(x.shape[2:]))
        a = torch.sigmoid(self.psi(F.relu(self.wx(x) + g)))
        return x * a
