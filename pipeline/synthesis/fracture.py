"""A simulated osteoporotic compression fracture of one vertebra of a real label map.

Real masks hold few fractures, and the fractured class is what the product must recognise. Here
the body of a chosen vertebra is compressed along the spine's local axis (from its neighbours'
centroids) to a Genant height loss, with the profile of a morphology:

- wedge: height loss grows linearly from the posterior wall (none) to the anterior wall (full);
- biconcave: both endplates bow inwards, full loss at the centre of the body, none at its walls;
- crush: the whole body loses the same share of its height.

Only the body is compressed (VerSe subregions 49/50 where a subregion map is given, otherwise
the part of the vertebra anterior of the spinal canal, :mod:`pipeline.synthesis.geometry`): the
posterior elements do not collapse in an osteoporotic fracture. Wedge and crush fractures shorten
the column: the spine above follows (rotated forward about the posterior-superior corner of the
body for a wedge, moved down for a crush) by a share ``follow`` of the lost height; the rest is a
taller disc space, as after a fresh fracture. Biconcave fractures leave the spine in place, the
discs bulging into the endplates.

Both moves are SimpleITK transforms applied with nearest-neighbour resampling: a displacement
field along the spine axis for the body, an affine transform for the spine above.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL
from pipeline.synthesis.geometry import (
    BODY_SUBREGIONS,
    VertebraFrame,
    approximate_body,
    as_label_image,
    grid_points,
    label_boxes,
    label_centroids,
    level_sorted,
    on_grid_of,
    vertebra_frame,
    voxel_points,
)

#: Genant height loss of each grade: 1 = 20-25 %, 2 = 25-40 %, 3 > 40 % (capped at 60 %).
GRADE_LOSS = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.60)}
#: The ranges drawn from: kept 1 percentage point away from the grade borders, so that the
#: voxel staircase never moves a simulated fracture into the next grade.
DRAW_LOSS = {1: (0.21, 0.24), 2: (0.26, 0.39), 3: (0.41, 0.55)}
MORPHOLOGIES = ("wedge", "biconcave", "crush")
#: Percentiles of the body's antero-posterior (and lateral) extent taken as its walls.
WALL_PERCENTILES = (5.0, 95.0)
#: Voxels of background kept around the body's box for its compression.
BOX_PAD = 3


@dataclass(frozen=True)
class FractureSpec:
    """What to simulate.

    Attributes:
        grade: Genant grade 1-3.
        morphology: ``wedge``, ``biconcave`` or ``crush``.
        height_loss: 1 - compressed/original height where the profile is deepest (0..1).
        follow: share (0..1) of the lost height that the spine above follows.
    """

    grade: int
    morphology: str
    height_loss: float
    follow: float = 1.0

    def __post_init__(self) -> None:
        if self.morphology not in MORPHOLOGIES:
            raise ValueError(f"morphology {self.morphology!r}: expected one of {MORPHOLOGIES}")
        if not 0.0 < self.height_loss < 0.9:
            raise ValueError(f"height loss {self.height_loss} outside (0, 0.9)")


@dataclass
class FractureResult:
    """A fractured label map.

    Attributes:
        labels: uint8 VerSe labels on the input grid.
        subregions: the subregion map moved alike (``None`` where none was given).
        label: the fractured vertebra.
        spec: what was applied.
        frame: the vertebra's frame (before the fracture) the compression ran along.
    """

    labels: sitk.Image
    subregions: sitk.Image | None
    label: int
    spec: FractureSpec
    frame: VertebraFrame


def genant_grade(height_loss: float) -> int:
    """Genant grade of a height loss: 0 below 20 %, 1 to 25 %, 2 to 40 %, 3 above."""
    if height_loss < 0.20:
        return 0
    if height_loss < 0.25:
        return 1
    if height_loss <= 0.40:
        return 2
    return 3


def draw_fracture(rng: np.random.Generator, grade: int | None = None,
                  morphology: str | None = None,
                  follow_range: tuple[float, float] = (0.3, 1.0)) -> FractureSpec:
    """A random :class:`FractureSpec` (grade and morphology uniform unless given)."""
    grade = int(rng.integers(1, 4)) if grade is None else int(grade)
    if grade not in DRAW_LOSS:
        raise ValueError(f"grade {grade}: expected 1-3")
    morphology = str(rng.choice(MORPHOLOGIES)) if morphology is None else morphology
    loss = float(rng.uniform(*DRAW_LOSS[grade]))
    return FractureSpec(grade, morphology, loss, float(rng.uniform(*follow_range)))


def height_factor(spec: FractureSpec, a: np.ndarray, w: np.ndarray,
                  walls: tuple[float, float, float, float]) -> np.ndarray:
    """Remaining share of the height (1 - loss profile) at antero-posterior ``a`` and lateral
    ``w`` (mm in the vertebra's frame); ``walls`` = (posterior, anterior, right, left)."""
    a_post, a_ant, w_r, w_l = walls
    loss = spec.height_loss
    if spec.morphology == "crush":
        return np.full(np.shape(a), 1.0 - loss)
    if spec.morphology == "wedge":
        s = np.clip((a - a_post) / max(a_ant - a_post, 1e-3), 0.0, 1.0)
        return 1.0 - loss * s
    ra = (a - 0.5 * (a_ant + a_post)) / max(0.5 * (a_ant - a_post), 1e-3)
    rw = (w - 0.5 * (w_l + w_r)) / max(0.5 * (w_l - w_r), 1e-3)
    return 1.0 - loss * np.clip(1.0 - (ra * ra + rw * rw), 0.0, 1.0)


def _body(labels: np.ndarray, sub: np.ndarray | None, img: sitk.Image, label: int,
          frame: VertebraFrame, box) -> np.ndarray:
    """Mask (box shape) of the body of ``label``: subregions 49/50, else approximated."""
    if sub is not None:
        body = (labels[box] == label) & np.isin(sub[box], BODY_SUBREGIONS)
        if body.sum() > 0.1 * (labels[box] == label).sum():
            return body
    return approximate_body(labels, img, label, frame, box)


def _image(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.CopyInformation(ref)
    return out


def _sub_box(img: sitk.Image, box) -> sitk.Image:
    size = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
    return sitk.RegionOfInterest(img, size, [box[2].start, box[1].start, box[0].start])


def _compress_body(values: np.ndarray, img: sitk.Image, box, frame: VertebraFrame,
                   spec: FractureSpec, anchor: float, walls) -> np.ndarray:
    """``values`` (uint8, zero outside the body) compressed towards the plane ``t = anchor``
    inside ``box``: a voxel at height ``t`` takes the value found at
    ``anchor + (t - anchor) / f`` (``f`` = :func:`height_factor`), so every column of the body
    keeps the share ``f`` of its height."""
    ref = _sub_box(img, box)
    pts = grid_points(img, box)
    t, a, w = frame.local(pts)
    f = height_factor(spec, a, w, walls)
    disp = ((t - anchor) * (1.0 / f - 1.0))[..., None] * frame.up          # [z, y, x, 3] mm
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.CopyInformation(ref)
    tx = sitk.DisplacementFieldTransform(field)
    src = _image(values, ref)
    out = sitk.Resample(src, ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def _upper_transform(spec: FractureSpec, frame: VertebraFrame, top: float, a_post: float,
                     height: float, depth: float) -> sitk.Transform | None:
    """Pull-back transform (output -> source points) of the spine above the fracture."""
    if spec.morphology == "biconcave" or spec.follow <= 0:
        return None
    tx = sitk.AffineTransform(3)
    if spec.morphology == "crush":
        tx.SetTranslation([float(v) for v in spec.follow * spec.height_loss * height * frame.up])
        return tx
    theta = spec.follow * np.arctan2(spec.height_loss * height, depth)
    # forward: rotate about the lateral axis through the posterior-superior corner so that the
    # anterior side goes down (anterior -> cos anterior - sin up); pull back = inverse rotation.
    u, a, l_ = frame.up, frame.anterior, frame.left
    basis = np.stack([a, u, l_], axis=1)                  # columns: local axes in LPS
    c, s = np.cos(theta), np.sin(theta)
    local = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # (a,u) -> (c a - s u, ...)
    forward = basis @ local @ basis.T
    pivot = frame.centre + top * u + a_post * a
    tx.SetCenter([float(v) for v in pivot])
    tx.SetMatrix([float(v) for v in forward.T.ravel()])   # inverse of a rotation
    return tx


def simulate_fracture(labels: sitk.Image, label: int, spec: FractureSpec,
                      subregions: sitk.Image | None = None,
                      centroids: dict[int, np.ndarray] | None = None) -> FractureResult:
    """Compress the body of vertebra ``label`` of ``labels`` as ``spec`` says.

    ``subregions`` (VerSe 41-50, same grid) gives the body where present; ``centroids`` (LPS mm,
    all labels) saves recomputing them. Returns the new maps on the same grid.
    """
    labels = as_label_image(labels)
    arr = sitk.GetArrayFromImage(labels)
    sub = (sitk.GetArrayFromImage(on_grid_of(subregions, labels)) if subregions is not None
           else None)
    cents = centroids if centroids is not None else label_centroids(labels)
    if label not in cents:
        raise ValueError(f"label {label} is not in the label map")
    frame = vertebra_frame(cents, label)
    boxes = label_boxes(arr)
    vbox = boxes[label]
    body_local = _body(arr, sub, labels, label, frame, vbox)
    zyx = np.nonzero(body_local)
    if len(zyx[0]) < 50:
        raise ValueError(f"label {label}: body too small to fracture ({len(zyx[0])} voxels)")
    pts = voxel_points(labels, tuple(i + s.start for i, s in zip(zyx, vbox)))
    t, a, w = frame.local(pts)
    a_post, a_ant = np.percentile(a, WALL_PERCENTILES)
    w_r, w_l = np.percentile(w, WALL_PERCENTILES)
    t_lo, t_hi = np.percentile(t, (1.0, 99.0))
    anchor = 0.5 * (t_lo + t_hi) if spec.morphology == "biconcave" else float(t.min())

    body = np.zeros(arr.shape, bool)
    body[vbox][body_local] = True
    box = tuple(slice(max(0, s.start - BOX_PAD), min(n, s.stop + BOX_PAD))
                for s, n in zip(vbox, arr.shape))
    walls = (a_post, a_ant, w_r, w_l)
    # the body's labels (and subregion values) move together: encode both in one uint8 map
    body_vals = np.where(body[box], arr[box], 0).astype(np.uint8)
    new_lab = _compress_body(body_vals, labels, box, frame, spec, anchor, walls)
    if sub is not None:
        sub_vals = np.where(body[box], sub[box], 0).astype(np.uint8)
        new_sub = _compress_body(sub_vals, labels, box, frame, spec, anchor, walls)

    order = level_sorted(cents)
    upper = order[:order.index(label)]
    out = np.where(body | np.isin(arr, upper), 0, arr).astype(np.uint8)
    out_sub = None if sub is None else np.where(body | np.isin(arr, upper), 0, sub)
    region = out[box]
    free = (region == 0) & (new_lab > 0)
    region[free] = new_lab[free]
    if out_sub is not None:
        out_sub[box][free] = new_sub[free]

    upper_mask = np.isin(arr, upper)
    if upper_mask.any():
        tx = _upper_transform(spec, frame, float(t_hi), float(a_post),
                              float(t_hi - t_lo), float(a_ant - a_post))
        moved = np.where(upper_mask, arr, 0).astype(np.uint8)
        moved_sub = None if sub is None else np.where(upper_mask, sub, 0).astype(np.uint8)
        if tx is not None:
            moved = sitk.GetArrayFromImage(sitk.Resample(
                _image(moved, labels), labels, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
            if moved_sub is not None:
                moved_sub = sitk.GetArrayFromImage(sitk.Resample(
                    _image(moved_sub, labels), labels, tx, sitk.sitkNearestNeighbor, 0,
                    sitk.sitkUInt8))
        free = (out == 0) & (moved > 0)
        out[free] = moved[free]
        if out_sub is not None:
            out_sub[free] = moved_sub[free]
    return FractureResult(_image(out, labels),
                          None if out_sub is None else _image(out_sub.astype(np.uint8), labels),
                          int(label), spec, frame)


def fracture_candidates(labels: sitk.Image, exclude=()) -> list[int]:
    """Labels that may be fractured: thoracic and lumbar levels (C1-C2 have no comparable body,
    cervical fractures are not osteoporotic ones), not in ``exclude``."""
    present = np.unique(sitk.GetArrayViewFromImage(labels))
    return [int(v) for v in present
            if int(v) in BY_LABEL and BY_LABEL[int(v)].region in "TL" and int(v) not in exclude]
