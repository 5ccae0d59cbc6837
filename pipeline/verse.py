"""Reading data laid out as the VerSe challenge (VerSe'19 / VerSe'20) and as the phantom exports it.

A case is a CT (``*_ct.nii.gz``), a vertebra mask (``*_seg-vert_msk.nii.gz``, VerSe labels) and a
centroid file (``*_seg-subreg_ctd.json``). Layouts understood:

- VerSe'20 / BIDS VerSe'19: ``rawdata/sub-verse004/sub-verse004_ct.nii.gz`` with
  ``derivatives/sub-verse004/sub-verse004_seg-vert_msk.nii.gz`` and
  ``..._seg-subreg_ctd.json`` (also ``sub-gl003_dir-ax_ct.nii.gz`` style ids);
- VerSe'19 original: ``verse004.nii.gz``, ``verse004_seg.nii.gz``, ``verse004_ctd.json``;
- the phantom (``spine-node phantom`` ``DIR/verse/``): ``ct.nii.gz``, ``seg-vert_msk.nii.gz``,
  ``ctd.json``.

Centroid JSON (VerSe): ``[{"direction": ["P", "I", "R"]}, {"label": 20, "X": .., "Y": .., "Z": ..},
...]``. The direction codes name, per axis, the anatomical direction in which that axis
increases (nibabel axis codes). X, Y, Z are voxel coordinates of the image reoriented to those
codes and scaled to 1 mm: ``X = index along the first reoriented axis * its spacing`` (mm from
the first voxel centre of the reoriented image). :func:`ctd_to_lps` and :func:`lps_to_ctd`
convert both ways; the phantom's export and this loader round-trip exactly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
_CT_PATTERNS = (re.compile(r"^(?P<id>.+)_ct\.nii(\.gz)?$"), re.compile(r"^(?P<id>ct)\.nii(\.gz)?$"),
                re.compile(r"^(?P<id>verse\d+)\.nii(\.gz)?$"))


class VerseError(ValueError):
    """A VerSe case that cannot be read (missing file, unknown direction code, ...)."""


@dataclass
class VerseCase:
    """One case: CT (float32 or int16 HU, LPS geometry), mask (VerSe labels, may be None) and
    centroids in patient LPS millimetres."""

    ct: sitk.Image
    mask: sitk.Image | None
    centroids_mm: dict[int, tuple[float, float, float]]
    case_id: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------------
def axcodes(img: sitk.Image) -> tuple[str, str, str]:
    """Axis codes of a SimpleITK image (the direction each index axis increases towards)."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    out = []
    for c in range(3):
        a = int(np.argmax(np.abs(d[:, c])))
        out.append("LPS"[a] if d[a, c] > 0 else "RAI"[a])
    if len(set(out)) != 3 or {_OPPOSITE[x] for x in out} & set(out):
        raise VerseError(f"oblique or degenerate image direction {out}")
    return tuple(out)  # type: ignore[return-value]


def _axis_map(img: sitk.Image, codes) -> list[tuple[int, bool]]:
    """For each target code: (image axis, flipped?)."""
    codes = [str(c).upper() for c in codes]
    own = axcodes(img)
    out = []
    for c in codes:
        if c not in _OPPOSITE:
            raise VerseError(f"unknown direction code {c!r} (expected L/R, P/A, S/I)")
        if c in own:
            out.append((own.index(c), False))
        elif _OPPOSITE[c] in own:
            out.append((own.index(_OPPOSITE[c]), True))
        else:
            raise VerseError(f"direction codes {codes} do not match the image axes {own}")
    if len({k for k, _ in out}) != 3:
        raise VerseError(f"direction codes {codes} repeat an axis")
    return out


def ctd_to_lps(xyz, codes, img: sitk.Image) -> tuple[float, float, float]:
    """VerSe centroid coordinates (1 mm voxels in ``codes`` orientation) -> LPS mm."""
    size = img.GetSize()
    sp = img.GetSpacing()
    idx = [0.0, 0.0, 0.0]
    for t, (k, flip) in enumerate(_axis_map(img, codes)):
        r = float(xyz[t]) / sp[k]
        idx[k] = (size[k] - 1 - r) if flip else r
    return tuple(float(v) for v in img.TransformContinuousIndexToPhysicalPoint(idx))  # type: ignore[return-value]


