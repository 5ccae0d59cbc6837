"""One study, one answer: rank a study's eligible series and choose the one to analyse (one per
part of the spine that no chosen series covers), as a radiologist would read the study.

Order (first wins): ConvolutionKernel class in the order of ``selection.kernels`` (bone before
soft tissue: sharp kernels show the cortical end plates that Genant's heights are measured
between; a kernel of no class comes last), thinner SliceThickness, then slice spacing, more z
coverage, lower SeriesNumber, then the Series Instance UID (so the choice is deterministic).
Pure: facts in (:class:`dicom_node.selection.SeriesFacts`), decisions out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.selection import SeriesFacts, kernel_class

_LAST = float("inf")


@dataclass(frozen=True)
class Decision:
    """Whether a series is analysed, and why (the reason names the chosen series)."""

    series_instance_uid: str
    chosen: bool
    reason: str


def rank_key(facts: SeriesFacts, kernels: Mapping[str, Sequence[str]]) -> tuple:
    cls = kernel_class(facts.kernel, kernels)
    order = list(kernels)
    return (order.index(cls) if cls in order else len(order),
            _or_last(facts.slice_thickness_mm), _or_last(facts.slice_spacing_mm),
            -(facts.z_coverage_mm or 0.0),
            facts.series_number if facts.series_number is not None else _LAST,
            facts.series_instance_uid)


def _or_last(value: float | None) -> float:
    return _LAST if value is None else round(value, 3)


def describe(facts: SeriesFacts, kernels: Mapping[str, Sequence[str]]) -> str:
    """``B70f bone kernel, 1 mm slices, 240 mm z coverage``: what a reader needs to see that
    the choice is right, and no patient identifier."""
    parts = []
    if facts.kernel:
        cls = kernel_class(facts.kernel, kernels)
        parts.append(f"{facts.kernel} {cls} kernel" if cls else f"kernel {facts.kernel}")
    if facts.slice_thickness_mm is not None:
        parts.append(f"{facts.slice_thickness_mm:g} mm slices")
    if facts.z_coverage_mm is not None:
        parts.append(f"{facts.z_coverage_mm:.0f} mm z coverage")
    return ", ".join(parts) or "no kernel or geometry in its headers"


def overlaps(a: SeriesFacts, b: SeriesFacts) -> bool:
    """True unless both z ranges are known, in one frame of reference, and do not overlap:
    when unsure, the two series count as one part of the spine (one answer)."""
    if a.z_range_mm is None or b.z_range_mm is None:
        return True
    if a.frame_of_reference_uid != b.frame_of_reference_uid:
        return True
    return min(a.z_range_mm[1], b.z_range_mm[1]) - max(a.z_range_mm[0], b.z_range_mm[0]) > 0


def choose(eligible: Sequence[SeriesFacts], kernels: Mapping[str, Sequence[str]], *,
           kept: Sequence[SeriesFacts] = ()) -> list[Decision]:
    """Decide for each of ``eligible``: the best series of each non-overlapping part is
    chosen, every other one is skipped naming the chosen series that covers it.

    ``kept``: series of the study chosen earlier (analysed or being analysed); they stay
    chosen, and a series arriving later that overlaps one is skipped, even a better one
    (the override is ``spine-node rerun STUDY --series UID``).
    """
    chosen: list[SeriesFacts] = list(kept)
    kept_uids = {k.series_instance_uid for k in kept}
    ranked = sorted(eligible, key=lambda f: rank_key(f, kernels))
    decisions = []
    for facts in ranked:
        if facts.series_instance_uid in kept_uids:
            decisions.append(Decision(facts.series_instance_uid, True,
                                      f"chosen: {describe(facts, kernels)} (chosen before; "
                                      "new instances arrived)"))
            continue
        cover = next((c for c in chosen if overlaps(c, facts)), None)
        if cover is not None:
            later = " (chosen before this series arrived)" if \
                cover.series_instance_uid in kept_uids else ""
            decisions.append(Decision(facts.series_instance_uid, False,
                                      f"not chosen: series {cover.series_instance_uid} "
                                      f"({describe(cover, kernels)}) is analysed{later}"))
            continue
        chosen.append(facts)
        why = f"first of {len(ranked)} eligible series" if len(chosen) == 1 else \
            "the first eligible series of a part of the spine no other chosen series covers"
        decisions.append(Decision(facts.series_instance_uid, True,
                                  f"chosen: {describe(facts, kernels)}; {why}"))
    return decisions
