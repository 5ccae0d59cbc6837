"""``write_study``: a phantom on disk as the CLI and the tests use it.

``DIR/dicom/`` (one CT file per slice), ``DIR/labels.nii.gz`` (VerSe labels on the DICOM grid),
``DIR/gt.json``, ``DIR/verse/`` (``ct.nii.gz``, ``seg-vert_msk.nii.gz``, ``ctd.json``: the layout
:mod:`pipeline.verse` reads) and optionally ``DIR/preview.png``.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import SimpleITK as sitk

from pipeline.phantom.dicom_writer import write_dicom_series
from pipeline.phantom.generator import Phantom

#: Orientation of the exported centroid file (VerSe'20 files mostly use P, I, R).
CTD_DIRECTION = ("P", "I", "R")


#: Above this many voxels the noisy CT is gzipped with level 0 (stored): deflate cannot shrink
#: CT noise much and would cost ~6 s for a 512x512x300 study on one core.
FAST_GZIP_VOXELS = 16_000_000


def write_nifti(img: sitk.Image, path: Path, level: int | None = None) -> Path:
    """NIfTI (.nii.gz) with a reproducible gzip header (mtime 0) and a chosen deflate level."""
    n = img.GetNumberOfPixels()
    if level is None:
        level = 1 if n < FAST_GZIP_VOXELS else 0
    tmp = path.with_name(path.name[: -len(".gz")] + ".tmp.nii")
    sitk.WriteImage(img, str(tmp), False)
    with open(tmp, "rb") as src, open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.unlink(tmp)
    return path


def write_verse(ph: Phantom, out_dir: Path | str) -> Path:
    from pipeline.verse import lps_to_ctd, write_centroids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(ph.ct, out / "ct.nii.gz")
    write_nifti(ph.labels, out / "seg-vert_msk.nii.gz", level=6)
    cents = {v["label"]: lps_to_ctd(v["centroid_mm"], CTD_DIRECTION, ph.labels) for v in ph.gt["vertebrae"]}
    write_centroids(out / "ctd.json", CTD_DIRECTION, cents)
    return out


def write_study(ph: Phantom, out_dir: Path | str, preview: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    write_dicom_series(ph, out / "dicom")
    paths["dicom"] = out / "dicom"
    write_nifti(ph.labels, out / "labels.nii.gz", level=6)
    paths["labels"] = out / "labels.nii.gz"
    (out / "gt.json").write_text(json.dumps(ph.gt, indent=1) + "\n")
    paths["gt"] = out / "gt.json"
    paths["verse"] = write_verse(ph, out / "verse")
    if preview:
        from pipeline.phantom.preview import write_preview

        paths["preview"] = write_preview(ph, out / "preview.png")
    return paths
