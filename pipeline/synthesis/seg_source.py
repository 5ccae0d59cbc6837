"""Segmentation training crops from real anatomy: :class:`Sample` s made by :func:`synthesize`.

The segmentation trainer (:mod:`pipeline.segmentation.train`) consumes
:class:`pipeline.segmentation.dataset.Sample`: a HU crop of ``crop_size + 2 margin`` voxels of
``crop_spacing_mm`` (64 + 2 x 4 at 2 mm shipped) around a vertebra centroid, cut by
:func:`pipeline.segmentation.crops.ct_crop`, with the centre vertebra's occupancy in eighths
and a ``fractured`` flag. The samples here are cut by the very same
:func:`pipeline.segmentation.dataset.case_samples`, so they are interchangeable with the
phantom's: a trainer mixes the two lists (:class:`MixedPools`).

Per synthetic case: one real mask (round robin over the masks), a random level of it and its
nearest neighbours as crop centres, the part of the mask within 130 mm of that level posed and
fractured at random, then each crop rendered only in a box around its vertebra with its own
random appearance (a crop needs 144 mm; rendering and posing a whole C1-L5 spine costs 10-20
times more). A vertebra is a crop centre only when it is whole (not cut by the source scan, the
window or the random field of view) and its real state is known. With probability
``fractured_share`` the case's first crop is centred on a fractured vertebra (simulated there,
unless it is a real fracture rated Genant 1-3); neighbours may be fractured too.

Which masks: :func:`find_masks` lists VerSe-labelled masks under the real-data folder and keeps
the subjects of the training split (``pipeline/realdata/split.json``), never the validation
subjects; real grades come from the folder's ``grades.json`` (:func:`real_grades`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL, BY_NAME
from pipeline.realdata.pack import FXGRADER_AS_GRADE
from pipeline.segmentation.dataset import (
    Sample,
    case_samples,
    load_samples,
    margin_for,
    save_samples,
)
from pipeline.segmentation.infer import CROP_SIZE, CROP_SPACING_MM
from pipeline.synthesis.generate import (
    UNCERTAIN,
    SynthLabels,
    SynthOptions,
    render_case,
    synthesize_labels,
)
from pipeline.synthesis.geometry import label_boxes, label_centroids, level_sorted, on_grid_of
from pipeline.synthesis.pose import PoseOptions

#: The training/validation split of the real data (subjects), relative to this package.
SPLIT_JSON = Path(__file__).resolve().parents[1] / "realdata" / "split.json"
#: Extra mm rendered around a crop (the crop's linear interpolation and block averaging).
RENDER_PAD_MM = 6.0
#: Half width (mm) of the part of a long mask synthesised for a crop (:func:`window`).
WINDOW_MM = 130.0
#: Synthesis options of the crops: fewer field-of-view cuts than for whole volumes (a cut
#: through a crop's own vertebra discards the crop), fewer random extra fractures (the crop
#: centre's fracture is drawn by ``fractured_share``).
SEG_SYNTH_OPTIONS = SynthOptions(pose=PoseOptions(fov_probability=0.25), fracture_probability=0.3)
#: Bump when the synthesis changes, so that old caches are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class RealMask:
    """One real label map to synthesise from.

    Attributes:
        labels: path of the VerSe vertebra mask.
        subregions: path of its VerSe subregion mask, where there is one.
        subject: subject id (the unit of the train/validation split).
        grades: real Genant grade per label (0, 1-3, :data:`UNCERTAIN`); labels absent = not
            rated, taken as normal.
    """

    labels: Path
    subregions: Path | None
    subject: str
    grades: dict[int, int] = field(default_factory=dict)

    def read(self) -> tuple[sitk.Image, sitk.Image | None]:
        """The label map and its subregion mask (``None`` where there is none), the latter on
        the label map's grid."""
        labels = sitk.ReadImage(str(self.labels))
        sub = sitk.ReadImage(str(self.subregions)) if self.subregions is not None else None
        return labels, (on_grid_of(sub, labels) if sub is not None else None)


def training_subjects(split_json: Path = SPLIT_JSON) -> list[str]:
    """The ``train`` subjects of the real-data split."""
    return list(json.loads(Path(split_json).read_text())["train"])


