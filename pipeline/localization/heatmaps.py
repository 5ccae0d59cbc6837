"""Target heatmaps and peak extraction (paper section 2.2, eq. 1-2).

Targets are Gaussians of peak 1 (eq. 1 up to its constant factor ``1/(sqrt(2 pi) sigma)``, which
only rescales the regression target), one channel per vertebra level (channel k = ``LEVELS[k]``).
An absent level has an all-zero channel. Coordinates are continuous voxel indices ``[z, y, x]``.
"""
from __future__ import annotations

import numpy as np
import torch


def gaussian_heatmaps(shape: tuple[int, ...], centers: np.ndarray, sigma: float,
                      amplitude: float = 1.0) -> torch.Tensor:
    """Heatmaps ``(C, *shape)``: channel c a Gaussian at ``centers[c]`` (NaN row: empty channel).

    Separable: the product of one 1D Gaussian per axis, so the cost is one multiply per voxel.
    """
    centers = np.asarray(centers, dtype=np.float64)
    out = torch.zeros((len(centers),) + tuple(shape), dtype=torch.float32)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    for c, center in enumerate(centers):
        if np.isnan(center).any():
            continue
        h = None
        for d, (ax, mu) in enumerate(zip(axes, center)):
            g = torch.exp(-((ax - float(mu)) ** 2) / (2 * sigma ** 2))
            g = g.reshape([-1 if i == d else 1 for i in range(len(shape))])
            h = g if h is None else h * g
        out[c] = amplitude * h
    return out


def refine_peak(heatmap: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """Sub-voxel peak position around the integer argmax ``index``.

    Per axis, a parabola through the logarithms of the three values around the peak: exact for a
    Gaussian (the target's shape), so the quantisation of a coarse grid does not become error.
    Falls back to the integer position at the border or for non-positive values; the offset is
    clipped to half a voxel.
    """
    pos = np.asarray(index, dtype=float)
    for d in range(heatmap.ndim):
        if index[d] == 0 or index[d] == heatmap.shape[d] - 1:
            continue
        lo = list(index)
        lo[d] -= 1
        hi = list(index)
        hi[d] += 1
        v = np.array([heatmap[tuple(lo)], heatmap[tuple(index)], heatmap[tuple(hi)]], dtype=float)
        if v[1] <= 0:
            continue
        v = np.log(np.maximum(v, v[1] * 1e-3))
        denom = v[0] - 2 * v[1] + v[2]
        if denom < 0:
            pos[d] += float(np.clip(0.5 * (v[0] - v[2]) / denom, -0.5, 0.5))
    return pos


def channel_peaks(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: refined peak position ``(C, ndim)`` and peak value ``(C,)`` (eq. 2)."""
    n = heatmaps.shape[0]
    flat = heatmaps.reshape(n, -1)
    arg = flat.argmax(axis=1)
    values = flat[np.arange(n), arg]
    positions = np.stack([refine_peak(heatmaps[c], np.unravel_index(arg[c], heatmaps.shape[1:]))
                          for c in range(n)])
    return positions, values
