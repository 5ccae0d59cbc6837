"""The scanner side of the phantom: voxel grid, patient position, reconstruction blur and noise.

A grid here is always axis-aligned with the patient (axial slices): the direction matrix is
diagonal with +-1, so world x depends on the column index only, y on the row, z on the slice.
That separability is what makes rendering cheap (render.py builds coordinates from 1-D arrays).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d


@dataclass
class Grid:
    """Voxel grid in patient LPS: array order (z, y, x) = (k, j, i), as SimpleITK's arrays."""

    shape: tuple[int, int, int]            # (nz, ny, nx)
    spacing: tuple[float, float, float]    # (sx, sy, sz) mm
    origin: np.ndarray                     # world position of voxel (i, j, k) = (0, 0, 0)
    sign: tuple[int, int, int] = (1, 1, 1)  # direction of the i, j, k axes along x, y, z

    @property
    def direction(self) -> np.ndarray:
        return np.diag(np.array(self.sign, dtype=float))

    def axis(self, a: int) -> np.ndarray:
        """World coordinate along x (a=0), y (1) or z (2) of every index of that axis."""
        n = self.shape[2 - a]
        return self.origin[a] + self.sign[a] * self.spacing[a] * np.arange(n, dtype=np.float64)

    def index_slice(self, a: int, lo: float, hi: float) -> slice:
        """Indices of axis ``a`` whose world coordinate lies in [lo, hi] (may be empty)."""
        n = self.shape[2 - a]
        i0 = (lo - self.origin[a]) / (self.sign[a] * self.spacing[a])
        i1 = (hi - self.origin[a]) / (self.sign[a] * self.spacing[a])
        a0, a1 = min(i0, i1), max(i0, i1)
        s = max(int(np.ceil(a0)), 0)
        e = min(int(np.floor(a1)), n - 1)
        return slice(s, max(e + 1, s))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """(k, j, i) slices of the world AABB [lo, hi], or None when it misses the grid."""
        sx = self.index_slice(0, lo[0], hi[0])
        sy = self.index_slice(1, lo[1], hi[1])
        sz = self.index_slice(2, lo[2], hi[2])
        if sx.stop <= sx.start or sy.stop <= sy.start or sz.stop <= sz.start:
            return None
        return sz, sy, sx

    def index_to_world(self, kji: np.ndarray) -> np.ndarray:
        """(n, 3) float (k, j, i) indices -> (n, 3) LPS mm."""
        kji = np.asarray(kji, dtype=float)
        out = np.empty_like(kji)
        for a in range(3):
            out[:, a] = self.origin[a] + self.sign[a] * self.spacing[a] * kji[:, 2 - a]
        return out

    @property
    def voxel_mm(self) -> float:
        return float(np.prod(self.spacing) ** (1.0 / 3.0))


