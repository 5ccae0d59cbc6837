"""A stand-in for ``pipeline.run.analyse`` (``pipeline.entry_point =
"tests.dicom_node.fake_pipeline:analyse"``): the node tests exercise receiving, scheduling and
the worker without spending the shared CPUs on the networks."""
from __future__ import annotations

from dataclasses import dataclass, field

import SimpleITK as sitk


@dataclass
class FakeResult:
    study_instance_uid: str
    series_instance_uid: str
    label_map: sitk.Image
    vertebrae: list = field(default_factory=list)
    timings_s: dict = field(default_factory=lambda: {"fake": 0.0})

    def summary(self) -> dict:
        return {"study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid, "vertebrae": [],
                "timings_s": dict(self.timings_s)}


def analyse(series, device: str = "auto") -> FakeResult:
    labels = sitk.Image(series.image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(series.image)
    return FakeResult(series.study_instance_uid, series.series_instance_uid, labels)


def slow_analyse(series, device: str = "auto") -> FakeResult:
    """Takes a minute: for tests that stop the node while a job runs."""
    import time
    time.sleep(60)
    return analyse(series, device)


def second_analyse(series, device: str = "auto") -> FakeResult:
    """Takes a second: long enough for several workers to share a queue."""
    import time
    time.sleep(1.0)
    return analyse(series, device)
