"""The DICOM Segmentation of the vertebrae (PS3.3 A.51 Segmentation IOD; DESIGN.md "Outputs").

One segment per detected vertebra, BINARY, built with :class:`highdicom.seg.Segmentation` from
the source CT's headers so that each frame carries the Derivation Image / Source Image reference
and the plane position of its CT slice (OHIF and 3D Slicer place it from those); frames without
any voxel of a segment are left out.

Segment Description macro (PS3.3 C.8.20.4, Table 10-25 Segmented Property Category/Type):
- normal vertebra: category SCT 91723000 "Anatomical Structure", type = the vertebra's code;
- fractured vertebra: category SCT 49755003 "Morphologically Abnormal Structure", type SCT
  72704001 "Fracture", Anatomic Region Sequence = the vertebra's code;
- label = the level name (``"L1"``), algorithm type AUTOMATIC with Algorithm Identification,
  Tracking ID = the level name, Tracking UID shared with the SR measurement group.
- Recommended Display CIELab Value: a fractured vertebra pure red; a normal one a saturated hue
  of :data:`NORMAL_PALETTE_RGB` chosen by its level, so that neighbours differ and none looks
  like bone in a bone window (:func:`segment_colour`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.findings import VertebraFinding
from pipeline.levels import level
from pipeline.outputs import codes
from pipeline.outputs.common import AlgorithmInfo, OutputIdentity, new_instance_arguments

if TYPE_CHECKING:
    from pydicom import Dataset

#: Recommended Display CIELab Value of a fractured vertebra: pure red, whatever its level.
_RED = hd.color.CIELabColor.from_rgb(255, 0, 0)
#: Normal vertebrae, by VerSe label (:func:`segment_colour`): saturated hues far from red and
#: from bone white (a bone window shows vertebrae near-white), each unlike its neighbours', so
#: that adjacent levels stand apart and a level keeps its colour from study to study.
NORMAL_PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178),    # blue
    (0, 170, 110),    # bluish green
    (235, 220, 40),   # yellow
    (150, 100, 220),  # violet
    (0, 170, 255),    # azure
    (150, 200, 30),   # lime
)


def segment_colour(label: int, fractured: bool) -> hd.color.CIELabColor:
    """Recommended Display CIELab Value (0062,000D) of a vertebra's segment."""
    if fractured:
        return _RED
    return hd.color.CIELabColor.from_rgb(*NORMAL_PALETTE_RGB[label % len(NORMAL_PALETTE_RGB)])


@dataclass(frozen=True)
class PlannedSegment:
    """A vertebra with voxels in the label map, and the SEG segment number it gets."""

    number: int
    finding: VertebraFinding
    tracking_uid: str


def plan_segments(
    findings: Sequence[VertebraFinding], present_labels: set[int], tracking_uids: dict[str, str]
) -> list[PlannedSegment]:
    """Segment numbers 1..N for the vertebrae that have voxels, in the order of ``findings``."""
    planned: list[PlannedSegment] = []
    for f in findings:
        if f.label in present_labels:
            planned.append(PlannedSegment(len(planned) + 1, f, tracking_uids[f.name]))
    return planned


def segment_description(seg: PlannedSegment, algorithm: AlgorithmInfo) -> hd.seg.SegmentDescription:
    """Segment Description macro item of one vertebra (see module docstring for the coding)."""
    f = seg.finding
    vertebra = codes.vertebra_code(level(f.label))
    colour = segment_colour(f.label, f.fractured)
    if f.fractured:
        category, prop_type, regions = (
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, codes.FRACTURE, [vertebra])
    else:
        category, prop_type, regions = codes.ANATOMICAL_STRUCTURE, vertebra, None
    item = hd.seg.SegmentDescription(
        segment_number=seg.number,
        segment_label=f.name,
        segmented_property_category=category,
        segmented_property_type=prop_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.ARTIFICIAL_INTELLIGENCE,
            version=algorithm.version,
            source=algorithm.manufacturer,
        ),
        tracking_uid=seg.tracking_uid,
        tracking_id=f.name,
        anatomic_regions=regions,
        display_color=colour,
    )
    # Segment Description (0062,0006): what a viewer shows beside the label.
    item.SegmentDescription = (
        f"{f.name}: fracture, Genant grade {int(f.genant_grade)}, {f.morphology.value}"
        if f.fractured else f"{f.name}: no fracture")
    return item


