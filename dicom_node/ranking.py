"""One study, one answer: rank a study's eligible series and choose the one to analyse (one per
part of the spine that no chosen series covers), as a radiologist would read the study.

Order (first wins): ConvolutionKernel class in the order of ``selection.kernels`` (bone before
soft tissue: sharp kernels show the cortical end plates that Genant's heights are measured
between; a kernel of no class comes last), thinner SliceThickness, then slice spacing, more z
coverage, lower SeriesNumber, then the Series Instance UID (so the choice is deterministic).
Pure: facts in (:class:`dicom_node.selection.SeriesFacts`), decisions out.

Late arrivals (DESIGN.md "Data flow"): a series arriving after its part of the spine was
analysed supersedes the earlier answer when it is materially better (:func:`quality_key`:
kernel class, slice thickness, spacing, coverage to 10 mm) and the earlier analysis has
finished; it is then analysed as a new answer that says which one it replaces, and the earlier
series is marked superseded. A worse (or no better) one is skipped, naming the series analysed.
"""
from __future__ import annotations

import re
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
    #: For a series chosen before: the series that supersedes it (its answer is replaced).
    superseded_by: str | None = None


def rank_key(facts: SeriesFacts, kernels: Mapping[str, Sequence[str]]) -> tuple:
    cls = kernel_class(facts.kernel, kernels)
    order = list(kernels)
    return (order.index(cls) if cls in order else len(order),
            _or_last(facts.slice_thickness_mm), _or_last(facts.slice_spacing_mm),
            -(facts.z_coverage_mm or 0.0),
            facts.series_number if facts.series_number is not None else _LAST,
            facts.series_instance_uid)


def quality_key(facts: SeriesFacts, kernels: Mapping[str, Sequence[str]]) -> tuple:
    """What makes one series a better read than another of the same part (no series number,
    no UID; coverage to 10 mm): a late series supersedes only when this is strictly smaller."""
    key = rank_key(facts, kernels)
    return key[:3] + (-round((facts.z_coverage_mm or 0.0) / 10.0),)


#: How a superseded series' skipped job begins (the worker finds the replaced answer by it).
_SUPERSEDED = re.compile(r"^superseded: series ([0-9.]+) ")


def superseded_reason(by: SeriesFacts, kernels: Mapping[str, Sequence[str]]) -> str:
    return (f"superseded: series {by.series_instance_uid} ({describe(by, kernels)}) arrived "
            "later and is analysed instead; this series' results are replaced")


def superseding_series(reason: str | None) -> str | None:
    """The series named by a :func:`superseded_reason`, else None."""
    match = _SUPERSEDED.match(reason or "")
    return match.group(1) if match else None


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
           kept: Sequence[SeriesFacts] = (), finished: Sequence[str] = ()) -> list[Decision]:
    """Decide for each of ``eligible``: the best series of each non-overlapping part is
    chosen, every other one is skipped naming the chosen series that covers it.

    ``kept``: series of the study chosen earlier (analysed or being analysed); they stay
    chosen, and a series arriving later that overlaps one is skipped naming it, unless the
    kept series is in ``finished`` (its analysis ended: done or failed) and the newcomer is
    materially better (:func:`quality_key`) than every kept series it overlaps: then the
    newcomer is chosen and each of those gets a decision ``chosen=False`` with
    ``superseded_by`` set. The override stays ``spine-node rerun STUDY --series UID``.
    """
    chosen: list[SeriesFacts] = list(kept)
    kept_uids = {k.series_instance_uid for k in kept}
    done = set(finished) & kept_uids
    ranked = sorted(eligible, key=lambda f: rank_key(f, kernels))
    decisions = []
    for facts in ranked:
        if facts.series_instance_uid in kept_uids:
            decisions.append(Decision(facts.series_instance_uid, True,
                                      f"chosen: {describe(facts, kernels)} (chosen before; "
                                      "new instances arrived)"))
            continue
        covers = [c for c in chosen if overlaps(c, facts)]
        better = bool(covers) and all(
            c.series_instance_uid in done and
            quality_key(facts, kernels) < quality_key(c, kernels) for c in covers)
        if covers and better:
            for c in covers:
                chosen.remove(c)
                decisions.append(Decision(c.series_instance_uid, False,
                                          superseded_reason(facts, kernels),
                                          superseded_by=facts.series_instance_uid))
            chosen.append(facts)
            replaced = "; ".join(f"series {c.series_instance_uid} ({describe(c, kernels)})"
                                 for c in covers)
            decisions.append(Decision(facts.series_instance_uid, True,
                                      f"chosen: {describe(facts, kernels)}; arrived after "
                                      f"{replaced} was analysed and supersedes it"))
            continue
        if covers:
            cover = covers[0]
            later = ""
            if cover.series_instance_uid in kept_uids:
                under_way = cover.series_instance_uid not in done and \
                    quality_key(facts, kernels) < quality_key(cover, kernels)
                later = " (chosen before this series arrived; its analysis is under way)" \
                    if under_way else " (chosen before this series arrived)"
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
