#!/usr/bin/env python3
"""Make the README's pictures: the key image and a SEG overlay, from real DICOM objects.

    python docs/make_pictures.py                  # the trained models analyse a phantom study
    python docs/make_pictures.py --ground-truth   # the phantom's ground truth stands in for them
    python docs/make_pictures.py --real sub-verse008   # a held-out real CT of the real-spine pack

Both ways a phantom study is written (``spine-node phantom``) and the node's own builders make
the SEG and the key image (``pipeline.outputs.build_outputs``); with ``--ground-truth`` the
findings and label map are the phantom's truth instead of a model's output (for a checkout
without trained weights; tests/deploy/groundtruth_pipeline.py). The key image is the Secondary
Capture's pixels as a PACS shows them; the SEG overlay is read back from the SEG (highdicom) and
drawn on a sagittal plane of the CT, with each segment's recommended display colour. Writes
docs/images/key-image.png and docs/images/seg-overlay.png, and prints how they were made.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
SEED, LEVELS, FRACTURES = 2, "T10-L4", "L1:2:wedge,T12:1:biconcave"


def _phantom(out: Path):
    from pipeline.phantom import generate, write_study

    phantom = generate(SEED, levels=LEVELS, fractures=FRACTURES)
    write_study(phantom, out)
    return phantom


def _rgb(ds) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)


def seg_overlay(series, seg) -> np.ndarray:
    """A sagittal CT plane (bone window), head up and anterior left, with the SEG's segments in
    their recommended display colours and their labels (read back from the SEG, not from the
    label map that made it)."""
    import highdicom as hd
    import SimpleITK as sitk
    from PIL import Image, ImageDraw, ImageFont

    seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                               assert_missing_frames_are_empty=True,
                                               skip_overlap_checks=True)  # (slices, rows, cols)
    hu = sitk.GetArrayFromImage(series.image)  # same order: slices sorted by position
    column = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    plane_hu, plane_lab = hu[:, :, column], labels[:, :, column]  # (slice, row) = (z, y)
    sx, sy, sz = series.image.GetSpacing()
    direction = np.array(series.image.GetDirection()).reshape(3, 3)
    if direction[2, 2] > 0:  # slices run inferior -> superior: put the head up
        plane_hu, plane_lab = plane_hu[::-1], plane_lab[::-1]
    if direction[1, 1] < 0:  # rows run posterior -> anterior: put anterior left
        plane_hu, plane_lab = plane_hu[:, ::-1], plane_lab[:, ::-1]

    grey = np.clip((plane_hu - (400 - 900)) / 1800.0, 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colours = {}
    for number in range(1, seg.number_of_segments + 1):
        desc = seg.get_segment_description(number)
        value = desc.get("RecommendedDisplayCIELabValue")
        colour = hd.color.CIELabColor.from_dicom_value(tuple(value)).to_rgb() if value \
            else (255, 255, 0)
        colours[number] = (desc.segment_label, np.array(colour, dtype=float))
        mask = plane_lab == number
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * colours[number][1]

    height = 640
    width = int(round(height * plane_hu.shape[1] * sy / (plane_hu.shape[0] * sz)))
    image = Image.fromarray(rgb.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    scale_rows = height / plane_hu.shape[0]
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=16)
    for number, (label, colour) in colours.items():
        rows = np.nonzero((plane_lab == number).any(axis=1))[0]
        if rows.size:
            y = float(rows.mean()) * scale_rows
            draw.text((4, y - 8), label, fill=tuple(int(c) for c in colour), font=font)
    return np.asarray(image)


def make(ground_truth: bool) -> dict:
    from PIL import Image

    from pipeline.outputs import build_outputs
    from pipeline.series_loader import load_series

    with tempfile.TemporaryDirectory() as tmp:
        phantom = _phantom(Path(tmp))
        series = load_series(sorted((Path(tmp) / "dicom").glob("*.dcm")))
        if ground_truth:
            from tests.deploy.groundtruth_pipeline import from_ground_truth
            result = from_ground_truth(series, phantom.gt, phantom.labels)
        else:
            from pipeline.run import analyse
            result = analyse(series)
        objects = build_outputs(series, result)
        OUT.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(objects.key_image)).save(OUT / "key-image.png", optimize=True)
        Image.fromarray(seg_overlay(series, objects.seg)).save(OUT / "seg-overlay.png",
                                                               optimize=True)
        found = [f"{v.name}:G{int(v.genant_grade)}" for v in result.vertebrae]
    return {"phantom": {"seed": SEED, "levels": LEVELS, "fractures": FRACTURES},
            "findings_from": "phantom ground truth" if ground_truth else "trained models",
            "vertebrae": found,
            "files": [str(p.relative_to(ROOT)) for p in sorted(OUT.glob("*.png"))]}


def make_real(subject: str) -> dict:
    """A real CT of the real-spine pack (a validation subject: no model saw it) written as a
    DICOM series, analysed by the trained models: ``docs/images/real-<subject>-key-image.png``
    and ``-seg-overlay.png``, beside the expert's levels and grades."""
    from PIL import Image

    from pipeline.outputs import build_outputs
    from pipeline.realdata.pack import default_pack_dir, iter_pack_cases
    from pipeline.realdata.to_dicom import write_ct_series
    from pipeline.realdata.truth import axial_lps, truth_vertebrae
    from pipeline.run import analyse
    from pipeline.series_loader import load_series

    pack = default_pack_dir()
    if pack is None:
        raise SystemExit("the real-spine pack (../shared/data/real-spine) is absent")
    case = next(iter_pack_cases(pack, [subject]))
    truth = truth_vertebrae(case, axial_lps(case.mask))
    with tempfile.TemporaryDirectory() as tmp:
        series = load_series(write_ct_series(case.ct, Path(tmp) / "dicom", case.case_id))
        result = analyse(series)
        objects = build_outputs(series, result)
        OUT.mkdir(parents=True, exist_ok=True)
        key, overlay = OUT / f"real-{subject}-key-image.png", OUT / f"real-{subject}-seg-overlay.png"
        Image.fromarray(_rgb(objects.key_image)).save(key, optimize=True)
        Image.fromarray(seg_overlay(series, objects.seg)).save(overlay, optimize=True)
    return {"case": case.case_id,
            "expert": [f"{v['name']}" + ("" if v["genant_grade"] is None else f":G{v['genant_grade']}")
                       + (" (partial)" if v["partial"] else "") for v in truth],
            "found": [f"{v.name}:G{int(v.genant_grade)}" + (" (partial)" if v.partial else "")
                      for v in result.vertebrae],
            "numbering": None if result.numbering is None else result.numbering.as_dict(),
            "files": [str(key.relative_to(ROOT)), str(overlay.relative_to(ROOT))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ground-truth", action="store_true",
                        help="use the phantom's ground truth instead of the trained models")
    parser.add_argument("--real", metavar="SUBJECT",
                        help="a subject of the real-spine pack (e.g. sub-verse008) instead of the phantom")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    report = make_real(args.real) if args.real else make(args.ground_truth)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
