"""Where the lumbosacral junction is, from the found chain of vertebrae.

Two query points are scored (:class:`pipeline.junction.net.JunctionNet`): the lowest found
vertebra, and the point one step further down the chain, where a vertebra the localizer
missed would be. The lowest is the last mobile vertebra when its score passes the model's
threshold and beats the point below; otherwise a missed vertebra lies below when that point
passes; otherwise the junction is not fixed (the field of view ends above the sacrum, or the
model is not sure). The threshold is chosen on synthesised validation volumes
(:func:`pipeline.junction.train.choose_threshold`): the lowest at which no decision there was
wrong.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.junction.crops import crop
from pipeline.junction.grid import SPACING_MM, hu_grid

#: "last": the lowest found vertebra is the last mobile one (the sacrum is right below it);
#: "below": one vertebra lies between the lowest found one and the sacrum; "none": not fixed.
JunctionState = Literal["last", "below", "none"]


@dataclass(frozen=True)
class Junction:
    """The junction classifier's verdict on a chain (scores are probabilities)."""

    state: JunctionState
    p_last: float
    p_below: float
    below_mm: tuple[float, float, float] | None
    threshold: float

    @property
    def detail(self) -> str:
        if self.state == "below":
            return (f"junction classifier: a vertebra the localizer missed lies a step below "
                    f"the lowest found one and is the last mobile one (probability "
                    f"{self.p_below:.2f}, threshold {self.threshold:.2f})")
        return (f"junction classifier: probability {self.p_last:.2f} that the lowest found "
                f"vertebra is the last mobile one ({self.p_below:.2f} a step below; threshold "
                f"{self.threshold:.2f})")


def decide(p_last: float, p_below: float, threshold: float) -> JunctionState:
    """The rule of the module docstring."""
    if p_last >= threshold and p_last >= p_below:
        return "last"
    if p_below >= threshold:
        return "below"
    return "none"


@torch.no_grad()
def scores(model: torch.nn.Module, hu: np.ndarray, points_zyx: Sequence[np.ndarray],
           spacing_mm: float = SPACING_MM) -> np.ndarray:
    """Probabilities for query points (continuous ``[z, y, x]`` indices of ``hu``): the mean of
    the model's on each crop and on its left-right mirror (a turn the training crops are given,
    so both are crops it knows; the threshold is chosen on the same mean)."""
    if not len(points_zyx):
        return np.zeros(0)
    x = torch.from_numpy(np.stack([crop(hu, p, spacing_mm) for p in points_zyx])[:, None])
    dev = next(model.parameters()).device
    x = torch.cat([x, torch.flip(x, dims=[4])]).to(dev)          # [n + n, 1, z, y, x]
    p = torch.sigmoid(model(x)).cpu().numpy().astype(float)
    return 0.5 * (p[:len(points_zyx)] + p[len(points_zyx):])


def step_below(cents: Sequence[np.ndarray], fallback_mm: float) -> np.ndarray:
    """The vector from the lowest centroid to where the next one down would be: the last step
    of the chain, or ``fallback_mm`` straight down for a single vertebra."""
    if len(cents) >= 2:
        return np.asarray(cents[-1], float) - np.asarray(cents[-2], float)
    return np.array([0.0, 0.0, -fallback_mm])


def junction_of(model: torch.nn.Module, hu: np.ndarray, lowest: np.ndarray, step: np.ndarray,
                threshold: float) -> tuple[JunctionState, float, float, np.ndarray]:
    """Scores and verdict for a lowest vertebra and the step below it (indices of ``hu``)."""
    below = lowest + step
    p = scores(model, hu, [lowest, below])
    return decide(p[0], p[1], threshold), float(p[0]), float(p[1]), below


def find_junction(image: sitk.Image, cents_mm: Sequence[Sequence[float]], fallback_step_mm: float,
                  model: torch.nn.Module | None = None) -> Junction:
    """The verdict for a chain whose centroids (LPS mm) run cranial to caudal, on ``image``
    (HU, any orientation). ``model``: the shipped ``junction`` weights by default."""
    if model is None:
        from pipeline.registry import load_model

        model = load_model("junction", "cpu")
    threshold = float(model.meta["threshold"])
    img = hu_grid(image)
    hu = sitk.GetArrayViewFromImage(img)

    def index(p) -> np.ndarray:
        x, y, z = img.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p))
        return np.array([z, y, x])

    pts = [index(c) for c in cents_mm]
    step = step_below(pts, fallback_step_mm / SPACING_MM)
    state, p_last, p_below, below = junction_of(model, hu, pts[-1], step, threshold)
    below_mm = tuple(float(v) for v in img.TransformContinuousIndexToPhysicalPoint(
        (float(below[2]), float(below[1]), float(below[0]))))
    return Junction(state, p_last, p_below, below_mm, threshold)
