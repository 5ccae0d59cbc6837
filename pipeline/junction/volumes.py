"""Training volumes of the junction classifier: CT on a 4 mm LPS grid with every vertebra's
centroid and the S1 body's centre where a sacrum lies in the field of view; their query points
and targets (:func:`queries`).

Three sources: volumes synthesised from the real masks of the split's ``train`` side
(:func:`pipeline.synthesis.generate.synthesize`, whose scene draws a sacrum below most last
lumbar vertebrae and records where S1 is), phantoms of training seeds (whose anatomy always
continues into the sacrum; the acquisition decides whether it is in view), and the real CTs of
the ``train`` side (:func:`real_volumes`: the expert masks give the vertebrae; S1 is where the
mask labels it, else a step below a last lumbar vertebra where that point is in the field of
view). Synthesised and phantom volumes are cached as one ``.npz`` each, keyed by source and seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from pipeline.junction.grid import SPACING_MM, hu_grid
from pipeline.levels import BY_LABEL, LEVELS

#: S1 counts as in view while its centre lies at most this far beyond the grid along z (its
#: upper endplate and the lumbosacral disc are then in view).
S1_REACH_MM = 6.0
#: Cache format version: bump when a volume of the same seed changes.
VERSION = 1


@dataclass
class JunctionVolume:
    """One training volume.

    Attributes:
        name: source and seed.
        hu: ``[z, y, x]`` int16 HU on the LPS grid of ``spacing_mm`` (z increases cranially).
        centers: ``(len(LEVELS), 3)`` continuous ``[z, y, x]`` indices; NaN for absent levels.
        s1: ``[z, y, x]`` index of the S1 body centre where it lies in the volume, else NaN.
        spacing_mm: grid spacing.
    """

    name: str
    hu: np.ndarray
    centers: np.ndarray
    s1: np.ndarray
    spacing_mm: float = SPACING_MM

    def save(self, path: Path) -> None:
        np.savez_compressed(path, name=self.name, hu=self.hu, centers=self.centers, s1=self.s1,
                            spacing_mm=self.spacing_mm)

    @classmethod
    def load(cls, path: Path) -> "JunctionVolume":
        z = np.load(path)
        return cls(str(z["name"]), z["hu"], z["centers"], z["s1"], float(z["spacing_mm"]))

    def chain(self) -> list[int]:
        """Rows of the vertebrae present, cranial to caudal."""
        rows = [k for k in range(len(self.centers)) if not np.isnan(self.centers[k, 0])]
        return sorted(rows, key=lambda k: -self.centers[k, 0])

    def last_mobile(self) -> int | None:
        """Row of the lowest vertebra present (the last mobile one when S1 is in view)."""
        order = self.chain()
        return order[-1] if order else None


def make_volume(name: str, ct: sitk.Image, centroids_mm: dict[int, tuple[float, float, float]],
                s1_mm: tuple[float, float, float] | None) -> JunctionVolume:
    """A :class:`JunctionVolume` of ``ct`` with VerSe-labelled centroids (LPS mm)."""
    img = hu_grid(ct)
    hu = np.clip(np.rint(sitk.GetArrayViewFromImage(img)), -1024, 3071).astype(np.int16)
    shape = np.array(hu.shape)

    def index(p) -> np.ndarray:
        x, y, z = img.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p))
        return np.array([z, y, x])

    centers = np.full((len(LEVELS), 3), np.nan)
    for label, xyz in centroids_mm.items():
        if int(label) in BY_LABEL:
            idx = index(xyz)
            if np.all(idx >= -0.5) and np.all(idx <= shape - 0.5):
                centers[LEVELS.index(BY_LABEL[int(label)])] = idx
    s1 = np.full(3, np.nan)
    if s1_mm is not None:
        idx = index(s1_mm)
        reach = np.array([S1_REACH_MM / SPACING_MM, 0.0, 0.0])
        if np.all(idx >= -reach) and np.all(idx <= shape - 1 + reach):
            s1 = idx
    return JunctionVolume(name, hu, centers, s1)


#: Chance that the random field of view keeps a mask's last lumbar vertebra whole (the region
#: below it, where the sacrum is drawn, may still be cut): junctions are otherwise rare.
KEEP_LAST_LUMBAR = 0.7


def synth_volume(mask, rng: np.random.Generator, name: str, options=None,
                 keep_last: bool | None = None) -> JunctionVolume:
    """One volume synthesised from a real train-side mask (:class:`RealMask`); ``options``
    (:class:`SynthOptions`) default to the trainers' at 2 mm, and the field of view keeps the
    last lumbar vertebra whole with chance :data:`KEEP_LAST_LUMBAR` unless ``keep_last`` says."""
    from dataclasses import replace

    from pipeline.synthesis.generate import SynthOptions, render_case, synthesize_labels
    from pipeline.synthesis.scene import LAST_LUMBAR

    labels, sub = mask.read()
    base = options or SynthOptions()
    options = replace(base, pose=replace(base.pose, spacing_mm=2.0))
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    keep = [lab for lab in LAST_LUMBAR if lab in present][-1:]
    draw = rng.random() < KEEP_LAST_LUMBAR
    keep = keep if (draw if keep_last is None else keep_last) else []
    posed = synthesize_labels(labels, rng, sub, options, mask.grades, keep=keep)
    case = render_case(posed, rng, options)
    return make_volume(name, case.ct, case.centroids_mm, case.s1_mm)


def phantom_volume(seed: int) -> JunctionVolume:
    """Phantom ``seed`` (a training seed) on the classifier's grid, with its S1."""
    from pipeline.phantom import generate
    from pipeline.phantom.generator import STREAM_ACQ, build_scene, draw_acquisition
    from pipeline.seeds import refuse_evaluation_seeds

    refuse_evaluation_seeds([seed])
    ph = generate(seed, spacing_mm=2.0)
    acq = draw_acquisition(np.random.default_rng([seed, STREAM_ACQ]))
    anatomy = build_scene(seed, None, "auto", acq).anatomy
    sacral = [v for v in anatomy.vertebrae if v.sacrum]
    s1 = tuple(float(c) for c in sacral[0].center) if sacral else None
    cents = {v["label"]: v["centroid_mm"] for v in ph.gt["vertebrae"]}
    return make_volume(f"phantom-{seed}", ph.ct, cents, s1)