def lps_to_ctd(point, codes, img: sitk.Image) -> tuple[float, float, float]:
    """LPS mm -> VerSe centroid coordinates (1 mm voxels in ``codes`` orientation)."""
    size = img.GetSize()
    sp = img.GetSpacing()
    idx = img.TransformPhysicalPointToContinuousIndex(tuple(float(p) for p in point))
    out = []
    for k, flip in _axis_map(img, codes):
        r = (size[k] - 1 - idx[k]) if flip else idx[k]
        out.append(float(r * sp[k]))
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# centroid files
# --------------------------------------------------------------------------------------------
def read_centroids(path: Path | str) -> tuple[tuple[str, ...], dict[int, tuple[float, float, float]]]:
    """(direction codes, {label: (X, Y, Z)}) of a VerSe centroid JSON; NaN entries are skipped."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):  # a few tools write {"direction": .., "centroids": [...]}
        data = [{"direction": data.get("direction")}] + list(data.get("centroids", []))
    codes = None
    out = {}
    for d in data:
        if "direction" in d and d["direction"]:
            codes = tuple(str(c).upper() for c in d["direction"])
            continue
        if "label" not in d:
            continue
        vals = [d.get("X"), d.get("Y"), d.get("Z")]
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in vals) or "nan" in str(vals).lower():
            continue
        out[int(d["label"])] = tuple(float(v) for v in vals)
    if codes is None:
        raise VerseError(f"{path}: no {{'direction': [...]}} entry")
    return codes, out


def write_centroids(path: Path | str, codes, centroids: dict[int, tuple[float, float, float]]) -> None:
    entries = [{"direction": list(codes)}]
    for lab in sorted(centroids):
        x, y, z = centroids[lab]
        entries.append({"label": int(lab), "X": round(float(x), 4), "Y": round(float(y), 4), "Z": round(float(z), 4)})
    Path(path).write_text(json.dumps(entries, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# finding and loading cases
# --------------------------------------------------------------------------------------------
def _case_id(ct_path: Path) -> str | None:
    for pat in _CT_PATTERNS:
        m = pat.match(ct_path.name)
        if m and not ct_path.name.endswith(("_seg.nii.gz", "_msk.nii.gz", "_seg.nii", "_msk.nii")):
            return m.group("id")
    return None


def _candidates(ct_path: Path) -> list[Path]:
    """Folders where the mask and centroids of a CT may lie (same folder, BIDS derivatives)."""
    dirs = [ct_path.parent]
    parts = list(ct_path.parent.parts)
    if "rawdata" in parts:
        i = len(parts) - 1 - parts[::-1].index("rawdata")
        dirs.append(Path(*parts[:i], "derivatives", *parts[i + 1:]))
    return dirs


def _find(dirs: list[Path], names: list[str]) -> Path | None:
    for d in dirs:
        for n in names:
            p = d / n
            if p.exists():
                return p
    return None


def find_case_files(path: Path | str) -> dict[str, Path | None]:
    """CT, mask and centroid paths of a case given its folder or its CT file."""
    path = Path(path)
    if path.is_dir():
        cts = sorted(p for p in path.iterdir() if p.is_file() and _case_id(p))
        if not cts:
            raise VerseError(f"{path}: no CT (*_ct.nii.gz, ct.nii.gz or verseNNN.nii.gz)")
        if len(cts) > 1:
            raise VerseError(f"{path}: several CTs ({', '.join(p.name for p in cts)}); pass one CT file")
        ct = cts[0]
    else:
        ct = path
    cid = _case_id(ct)
    if cid is None:
        raise VerseError(f"{ct}: not a VerSe CT file name")
    dirs = _candidates(ct)
    if cid == "ct":
        mask_names, ctd_names = ["seg-vert_msk.nii.gz", "seg-vert_msk.nii"], ["ctd.json", "seg-subreg_ctd.json"]
    else:
        mask_names = [f"{cid}_seg-vert_msk.nii.gz", f"{cid}_seg-vert_msk.nii", f"{cid}_seg.nii.gz", f"{cid}_seg.nii"]
        ctd_names = [f"{cid}_seg-subreg_ctd.json", f"{cid}_seg-vert_ctd.json", f"{cid}_ctd.json"]
    return {"ct": ct, "mask": _find(dirs, mask_names), "ctd": _find(dirs, ctd_names), "id": cid}  # type: ignore[dict-item]


def load_verse_case(path: Path | str, require_mask: bool = False) -> VerseCase:
    """Load one case (folder or CT file) with its mask and centroids (LPS mm)."""
    files = find_case_files(path)
    ct = sitk.ReadImage(str(files["ct"]))
    mask = sitk.ReadImage(str(files["mask"])) if files["mask"] else None
    if mask is None and require_mask:
        raise VerseError(f"{files['ct']}: no mask found")
    cents: dict[int, tuple[float, float, float]] = {}
    if files["ctd"]:
        codes, raw = read_centroids(files["ctd"])
        ref = mask if mask is not None else ct
        cents = {lab: ctd_to_lps(v, codes, ref) for lab, v in raw.items()}
    elif mask is not None:
        cents = centroids_from_mask(mask)
    case_id = str(files["id"])
    if case_id == "ct":
        folder = Path(files["ct"]).parent
        case_id = folder.parent.name if folder.name == "verse" else folder.name
    return VerseCase(ct=ct, mask=mask, centroids_mm=cents, case_id=case_id,
                     paths={k: v for k, v in files.items() if isinstance(v, Path)})


def centroids_from_mask(mask: sitk.Image) -> dict[int, tuple[float, float, float]]:
    """Centroid (LPS mm) of every label of a mask."""
    f = sitk.LabelShapeStatisticsImageFilter()
    f.Execute(sitk.Cast(mask, sitk.sitkUInt16))
    return {int(lab): tuple(float(c) for c in f.GetCentroid(lab)) for lab in f.GetLabels()}


def iter_verse_cases(root: Path | str) -> Iterator[VerseCase]:
    """Every case under ``root`` (recursively; CTs under ``derivatives/`` are not cases)."""
    root = Path(root)
    for p in sorted(root.rglob("*.nii*")):
        if "derivatives" in p.relative_to(root).parts:
            continue
        if _case_id(p) is None:
            continue
        yield load_verse_case(p)
