"""The key image: a Secondary Capture of the mid-sagittal plane (DESIGN.md "Outputs").

Many PACS and viewers show neither SEG nor SR; every one shows an RGB Secondary Capture
(PS3.3 A.8.1 Secondary Capture Image IOD). The image is the mid-sagittal plane of the CT in a
bone window (W 1800 / L 400), reformatted on a curve that follows the vertebrae's mean
left-right position so that a scoliotic spine stays in the plane; fractured vertebrae are
tinted red, normal ones white (one not assessed is only outlined, in blue-grey), and each
level's name, Genant grade and morphology are written beside it. A banner burns in "NOT FOR
PRIMARY DIAGNOSIS"; Burned In Annotation is YES, and the Image Comments say the same (PS3.3
C.7.6.1, C.8.6.2). Where the level numbering is uncertain (:mod:`pipeline.numbering`), an
orange warning under the banner says so and why, and the Image Comments carry the same
statement; a vertebra that was not assessed is captioned so, never with a grade.

Display convention (as a radiologist reads a sagittal spine): head up, anterior left; the
Patient Orientation is therefore P\\F (rows run towards posterior, columns towards the feet).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from pipeline.findings import GenantGrade, VertebraFinding
from pipeline.numbering import Numbering
from pipeline.outputs.common import AlgorithmInfo, OutputIdentity, new_instance_arguments
from pipeline.outputs.enums import BurnedInAnnotation

if TYPE_CHECKING:
    from pydicom import Dataset

#: Bone window (Hounsfield units).
WINDOW_CENTER = 400.0
WINDOW_WIDTH = 1800.0
#: Height in pixels of the longer side of the reformatted plane.
TARGET_PIXELS = 768
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
#: Colour of the uncertain-numbering warning (orange: neither a fracture's red nor white).
WARNING_COLOUR = (255, 140, 0)

_RED = np.array([255, 40, 40], dtype=np.float32)
_WHITE = np.array([255, 255, 255], dtype=np.float32)
#: A vertebra that was not assessed (cut by the field of view, C1/C2): outlined, not tinted, so
#: that it reads neither as a fracture (red) nor as normal (white).
_NOT_ASSESSED = np.array([140, 170, 255], dtype=np.float32)
_GRADE_WORD = {GenantGrade.NORMAL: "normal", GenantGrade.MILD: "mild",
               GenantGrade.MODERATE: "moderate", GenantGrade.SEVERE: "severe"}


def _physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in (np.array(bits) * (size - 1))]) for bits in np.ndindex(2, 2, 2)]
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def _sample(image: sitk.Image, points: np.ndarray, order: int, cval: float) -> np.ndarray:
    """Values of ``image`` at LPS ``points`` (..., 3), linear (order 1) or nearest (order 0)."""
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    idx = (np.linalg.inv(direction) @ (points.reshape(-1, 3) - origin).T) / spacing[:, None]  # (i,j,k)
    arr = sitk.GetArrayViewFromImage(image)  # (k, j, i)
    out = ndimage.map_coordinates(arr, idx[::-1], order=order, mode="constant", cval=cval)
    return out.reshape(points.shape[:-1])


def reformat_sagittal(
    image: sitk.Image, label_map: sitk.Image, findings: Sequence[VertebraFinding]
) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """Sagittal CT (HU) and label planes, head up and anterior left.

    Returns ``(hu, labels, pixel_mm, (z_top, y_left))``: the two planes (rows, columns), the
    isotropic pixel size, and the LPS z of the first row and y of the first column (to place
    annotations: row = (z_top - z) / pixel_mm).
    """
    lo, hi = _physical_bounds(image)
    extent_y, extent_z = hi[1] - lo[1], hi[2] - lo[2]
    pixel_mm = max(extent_y, extent_z) / TARGET_PIXELS
    n_rows = max(1, int(round(extent_z / pixel_mm)))
    n_cols = max(1, int(round(extent_y / pixel_mm)))
    z = hi[2] - (np.arange(n_rows) + 0.5) * pixel_mm  # superior (head) first
    y = lo[1] + (np.arange(n_cols) + 0.5) * pixel_mm  # anterior first (LPS: +y is posterior)
    if findings:
        cz = np.array([f.centroid_mm[2] for f in findings], dtype=float)
        cx = np.array([f.centroid_mm[0] for f in findings], dtype=float)
        order = np.argsort(cz)
        x_of_z = np.interp(z, cz[order], cx[order])
    else:
        x_of_z = np.full_like(z, (lo[0] + hi[0]) / 2.0)
    points = np.empty((n_rows, n_cols, 3))
    points[..., 0] = x_of_z[:, None]
    points[..., 1] = y[None, :]
    points[..., 2] = z[:, None]
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkInt16, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
    hu = _sample(image, points, order=1, cval=-1024.0).astype(np.float32)
    labels = _sample(label_map, points, order=0, cval=0).astype(np.int32)
    return hu, labels, float(pixel_mm), (float(hi[2]), float(lo[1]))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont, text: str) -> float:
    left, _top, right, _bottom = font.getbbox(text)
    return float(right - left)


def _caption(f: VertebraFinding) -> str:
    """``L1  G3 severe crush``; a vertebra the pipeline did not grade says so instead of a grade
    (cut by the field of view, or C1/C2, which have no body to grade)."""
    if f.partial:
        return f"{f.name}  partial, not graded"
    if f.grading_source == "none":
        return f"{f.name}  not graded"
    grade = GenantGrade(f.genant_grade)
    text = f"{f.name}  G{int(grade)} {_GRADE_WORD[grade]}"
    if f.fractured and f.morphology.value != "normal":
        text += f" {f.morphology.value}"
    return text


def caption_rows(true_rows: Sequence[float], lo: float, hi: float, gap: float) -> list[float]:
    """Rows for captions that belong at ``true_rows`` (ascending): as near as possible to
    them, within ``[lo, hi]``, and at least ``gap`` apart, so that neighbours never overlap
    (``hi - lo`` must leave room for them all: ``(n - 1) * gap``). Pushed down from the top,
    then pulled back up where the push ran past ``hi``."""
    rows: list[float] = []
    for row in true_rows:
        rows.append(max(row, lo) if not rows else max(row, rows[-1] + gap))
    n = len(rows)
    return [min(row, hi - (n - 1 - i) * gap) for i, row in enumerate(rows)]


def wrap(font: ImageFont.ImageFont, text: str, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a word longer than
    the width gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render(
    hu: np.ndarray, labels: np.ndarray, findings: Sequence[VertebraFinding], pixel_mm: float,
    z_top: float, banner: str, warning: str | None = None,
) -> tuple[np.ndarray, int]:
    """The RGB key image (rows, columns, 3) uint8: windowed CT, tinted vertebrae, captions.

    Returns the image and the row at which the plane starts (a banner is above it; the plane
    fills columns ``0 .. hu.shape[1] - 1``, the captions are to its right). ``warning`` (the
    uncertain level numbering) is written in :data:`WARNING_COLOUR` under the banner, wrapped to
    the image's width.
    """
    gray = np.clip((hu - (WINDOW_CENTER - WINDOW_WIDTH / 2)) / WINDOW_WIDTH, 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for f in findings:
        mask = labels == f.label
        if not mask.any():
            continue
        colour, alpha = ((_RED, 0.55) if f.fractured else (_WHITE, 0.30) if f.assessed
                         else (_NOT_ASSESSED, 0.0))
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = colour
    plane = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")

    h, w = hu.shape
    size = max(12, int(round(h / 40)))
    font, small = _font(size), _font(max(10, int(size * 0.8)))
    captions = {f.label: _caption(f) for f in findings}
    widest = max((_text_width(font, c) for c in captions.values()), default=0)
    panel_w = int(widest + size * 1.5)
    gap = size * 1.15
    # The caption column is at least as tall as the plane, taller when the captions need it
    # (many vertebrae on a short plane, e.g. a thin slab).
    panel_h = max(h, int(math.ceil(max(len(findings) - 1, 0) * gap + size * 1.2)))
    warn_lines = wrap(small, warning, w + panel_w - size) if warning else []
    top = int(size * 3.2 + len(warn_lines) * size * 1.0)
    bottom = int(size * 1.8)
    canvas = Image.new("RGB", (w + panel_w, panel_h + top + bottom), (0, 0, 0))
    canvas.paste(plane, (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((size // 2, size // 4), NOT_FOR_DIAGNOSIS, fill=(255, 220, 0), font=font)
    draw.text((size // 2, int(size * 1.6)), banner, fill=(200, 200, 200), font=small)
    for k, line in enumerate(warn_lines):
        draw.text((size // 2, int(size * (2.6 + k))), line, fill=WARNING_COLOUR, font=small)
    draw.text((size // 2, top + panel_h + size // 4), "Automatic result, not verified by a physician",
              fill=(200, 200, 200), font=small)
    draw.text((4, top + h // 2), "A", fill=(255, 220, 0), font=small)
    draw.text((w - size, top + h // 2), "P", fill=(255, 220, 0), font=small)

    ordered = sorted(findings, key=lambda v: -v.centroid_mm[2])  # cranial first
    true_rows = [top + (z_top - f.centroid_mm[2]) / pixel_mm for f in ordered]
    rows = caption_rows(true_rows, top + size * 0.6, top + panel_h - size * 0.6, gap)
    for row, true_row, f in zip(rows, true_rows, ordered):
        colour = ((255, 60, 60) if f.fractured else (255, 255, 255) if f.assessed
                  else tuple(int(c) for c in _NOT_ASSESSED))
        draw.line([(w + 2, true_row), (w + size // 2, row)], fill=colour, width=max(1, size // 10))
        draw.text((w + size // 2 + 4, row - size * 0.55), captions[f.label], fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy(), top


@dataclass(frozen=True)
class KeyImagePlane:
    """Where the patient's points land on the key image, for the SR's spatial coordinates
    (SCOORD, PS3.3 C.18.6.1.1: pixel coordinates column\\row, ``0,0`` the top left corner of
    the top left pixel, ``1,1`` its bottom right corner).

    The reformat is a plane in y (anterior-posterior, columns) and z (head-feet, rows) at
    ``pixel_mm`` per pixel; the curve it follows in x (left-right) is dropped, as on the image.
    ``regions``: each vertebra's box on the image (label -> column0, row0, column1, row1).
    """

    sop_class_uid: str
    sop_instance_uid: str
    pixel_mm: float
    z_top: float
    y_left: float
    top: int
    regions: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    #: The reformatted plane on the image (column0, row0, column1, row1): below the banner,
    #: left of the captions.
    extent: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def to_pixel(self, point_mm: Sequence[float]) -> tuple[float, float]:
        """(column, row) of an LPS point (mm)."""
        return ((float(point_mm[1]) - self.y_left) / self.pixel_mm,
                self.top + (self.z_top - float(point_mm[2])) / self.pixel_mm)

    def line(self, a_mm: Sequence[float], b_mm: Sequence[float]) -> np.ndarray:
        """The segment from ``a_mm`` to ``b_mm`` as SCOORD POLYLINE data (2, 2)."""
        return np.array([self.to_pixel(a_mm), self.to_pixel(b_mm)], dtype=np.float32)

    def box(self, c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
        """A rectangle as a closed SCOORD POLYLINE (5, 2)."""
        return np.array([(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)], dtype=np.float32)

    def outline(self, label: int) -> np.ndarray | None:
        """The vertebra's box as a closed SCOORD POLYLINE (5, 2), ``None`` when it is not on
        the image."""
        if label not in self.regions:
            return None
        return self.box(*self.regions[label])


def _regions(labels: np.ndarray, findings: Sequence[VertebraFinding], top: int
             ) -> dict[int, tuple[float, float, float, float]]:
    out = {}
    for f in findings:
        rows, cols = np.nonzero(labels == f.label)
        if rows.size:
            out[f.label] = (float(cols.min()), float(top + rows.min()),
                            float(cols.max() + 1), float(top + rows.max() + 1))
    return out


def build_key_image(
    image: sitk.Image,
    label_map: sitk.Image,
    findings: Sequence[VertebraFinding],
    reference: "Dataset",
    identity: OutputIdentity,
    algorithm: AlgorithmInfo,
    numbering: Numbering | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture instance (see :func:`build_key_image_and_plane`)."""
    return build_key_image_and_plane(image, label_map, findings, reference, identity, algorithm,
                                     numbering=numbering)[0]