def cached_volumes(cache_dir: Path, sources: list[tuple[str, int]], pack: Path | None,
                   log: Callable[[str], None] = lambda s: None,
                   myelography: float = 0.0) -> list[JunctionVolume]:
    """The volumes of ``sources`` (``("phantom", seed)`` or ``("synth-<S>", k)``: the k-th
    volume of synthesis seed S, round robin over the train-side masks of ``pack``, with
    contrast in the spinal canal in ``myelography`` of them), each made once and cached under
    ``cache_dir``."""
    from pipeline.synthesis.generate import SynthOptions
    from pipeline.synthesis.seg_source import find_masks, training_subjects

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    masks = None
    options = SynthOptions().with_scene(myelography=myelography)
    out = []
    for i, (kind, k) in enumerate(sources):
        tag = f"-my{myelography:g}" if kind != "phantom" and myelography > 0 else ""
        path = cache_dir / f"junction-{kind}-{k}{tag}-v{VERSION}.npz"
        if not path.exists():
            if kind == "phantom":
                vol = phantom_volume(k)
            else:
                if masks is None:
                    if pack is None:
                        raise ValueError("synthesised volumes need the real-spine pack")
                    masks = find_masks(pack, training_subjects())
                    if not masks:
                        raise ValueError(f"{pack}: no vertebra mask of a training subject")
                seed = int(kind.split("-", 1)[1])
                mask = masks[k % len(masks)]
                vol = synth_volume(mask, np.random.default_rng([seed, k]),
                                   f"{kind}-{k}{tag}-{mask.subject}", options)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")   # writers may race
            vol.save(tmp)
            tmp.replace(path)
            log(f"volume {i + 1}/{len(sources)}: {vol.name}")
        out.append(JunctionVolume.load(path))
    return out


def real_volumes(pack: Path, subjects: list[str]) -> list[JunctionVolume]:
    """The real CTs of ``subjects`` (train side only) as volumes. S1: TotalSegmentator's S1
    label where the mask has it; else, where the mask's lowest vertebra is L5 or L6 and not cut
    by the field of view, the point a step (the last inter-centroid vector) below it, kept only
    where it lies in the field (:data:`S1_REACH_MM`); a mask ending higher has no S1."""
    from pipeline.realdata.pack import iter_pack_cases
    from pipeline.realdata.split import load_split
    from pipeline.realdata.truth import axial_lps, truth_vertebrae
    from pipeline.verse import centroids_from_mask

    train = set(load_split().train)
    bad = sorted(set(subjects) - train)
    if bad:
        raise ValueError(f"{', '.join(bad)}: not on the train side of the split")
    out = []
    for case in iter_pack_cases(Path(pack), subjects):
        mask = axial_lps(case.mask)
        truth = sorted(truth_vertebrae(case, mask), key=lambda v: -v["centroid_mm"][2])
        if not truth:
            continue
        cents = {int(v["label"]): tuple(v["centroid_mm"]) for v in truth}
        raw = centroids_from_mask(case.mask)
        s1 = None
        if TOTALSEG_S1 in raw and case.subject.startswith("totalseg"):
            s1 = tuple(float(c) for c in raw[TOTALSEG_S1])
        elif len(truth) >= 2 and BY_LABEL[int(truth[-1]["label"])].name in ("L5", "L6") \
                and not truth[-1].get("partial"):
            a, b = (np.asarray(truth[k]["centroid_mm"], float) for k in (-2, -1))
            s1 = tuple(float(c) for c in b + (b - a))
        out.append(make_volume(f"real-{case.case_id}", case.ct, cents, s1))
    return out


#: TotalSegmentator v2's label of S1 (the pack's totalseg-example).
TOTALSEG_S1 = 26


@dataclass(frozen=True)
class Query:
    """A query point of a training volume and its target."""

    point: np.ndarray        # [z, y, x] continuous index
    target: int              # 1: the last mobile vertebra with S1 in view below
    hard: bool               # a near miss: the vertebra above, S1 itself, a last one cut off


def queries(vol: JunctionVolume) -> list[Query]:
    """Every query point of ``vol``: each vertebra's centroid, S1 and the point a step below
    the last vertebra (the bone or emptiness a missed vertebra would leave)."""
    order = vol.chain()
    if not order:
        return []
    last = order[-1]
    has_s1 = not np.isnan(vol.s1[0])
    out = []
    for i, k in enumerate(order):
        positive = has_s1 and k == last
        hard = (k == last) or (i == len(order) - 2)
        out.append(Query(vol.centers[k], int(positive), hard and not positive))
    below = None
    if has_s1:
        out.append(Query(vol.s1, 0, True))
        below = vol.s1 + (vol.s1 - vol.centers[last])
    elif len(order) > 1:
        below = vol.centers[last] + (vol.centers[last] - vol.centers[order[-2]])
    if below is not None and below[0] >= -2.0:
        out.append(Query(below, 0, True))
    return out
