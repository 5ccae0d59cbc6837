"""One synthetic training volume from one real label map: :func:`synthesize`.

Order of the steps, and why:

1. the mask onto a 1 mm LPS grid with no random change (:func:`pose.to_lps_grid`), with room
   along z for what follows; subregions completed where the real map misses a body;
2. the next level beyond each complete end (:mod:`~pipeline.synthesis.extend`);
3. simulated fractures (:mod:`~pipeline.synthesis.fracture`) on complete, really normal thoracic
   or lumbar vertebrae; before the pose, so that the spine above a wedge can tilt within the
   grid and the field-of-view cut may cut a fractured vertebra like any other;
4. the random pose (:mod:`~pipeline.synthesis.pose`): rotation, scale, bending, field of view;
5. the rendering (:mod:`~pipeline.synthesis.render`), of the whole grid or of a box around one
   vertebra (a segmentation crop needs 144 mm, not the whole spine: 10-20 times less work).

Steps 1-4 (:func:`synthesize_labels`) and 5 (:func:`render_case`) are separate so a caller can
choose the vertebra before paying for the rendering. Every random draw comes from the one
``numpy.random.Generator`` passed in, in a fixed order: a seed reproduces the volume exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from pipeline.synthesis.extend import extend_spine, truncated_labels
from pipeline.synthesis.fracture import (
    MORPHOLOGIES,
    draw_fracture,
    fracture_candidates,
    simulate_fracture,
)
from pipeline.synthesis.geometry import (
    as_label_image,
    label_centroids,
    on_grid_of,
    pseudo_subregions,
)
from pipeline.synthesis.pose import PoseOptions, random_pose, to_lps_grid
from pipeline.synthesis.render import RenderOptions, render_ct_scene

#: Grade value of ``known_grades`` for a vertebra whose state is not known (a lesion, a
#: non-osteoporotic fracture, an unreadable rating): never a crop centre, never fractured here.
UNCERTAIN = -1


@dataclass(frozen=True)
class SynthOptions:
    """Options of :func:`synthesize`.

    Attributes:
        pose: the random pose.
        render: the random appearance.
        fracture_probability: chance that a volume gets simulated fractures.
        max_fractures: most simulated fractures per volume (1..max, uniform).
        grades: Genant grades drawn from (uniform).
        morphologies: morphologies drawn from (uniform).
        extend_probability: chance of adding the next level at each complete end.
        z_room_mm: background added along z before the pose (room for added levels and for
            the spine tilted by a wedge fracture).
    """

    pose: PoseOptions = field(default_factory=PoseOptions)
    render: RenderOptions = field(default_factory=RenderOptions)
    fracture_probability: float = 0.5
    max_fractures: int = 2
    grades: tuple[int, ...] = (1, 2, 3)
    morphologies: tuple[str, ...] = MORPHOLOGIES
    extend_probability: float = 0.7
    z_room_mm: float = 50.0

    def with_scene(self, **changes) -> "SynthOptions":
        """These options with the scene's probabilities changed
        (:class:`~pipeline.synthesis.scene.SceneOptions` fields, e.g. ``myelography=0.3``)."""
        scene = replace(self.render.scene, **changes)
        return replace(self, render=replace(self.render, scene=scene))


@dataclass
class SynthLabels:
    """A posed (and possibly fractured) label map, before rendering.

    Attributes:
        labels: uint8 VerSe labels on the posed 1 mm LPS grid.
        subregions: uint8 subregions (VerSe 41-50, bodies approximated where none were given).
        fractures: level label -> (Genant grade, morphology): simulated ones, and real ones
            from ``known_grades`` (morphology ``"unknown"``).
        uncertain: labels whose real state is not known (:data:`UNCERTAIN`).
        added: labels made by extension (copies of the end vertebra).
    """

    labels: sitk.Image
    subregions: sitk.Image
    fractures: dict[int, tuple[int, str]]
    uncertain: frozenset[int] = frozenset()
    added: tuple[int, ...] = ()


@dataclass
class SynthCase:
    """A synthetic CT and its ground truth.

    Attributes:
        ct: float32 HU on the posed grid (or the box of it that was rendered).
        labels: uint8 VerSe labels on the same grid.
        fractures: level label -> (Genant grade, morphology) of the fractured vertebrae present.
        centroids_mm: level label -> centroid (LPS mm) of every vertebra present in ``labels``.
        uncertain: labels whose real state is not known: leave them out of fracture targets.
        s1_mm: centre (LPS mm) of the S1 body where a sacrum was drawn below the last lumbar
            vertebra (it may lie outside the rendered grid), else ``None``.
    """

    ct: sitk.Image
    labels: sitk.Image
    fractures: dict[int, tuple[int, str]]
    centroids_mm: dict[int, tuple[float, float, float]]
    uncertain: frozenset[int] = frozenset()
    s1_mm: tuple[float, float, float] | None = None


def synthesize_labels(labels: sitk.Image, rng: np.random.Generator,
                      subregions: sitk.Image | None = None,
                      options: SynthOptions = SynthOptions(),
                      known_grades: dict[int, int] | None = None,
                      fracture_at: Sequence[int] = (), keep: Sequence[int] = ()
                      ) -> SynthLabels:
    """Steps 1-4 of the module docstring. ``known_grades`` = real Genant grades of the mask
    (0 normal, 1-3 fractured, :data:`UNCERTAIN`); real fractures stay fractured.
    ``fracture_at``: levels to fracture in any case (where they may be: complete thoracic or
    lumbar vertebrae known to be normal), besides the random ones. ``keep``: levels the random
    field of view never cuts."""
    labels = as_label_image(labels)
    known = dict(known_grades or {})
    if subregions is not None:
        subregions = on_grid_of(subregions, labels)
    truncated = truncated_labels(labels)
    sp = options.pose.spacing_mm
    lps = to_lps_grid(labels, subregions, sp, (10.0, 10.0, options.z_room_mm))
    lab = lps.labels
    sub = pseudo_subregions(lab, lps.subregions)

    abnormal = {k for k, g in known.items() if g != 0}
    ext = extend_spine(lab, rng, sub, truncated, options.extend_probability, abnormal)
    lab, sub = ext.labels, ext.subregions

    exclude = set(truncated) | set(ext.added) | abnormal
    cands = fracture_candidates(lab, exclude)
    chosen = [int(v) for v in fracture_at if int(v) in cands]
    if options.fracture_probability > 0 and rng.random() < options.fracture_probability:
        rest = [v for v in cands if v not in chosen]
        n = min(len(rest), int(rng.integers(1, options.max_fractures + 1)))
        chosen += [int(v) for v in (rng.choice(rest, size=n, replace=False) if n else [])]
    fractures: dict[int, tuple[int, str]] = {}
    for label in chosen:
        spec = draw_fracture(rng, int(rng.choice(options.grades)),
                             str(rng.choice(options.morphologies)))
        try:
            res = simulate_fracture(lab, label, spec, sub)
        except ValueError:          # a body too small to compress (a partial mask): leave it
            continue
        lab, sub = res.labels, res.subregions
        fractures[label] = (spec.grade, spec.morphology)
    for label, grade in known.items():
        if grade in (1, 2, 3):
            fractures[int(label)] = (int(grade), "unknown")

    posed = random_pose(lab, rng, sub, options.pose, keep)
    present = set(label_centroids(posed.labels))
    return SynthLabels(posed.labels, posed.subregions,
                       {k: v for k, v in fractures.items() if k in present},
                       frozenset(k for k, g in known.items() if g == UNCERTAIN and k in present),
                       tuple(a for a in ext.added if a in present))


def focus_box(labels: sitk.Image, centre_mm, half_width_mm: float) -> tuple[list[int], list[int]]:
    """``(index, size)`` (x, y, z) of the part of ``labels``' grid within ``half_width_mm`` of
    ``centre_mm`` along each axis."""
    c = np.asarray(centre_mm, float)
    a = labels.TransformPhysicalPointToIndex([float(v) for v in c - half_width_mm])
    b = labels.TransformPhysicalPointToIndex([float(v) for v in c + half_width_mm])
    lo = [max(0, min(i, j)) for i, j in zip(a, b)]
    hi = [min(n - 1, max(i, j)) for i, j, n in zip(a, b, labels.GetSize())]
    return lo, [h - low + 1 for low, h in zip(lo, hi)]


def render_case(case: SynthLabels, rng: np.random.Generator,
                options: SynthOptions = SynthOptions(), focus_mm=None,
                half_width_mm: float | None = None) -> SynthCase:
    """Step 5: render ``case``; with ``focus_mm`` (LPS) and ``half_width_mm``, only the box of
    that half width around it (the scene is still planned on the whole case, so the sacrum, the
    ribs and the vessels are where they would be)."""
    labels, sub = case.labels, case.subregions
    context = None
    if focus_mm is not None and half_width_mm is not None:
        index, size = focus_box(labels, focus_mm, half_width_mm)
        context = (labels, sub)
        labels = sitk.RegionOfInterest(labels, size, index)
        sub = sitk.RegionOfInterest(sub, size, index)
    ct, scene = render_ct_scene(labels, rng, sub, options.render, context=context)
    cents = {k: tuple(float(c) for c in v) for k, v in label_centroids(labels).items()}
    s1 = None if scene.s1_centre is None else tuple(float(c) for c in scene.s1_centre)
    return SynthCase(ct, labels, {k: v for k, v in case.fractures.items() if k in cents}, cents,
                     frozenset(k for k in case.uncertain if k in cents), s1)


def synthesize(labels: sitk.Image, rng: np.random.Generator,
               subregions: sitk.Image | None = None, options: SynthOptions = SynthOptions(),
               known_grades: dict[int, int] | None = None) -> SynthCase:
    """A synthetic CT of the anatomy of ``labels`` (VerSe labels, any orientation and spacing;
    ``subregions`` = its VerSe subregion mask, optional): random pose, random fractures,
    random appearance, all drawn from ``rng``."""
    return render_case(synthesize_labels(labels, rng, subregions, options, known_grades), rng,
                       options)