def build_key_image_and_plane(
    image: sitk.Image,
    label_map: sitk.Image,
    findings: Sequence[VertebraFinding],
    reference: "Dataset",
    identity: OutputIdentity,
    algorithm: AlgorithmInfo,
    numbering: Numbering | None = None,
) -> tuple[hd.sc.SCImage, KeyImagePlane]:
    """The Secondary Capture instance (RGB, single frame) in the source's Patient and Study,
    and how patient points map onto it (for the SR); ``numbering`` where uncertain is written
    on it (:func:`render`) and into Image Comments."""
    hu, labels, pixel_mm, (z_top, y_left) = reformat_sagittal(image, label_map, findings)
    n_fractured = sum(1 for f in findings if f.fractured)
    found = (f"{len(findings)} vertebrae, {n_fractured} fractured" if findings
             else "no vertebra found")
    banner = f"{identity.series_description} | {found} | {algorithm.model_name} {algorithm.version}"
    warning = numbering.statement.upper() if numbering is not None and numbering.uncertain \
        and findings else None
    pixels, top = render(hu, labels, findings, pixel_mm, z_top, banner, warning)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **new_instance_arguments(identity, algorithm),
        pixel_spacing=(pixel_mm, pixel_mm),
        patient_orientation=("P", "F"),
        series_description=identity.series_description,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    # SC Equipment: synthesised on a workstation, not digitised from an interface (C.8.6.1).
    sc.ConversionType = "WSD"
    # General Series: what is shown is the spine, an unpaired part, so Laterality (Type 2C,
    # paired parts only) stays absent.
    sc.BodyPartExamined = "SPINE"
    sc.BurnedInAnnotation = BurnedInAnnotation.YES.value
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = (f"{NOT_FOR_DIAGNOSIS}. Automatic vertebral fracture result "
                        f"({algorithm.name} {algorithm.version}), not verified by a physician.")
    if warning:
        sc.ImageComments = f"{sc.ImageComments} {numbering.statement}"[:10240]  # LT
    sc.DerivationDescription = (
        f"Curved mid-sagittal reformat of series {reference.SeriesInstanceUID}, bone window "
        f"W{WINDOW_WIDTH:.0f}/L{WINDOW_CENTER:.0f}; fractured vertebrae red, normal white")[:1024]
    plane = KeyImagePlane(sop_class_uid=str(sc.SOPClassUID),
                          sop_instance_uid=str(sc.SOPInstanceUID), pixel_mm=pixel_mm,
                          z_top=z_top, y_left=y_left, top=top,
                          regions=_regions(labels, findings, top),
                          extent=(0.0, float(top), float(hu.shape[1]), float(top + hu.shape[0])))
    return sc, plane