def label_frames(label_map: sitk.Image, headers: Sequence["Dataset"]) -> np.ndarray:
    """The label map as one 2D frame per source header, in the headers' order.

    The frame of each header is found from its Image Position (Patient), not assumed from the
    order, so a label map and a header list sorted differently cannot silently mismatch.
    Raises ``ValueError`` when the label map is not on the source grid.
    """
    arr = sitk.GetArrayViewFromImage(label_map)  # (slice, row, column)
    frames = np.zeros((len(headers), arr.shape[1], arr.shape[2]), dtype=arr.dtype)
    for i, k in enumerate(frame_indices(label_map, headers)):
        frames[i] = arr[k]
    return frames


def frame_indices(label_map: sitk.Image, headers: Sequence["Dataset"]) -> list[int]:
    """The label map's slice index of each source header (:func:`label_frames`)."""
    arr = sitk.GetArrayViewFromImage(label_map)  # (slice, row, column)
    out = []
    for h in headers:
        if (int(h.Rows), int(h.Columns)) != arr.shape[1:]:
            raise ValueError(
                f"label map slices are {arr.shape[2]}x{arr.shape[1]}, source instance "
                f"{h.SOPInstanceUID} is {h.Columns}x{h.Rows}: not the source grid")
        idx = label_map.TransformPhysicalPointToContinuousIndex(
            [float(v) for v in h.ImagePositionPatient])
        k = int(round(idx[2]))
        if max(abs(idx[0]), abs(idx[1]), abs(idx[2] - k)) > 0.25 or not 0 <= k < arr.shape[0]:
            raise ValueError(
                f"source instance {h.SOPInstanceUID} at {list(h.ImagePositionPatient)} is not a "
                f"slice of the label map (continuous index {tuple(round(v, 2) for v in idx)})")
        out.append(k)
    return out


def build_seg(
    headers: Sequence["Dataset"],
    label_map: sitk.Image,
    segments: Sequence[PlannedSegment],
    identity: OutputIdentity,
    algorithm: AlgorithmInfo,
) -> hd.seg.Segmentation:
    """The Segmentation instance (BINARY, empty frames omitted)."""
    if not segments:
        raise ValueError("no vertebra has voxels in the label map: nothing to segment")
    arr = sitk.GetArrayViewFromImage(label_map)
    index = frame_indices(label_map, headers)

    def frame(k: int) -> np.ndarray:
        f = arr[k]
        if f.dtype.kind == "f":
            f = np.rint(f).astype(np.int32)
        return np.clip(f, 0, None) if f.dtype.kind == "i" else f

    # VerSe label -> segment number; voxels of vertebrae that were not reported become background.
    top = max(max(int(frame(k).max()) for k in set(index)), max(s.finding.label for s in segments))
    lut = np.zeros(top + 1, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    for s in segments:
        lut[s.finding.label] = s.number
    # Only the source frames that hold a segment go in (the SEG omits empty frames anyway, and
    # references the instances it was derived from): a whole-body series costs no more memory
    # than its spine. Frame by frame: no copy of the whole label map.
    keep = [i for i, k in enumerate(index) if lut[frame(k)].any()]
    seg_frames = np.empty((len(keep),) + arr.shape[1:], dtype=lut.dtype)
    for j, i in enumerate(keep):
        seg_frames[j] = lut[frame(index[i])]
    return hd.seg.Segmentation(
        source_images=[headers[i] for i in keep],
        pixel_array=seg_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(s, algorithm) for s in segments],
        **new_instance_arguments(identity, algorithm),
        content_label="VERTEBRAE",
        content_description="Vertebrae; fractured ones as Fracture segments",
        series_description=identity.series_description,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