@dataclass
class Acquisition:
    """Everything the seed decides about the scan (not the anatomy)."""

    pixel_spacing: float
    matrix: int
    slice_spacing: float
    slice_thickness: float
    n_levels: int
    first_level_fraction: float   # position of the start inside the range of eligible levels
    top_margin: float             # fraction of the end vertebra's height beyond its centre
    bottom_margin: float
    fov_dx: float                 # FOV centre offset from the spine (mm)
    fov_dy: float
    head_first: bool
    instance_ascending: bool      # instance numbers follow +z (True) or -z
    shuffled_names: bool
    noise_sigma: float            # HU at this voxel size
    noise_corr_px: float
    psf_fwhm: float               # in-plane resolution (mm)
    kvp: float
    tube_current: int
    kernel: str
    signed: bool                  # int16 + intercept 0, else uint16 12-bit + intercept -1024
    circle_padding: bool          # pixels outside the reconstruction circle at the padding value
    table: bool


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    matrix = int(rng.choice([512, 512, 512, 512, 384, 256]))
    fov = rng.uniform(180.0, 500.0)
    ps = float(np.clip(fov / matrix, 0.5, 1.0))
    ps = round(ps * 512) / 512  # spacing like 0.703125, as scanners write it
    ss = float(rng.choice([0.625, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]))
    thick = ss if rng.random() < 0.7 else min(ss * 1.6, 3.0) if ss < 2.0 else ss
    sharp = rng.random() < 0.5
    return Acquisition(
        pixel_spacing=ps, matrix=matrix, slice_spacing=ss, slice_thickness=round(thick, 3),
        n_levels=int(rng.integers(5, 18)), first_level_fraction=float(rng.random()),
        top_margin=float(rng.uniform(-0.25, 0.9)), bottom_margin=float(rng.uniform(-0.25, 0.9)),
        fov_dx=float(rng.uniform(-20, 20)), fov_dy=float(rng.uniform(-70, -5)),
        head_first=bool(rng.random() < 0.7), instance_ascending=bool(rng.random() < 0.5),
        shuffled_names=bool(rng.random() < 0.3),
        noise_sigma=float(rng.uniform(12, 40) if sharp else rng.uniform(6, 22)),
        noise_corr_px=float(rng.uniform(0.5, 1.0)),
        psf_fwhm=float(rng.uniform(0.5, 0.8) if sharp else rng.uniform(0.8, 1.3)),
        kvp=float(rng.choice([100.0, 120.0, 120.0, 140.0])), tube_current=int(rng.integers(80, 400)),
        kernel=("BONE" if sharp else "STANDARD"), signed=bool(rng.random() < 0.6),
        circle_padding=bool(rng.random() < 0.3), table=bool(rng.random() < 0.6),
    )


def psf_sigmas(grid: Grid, fwhm_xy: float, thickness: float) -> tuple[float, float, float]:
    """Gaussian PSF standard deviations in voxels along (z, y, x)."""
    sig_xy = fwhm_xy / 2.355
    sig_z = 0.35 * thickness
    sx, sy, sz = grid.spacing
    return sig_z / sz, sig_xy / sy, sig_xy / sx


def blur_and_noise(vol: np.ndarray, grid: Grid, fwhm_xy: float, thickness: float,
                   rng: np.random.Generator, sigma: float, min_corr_px: float = 0.6,
                   slab: int = 32) -> None:
    """Reconstruction in place: Gaussian PSF (in-plane resolution, slice profile) and noise.

    The noise is added before the in-plane blur, so the reconstruction kernel correlates it as on
    a scanner (one filter pass for both); its amplitude is set so that the final standard
    deviation is ``sigma`` HU. White noise is drawn once for a block of slices and reused with
    random shifts and flips (a large saving on 2 cores; nobody can see the repetition).
    """
    s = list(psf_sigmas(grid, fwhm_xy, thickness))
    s[1] = max(s[1], min_corr_px)
    s[2] = max(s[2], min_corr_px)
    used = [x if (x >= 0.25 and vol.shape[a] > 1) else 0.0 for a, x in enumerate(s)]
    gain = 1.0
    for x in used:
        if x > 0:
            gain *= np.sqrt(2.0 * np.sqrt(np.pi) * x)
    if sigma > 0:
        nb = min(slab, vol.shape[0])
        block = rng.standard_normal((nb,) + vol.shape[1:], dtype=np.float32)
        block *= np.float32(sigma * gain)
        for z0 in range(0, vol.shape[0], nb):
            n = min(nb, vol.shape[0] - z0)
            dy, dx = (int(v) for v in rng.integers(0, 1 << 16, 2))
            b = np.roll(block[:n], (dy % vol.shape[1], dx % vol.shape[2]), axis=(1, 2))
            if rng.random() < 0.5:
                b = b[:, ::-1]
            vol[z0:z0 + n] += b
    for axis in (2, 1, 0):
        if used[axis] > 0:
            gaussian_filter1d(vol, used[axis], axis=axis, output=vol, mode="nearest", truncate=3.0)