def _scan_id(mask: Path) -> str:
    name = mask.name
    for suffix in ("_seg-vert_msk.nii.gz", "_seg-vert_msk.nii", "_msk.nii.gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def real_grades(mask: Path, subject: str, grades: dict) -> dict[int, int]:
    """Genant grades of a mask's vertebrae from the real data's ``grades.json`` content:
    ``healthivert`` (VerSe'19, per label) or ``fxgrader`` (per scan, FX-Grader codes)."""
    out: dict[int, int] = {}
    for entry in grades.get("healthivert", {}).get(subject, {}).values():
        out[int(entry["label"])] = int(entry["grade"])
    scan = grades.get("fxgrader", {}).get(subject, {}).get(_scan_id(mask), {})
    for name, code in scan.items():
        if name.upper() not in BY_NAME or code in ("", None):
            continue
        code = int(code)
        grade = FXGRADER_AS_GRADE.get(code, UNCERTAIN)
        out[BY_NAME[name.upper()].label] = grade
    return out


def find_masks(root: Path | str, subjects: Iterable[str] | None = None) -> list[RealMask]:
    """Every VerSe-labelled vertebra mask under ``root`` (``*_seg-vert_msk.nii.gz``, and
    HealthiVert's ``NNNN_msk.nii.gz``), of ``subjects`` only where given, with its subregion
    mask and real grades. Subject folders lie in ``root`` (the real-spine pack) or in its
    ``derivatives`` (the VerSe layout). Binary masks (one label 1) are left out: they are not
    VerSe labels."""
    root = Path(root)
    keep = None if subjects is None else set(subjects)
    grades_path = root / "grades.json"
    grades = json.loads(grades_path.read_text()) if grades_path.exists() else {}
    out = []
    bases = [root] + [root / "derivatives"] * (root / "derivatives").is_dir()
    for sub_dir in sorted(p for base in bases for p in base.iterdir() if p.is_dir()):
        subject = sub_dir.name
        if keep is not None and subject not in keep:
            continue
        masks = sorted(sub_dir.glob("*_seg-vert_msk.nii.gz"))
        masks += sorted(p for p in sub_dir.glob("*_msk.nii.gz")
                        if "_seg-" not in p.name and "seg-vert" not in p.name
                        and "label-" not in p.name and p.name[:4].isdigit())
        for m in masks:
            sub_path = m.with_name(m.name.replace("_seg-vert_msk", "_seg-subreg_msk"))
            out.append(RealMask(m, sub_path if sub_path != m and sub_path.exists() else None,
                                subject, real_grades(m, subject, grades)))
    return [m for m in out if not _binary(m.labels)]


def _binary(path: Path) -> bool:
    img = sitk.ReadImage(str(path))
    vals = np.unique(sitk.GetArrayViewFromImage(img))
    return set(vals.tolist()) <= {0, 1}


def whole_vertebrae(case: SynthLabels, truncated: Iterable[int] = ()) -> list[int]:
    """Vertebrae of a posed case that may centre a crop: not cut by the grid's z ends (the
    random field of view), not in ``truncated`` (cut in the source, or copies made by
    extension), real state known."""
    arr = sitk.GetArrayViewFromImage(case.labels)
    boxes = label_boxes(np.asarray(arr))
    nz = arr.shape[0]
    out = []
    for lab, box in boxes.items():
        if lab not in BY_LABEL or lab in case.uncertain or lab in set(truncated):
            continue
        if box[0].start == 0 or box[0].stop == nz:
            continue
        out.append(lab)
    return out


def window(labels: sitk.Image, sub: sitk.Image | None, centre_mm: np.ndarray, half_mm: float
           ) -> tuple[sitk.Image, sitk.Image | None]:
    """The part of the source grid within ``half_mm`` (along each patient axis) of
    ``centre_mm``: the spine beyond it cannot reach a crop around the centre, and posing and
    fracturing a long mask (C1-L5) whole costs seconds. Vertebrae cut by the window count as
    cut by a field of view (never crop centres, never extended)."""
    corners = [centre_mm + half_mm * np.array([i, j, k]) for i in (-1, 1) for j in (-1, 1)
               for k in (-1, 1)]
    idx = np.array([labels.TransformPhysicalPointToContinuousIndex([float(v) for v in p])
                    for p in corners])
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, np.array(labels.GetSize()))
    size, index = [int(v) for v in hi - lo], [int(v) for v in lo]
    out = sitk.RegionOfInterest(labels, size, index)
    return out, (sitk.RegionOfInterest(sub, size, index) if sub is not None else None)


