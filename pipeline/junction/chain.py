"""The found chain completed by the junction classifier: a vertebra the localizer missed right
above the sacrum is added where the classifier puts it (:func:`pipeline.junction.infer.find_junction`
says ``"below"``). Its name continues the chain's standard sequence; the numbering
(:mod:`pipeline.numbering`) then names the whole chain from the sacrum.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipeline.junction.infer import Junction
from pipeline.levels import BY_LABEL, BY_NAME
from pipeline.numbering import sequence


def with_missed_last(found: Sequence, junction: Junction) -> list:
    """``found`` (:class:`pipeline.localization.infer.LocalizedVertebra`, cranial to caudal)
    with the vertebra below added (``found_by="junction"``) when ``junction.state ==
    "below"``. The new one takes the next standard name; where the chain already ends at L5,
    every name moves up one level instead (the sacrum decides the names anyway). Chains with a
    variant name (T13, L6) or that would run above C1 come back unchanged."""
    found = list(found)
    if junction.state != "below" or not found or junction.below_mm is None:
        return found
    seq = sequence()
    names = [BY_LABEL[int(v.label)].name for v in found]
    if any(n not in seq for n in names):
        return found
    idx = [seq.index(n) for n in names]
    if idx[-1] + 1 < len(seq):
        new_names = names + [seq[idx[-1] + 1]]
    elif idx[0] >= 1:
        new_names = [seq[i - 1] for i in idx] + [seq[-1]]
    else:
        return found
    added = replace(found[-1], centroid_mm=tuple(junction.below_mm), score=junction.p_below,
                    partial=False, found_by="junction")
    chain = found + [added]
    return [replace(v, label=BY_NAME[n].label, name=n) for v, n in zip(chain, new_names)]
