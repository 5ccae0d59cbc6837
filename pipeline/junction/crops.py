"""Crops around a query point.

A crop is :data:`CROP` voxels of the 4 mm LPS grid on each side (96 mm), centred
:data:`BELOW_MM` below the query point so that it holds the vertebra and what lies under it.
HU are clipped to the bone window of :func:`normalise`; beyond the volume is air.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.junction.grid import SPACING_MM

#: Crop side (voxels of the 4 mm grid).
CROP = 24
#: The crop's centre lies this far caudal of the query point (mm).
BELOW_MM = 16.0
AIR_HU = -1024.0


def normalise(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 2000] and scaled to about [-2.8, 4.8]."""
    return ((np.clip(hu, -1000.0, 2000.0) - 100.0) / 400.0).astype(np.float32)


def crop(hu: np.ndarray, point_zyx: np.ndarray, spacing_mm: float = SPACING_MM,
         scale: float = 1.0, rotation: np.ndarray | None = None) -> np.ndarray:
    """The normalised ``CROP``^3 crop of ``hu`` ([z, y, x], z cranial) for a query point given
    as a continuous index; ``scale`` > 1 samples a larger region and ``rotation`` (3 x 3, in
    ``[z, y, x]``) turns the sampling grid about the query point (augmentation)."""
    point = np.asarray(point_zyx, float)
    offs = (np.arange(CROP) - (CROP - 1) / 2.0) * scale
    grid = np.stack(np.meshgrid(offs, offs, offs, indexing="ij")).reshape(3, -1)
    grid[0] -= BELOW_MM / spacing_mm
    if rotation is not None:
        grid = np.asarray(rotation, float) @ grid
    grid += point[:, None]
    out = ndimage.map_coordinates(hu, grid, output=np.float32, order=1, mode="constant",
                                  cval=AIR_HU)   # int16 volumes are read as they are, not copied
    return normalise(out.reshape(CROP, CROP, CROP))