def crop_targets(labels: sitk.Image, grades: dict[int, int], rng: np.random.Generator,
                 crops: int) -> list[int]:
    """A random level of known state (not truncated by the source scan) and its nearest
    neighbours, ``crops`` levels in all: the crop centres of one case."""
    from pipeline.synthesis.extend import truncated_labels

    cents = label_centroids(labels)
    cut = truncated_labels(labels)
    levels = [k for k in level_sorted(cents) if grades.get(k, 0) != UNCERTAIN and k not in cut]
    if not levels:
        return []
    k = int(rng.integers(len(levels)))
    near = sorted(range(len(levels)), key=lambda i: (abs(i - k), rng.random()))
    return [levels[i] for i in near[:crops]]


def posed_case(mask: RealMask, rng: np.random.Generator, options: SynthOptions, crops: int,
               fractured_share: float, window_mm: float | None = WINDOW_MM
               ) -> tuple[SynthLabels, list[int], set[int]] | None:
    """Steps 1-4 of the synthesis for ``crops`` target levels of ``mask``: a random level and
    its neighbours (:func:`crop_targets`), the first fractured with probability
    ``fractured_share`` (simulated, unless it is a real fracture), only the part of the mask
    within ``window_mm`` of the first level (:func:`window`). Returns the posed labels, the
    targets and the vertebrae whole in them (:func:`whole_vertebrae`); ``None`` without a
    target."""
    from pipeline.synthesis.extend import truncated_labels

    labels, sub = mask.read()
    targets = crop_targets(labels, mask.grades, rng, crops)
    if not targets:
        return None
    if window_mm is not None:
        labels, sub = window(labels, sub, label_centroids(labels)[targets[0]], window_mm)
    want_fracture = rng.random() < fractured_share
    case = synthesize_labels(labels, rng, sub, options, mask.grades,
                             fracture_at=targets[:1] if want_fracture else (), keep=targets)
    whole = set(whole_vertebrae(case, set(truncated_labels(labels)) | set(case.added)))
    return case, targets, whole


def case_crops(mask: RealMask, rng: np.random.Generator, options: SynthOptions,
               crops: int = 1, fractured_share: float = 0.33, crop_size: int = CROP_SIZE,
               crop_spacing_mm: float = CROP_SPACING_MM, name: str = "synth",
               window_mm: float | None = WINDOW_MM) -> list[Sample]:
    """Up to ``crops`` segmentation samples from one synthetic case of ``mask``: a random level
    and its neighbours (:func:`crop_targets`); with probability ``fractured_share`` the first
    is fractured (simulated, unless it is a real fracture). Only the part of the mask within
    ``window_mm`` of the first level is synthesised (:func:`window`)."""
    posed = posed_case(mask, rng, options, crops, fractured_share, window_mm)
    if posed is None:
        return []
    case, targets, whole = posed
    cents = label_centroids(case.labels)
    margin = margin_for(crop_spacing_mm)
    half = 0.5 * (crop_size + 2 * margin) * crop_spacing_mm + RENDER_PAD_MM
    out: list[Sample] = []
    for lab in targets:
        if lab not in whole:
            continue
        rendered = render_case(case, rng, options, focus_mm=cents[lab], half_width_mm=half)
        vert = {"label": lab, "centroid_mm": rendered.centroids_mm[lab],
                "fractured": lab in rendered.fractures, "name": BY_LABEL[lab].name}
        out += case_samples(f"{name}/{mask.subject}", rendered.ct, rendered.labels, [vert],
                            crop_size, crop_spacing_mm, margin)
    return out


def _tag(masks: Sequence[RealMask], options: SynthOptions, crops: int, share: float,
         crop_size: int, crop_spacing_mm: float) -> str:
    """Cache key of a set of masks and settings."""
    text = json.dumps([CACHE_VERSION, [str(m.labels) for m in masks], repr(options), crops,
                       share, crop_size, crop_spacing_mm])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def write_case_cache(k: int, masks: Sequence[RealMask], seed: int, cache_dir: Path,
                     options: SynthOptions, crops: int, fractured_share: float, crop_size: int,
                     crop_spacing_mm: float, tag: str) -> Path:
    """Synthesise case ``k`` (mask ``k mod len(masks)``, generator ``[seed, k]``) and write its
    samples to the cache; module-level so that worker processes can run it."""
    mask = masks[k % len(masks)]
    rng = np.random.default_rng([seed, k])
    samples = case_crops(mask, rng, options, crops, fractured_share, crop_size, crop_spacing_mm,
                         name=f"synth-{seed}-{k}")
    path = Path(cache_dir) / f"seg-synth-{tag}-{seed}-{k}.npz"
    if samples:
        save_samples(samples, path)
    else:
        path.with_suffix(".empty").write_text("no whole vertebra\n")
    return path


def cached_synth_samples(masks: Sequence[RealMask], cases: int, cache_dir: Path | str,
                         seed: int = 0, options: SynthOptions | None = None, crops: int = 2,
                         fractured_share: float = 0.33, crop_size: int = CROP_SIZE,
                         crop_spacing_mm: float = CROP_SPACING_MM, workers: int = 1,
                         log=print) -> list[Sample]:
    """Samples of ``cases`` synthetic cases (up to ``crops`` each), generated once and cached
    under ``cache_dir`` (the missing ones by ``workers`` processes), in case order."""
    from pipeline.training import generate_parallel

    if not masks:
        raise ValueError("no real masks to synthesise from")
    options = options or SEG_SYNTH_OPTIONS
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = _tag(masks, options, crops, fractured_share, crop_size, crop_spacing_mm)

    def path(k: int) -> Path:
        return cache_dir / f"seg-synth-{tag}-{seed}-{k}.npz"

    missing = [k for k in range(cases)
               if not path(k).exists() and not path(k).with_suffix(".empty").exists()]
    work = partial(write_case_cache, masks=list(masks), seed=seed, cache_dir=cache_dir,
                   options=options, crops=crops, fractured_share=fractured_share,
                   crop_size=crop_size, crop_spacing_mm=crop_spacing_mm, tag=tag)
    generate_parallel(missing, work, workers, log)
    out: list[Sample] = []
    for k in range(cases):
        if path(k).exists():
            out.extend(load_samples(path(k)))
    return out


class SynthSegSource:
    """An endless stream of synthetic samples (no cache): ``next(source)`` is one sample.

    Slow on a CPU (a few seconds a crop): for training on a CPU prefer
    :func:`cached_synth_samples`; this is for a GPU machine with spare cores, or a notebook.
    """

    def __init__(self, masks: Sequence[RealMask], seed: int = 0,
                 options: SynthOptions | None = None, fractured_share: float = 0.33,
                 crop_size: int = CROP_SIZE, crop_spacing_mm: float = CROP_SPACING_MM):
        if not masks:
            raise ValueError("no real masks to synthesise from")
        self.masks = list(masks)
        self.seed = seed
        self.options = options or SEG_SYNTH_OPTIONS
        self.fractured_share = fractured_share
        self.geometry = (crop_size, crop_spacing_mm)
        self._k = 0
        self._pending: list[Sample] = []

    def __iter__(self) -> "SynthSegSource":
        return self

    def __next__(self) -> Sample:
        while not self._pending:
            k, self._k = self._k, self._k + 1
            self._pending = case_crops(self.masks[k % len(self.masks)],
                                       np.random.default_rng([self.seed, k]), self.options, 1,
                                       self.fractured_share, *self.geometry,
                                       name=f"synth-{self.seed}-{k}")
        return self._pending.pop(0)


class MixedPools:
    """Draws training samples from phantom crops and synthetic crops.

    Each draw takes a synthetic crop with probability ``synth_fraction`` (else a phantom one);
    within the chosen list a fractured crop with probability ``fractured_share`` (the
    segmentation trainer's own rule: fractured crops are a minority, sampled at up to a third).
    """

    def __init__(self, phantom: Sequence[Sample], synthetic: Sequence[Sample],
                 synth_fraction: float, fractured_share: float = 0.33):
        self.lists = [list(phantom), list(synthetic)]
        self.pools = [([i for i, s in enumerate(lst) if s.fractured],
                       [i for i, s in enumerate(lst) if not s.fractured]) for lst in self.lists]
        self.synth_fraction = float(synth_fraction) if synthetic else 0.0
        self.fractured_share = fractured_share
        if not phantom and not synthetic:
            raise ValueError("no samples")

    def pick(self, rng: np.random.Generator) -> Sample:
        which = 1 if (not self.lists[0] or rng.random() < self.synth_fraction) else 0
        frac, norm = self.pools[which]
        pool = frac if (frac and rng.random() < self.fractured_share) else norm or frac
        return self.lists[which][pool[int(rng.integers(len(pool)))]]
