"""One study, one answer at the PACS (issue 27): a phantom study as a scanner routes it (thin
bone and soft-tissue axials, a 5 mm axial, sagittal and coronal MPRs, a scout, a dose screen)
sent by dcmtk ``storescu`` to ``spine-node serve`` with the default selection (spine check on),
and a real Orthanc on loopback as the destination: exactly one SEG, one SR and one key image
arrive in Orthanc, for the thin bone series; every other series ends ``skipped`` with a reason.

The phantom's ground truth stands in for the models (tests/deploy/groundtruth_pipeline.py), so
everything else is real: network, scheduler, selection, the SEG/SR/key-image builders, delivery.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from tests.dicom_node.test_series_choice import (
    EXPECTED_RULE,
    _dose_screen,
    _sagittal_mpr,
    _scout,
    _series,
)
from tests.helpers import storescu
from tests.helpers.orthanc_server import Orthanc

pytestmark = pytest.mark.integration

GROUND_TRUTH = "tests.deploy.groundtruth_pipeline:analyse"
FAST_RETRY = {"backoff_start_s": 0.5, "backoff_factor": 2.0, "backoff_max_s": 2.0,
              "max_attempts": 1000, "poll_seconds": 0.5, "acse_timeout_s": 3.0,
              "dimse_timeout_s": 30.0}
SEG, SR, KEY_IMAGE = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34",
                      SecondaryCaptureImageStorage)


def _coronal_mpr(slices: list[pydicom.Dataset], out: Path) -> str:
    """A coronal reformat (DERIVED\\SECONDARY\\REFORMATTED): rows along z, columns along x,
    one image per y position."""
    volume = np.stack([s.pixel_array for s in slices])            # (z, y, x)
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    x0, y0, z0 = (float(v) for v in slices[0].ImagePositionPatient)
    dz = float(slices[1].ImagePositionPatient[2]) - z0
    rows = list(range(8, volume.shape[1] - 8, 4))

    def edit(ds, k):
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        top = z0 + (volume.shape[0] - 1) * dz
        ds.ImagePositionPatient = [f"{x0:g}", f"{y0 + rows[k] * dy:g}", f"{top:g}"]
        plane = np.ascontiguousarray(volume[::-1, rows[k], :])
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [f"{dz:g}", f"{dx:g}"]
        ds.SliceThickness = f"{dy * 4:g}"
        ds.PixelData = plane.tobytes()
    return _series([slices[0]] * len(rows), out, 602, edit=edit)


@pytest.fixture(scope="module")
def routed_study(tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The phantom (its own series is the thin bone axial) and the rest of the study:
    (phantom folder, name -> series folder, name -> Series Instance UID)."""
    from pipeline.phantom import generate, write_study
    ph = generate(5, levels="T11-L3", fractures="L1:2:wedge",
                  acquisition={"matrix": 160, "pixel_spacing": 2.0, "slice_spacing": 1.0,
                               "slice_thickness": 1.0, "kernel": "B70f",
                               "circle_padding": False})
    root = tmp_path_factory.mktemp("routed")
    phantom = root / "phantom"
    write_study(ph, phantom)
    s = sorted((pydicom.dcmread(p) for p in (phantom / "dicom").glob("*.dcm")),
               key=lambda d: float(d.ImagePositionPatient[2]))
    uids = {"bone": str(s[0].SeriesInstanceUID),
            "scout": _scout(s, root / "scout"),
            "soft": _series(s, root / "soft", 3, kernel="B30f"),
            "thick": _series(s[::5], root / "thick", 5, kernel="B30f",
                             edit=lambda ds, k: setattr(ds, "SliceThickness", "5")),
            "sagittal": _sagittal_mpr(s, root / "sagittal"),
            "coronal": _coronal_mpr(s, root / "coronal"),
            "dose": _dose_screen(s, root / "dose")}
    folders = {name: phantom / "dicom" if name == "bone" else root / name for name in uids}
    return phantom, folders, uids


def _orthanc_objects(orthanc: Orthanc) -> list[dict]:
    return [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.get("/instances")]


def test_routed_study_reaches_the_pacs_as_one_seg_one_sr_one_key_image(
        tmp_path, node_factory, routed_study):
    phantom, folders, uids = routed_study
    orthanc = Orthanc(root=tmp_path / "orthanc").start()
    try:
        node = node_factory(
            pipeline={"entry_point": GROUND_TRUTH}, exporter=FAST_RETRY,
            destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                           "port": orthanc.dicom_port}],
            # the defaults a hospital gets, the spine check included
            selection={"min_coverage_mm": 50, "spine_check": True},
            node={"extra_storage_sop_classes": [SecondaryCaptureImageStorage]})
        node.env["GROUND_TRUTH_PHANTOM_DIR"] = str(phantom)
        node.start()
        for name, folder in folders.items():  # one association per series, as scanners do
            res = storescu(node, folder, "-R")
            assert res.returncode == 0, (name, res.stdout + res.stderr)

        def settled():
            jobs = node.cli_json("jobs")
            return jobs if len(jobs) == len(uids) and all(
                j["state"] in ("done", "skipped", "failed") for j in jobs) else None

        jobs = {j["series_instance_uid"]: j for j in node.wait_for(
            settled, timeout=600, interval=1.0, what="a job per series, settled")}
        bone = uids["bone"]
        assert [uid for uid, j in jobs.items() if j["state"] != "skipped"] == [bone]
        assert jobs[bone]["state"] == "done", jobs[bone]
        assert jobs[uids["soft"]]["error"].startswith(f"not chosen: series {bone} (B70f bone")
        for name, rule in {**EXPECTED_RULE, "coronal": EXPECTED_RULE["sagittal"]}.items():
            error = jobs[uids[name]]["error"]
            assert rule in error and error.endswith(f"series {bone} is analysed"), (name, error)

        node.wait_for(lambda: orthanc.instance_count() >= 3, timeout=120,
                      what="the results in Orthanc")
        time.sleep(3)  # a second answer would be on its way by now (exporter polls 0.5 s)
        objects = _orthanc_objects(orthanc)
        assert sorted(o["SOPClassUID"] for o in objects) == sorted([SEG, SR, KEY_IMAGE]), \
            [(o["SOPClassUID"], o.get("SeriesDescription")) for o in objects]
        study = str(pydicom.dcmread(next((phantom / "dicom").glob("*.dcm")),
                                    stop_before_pixels=True).StudyInstanceUID)
        assert {o["StudyInstanceUID"] for o in objects} == {study}
        # The SEG segments the bone series, no other.
        [seg] = [o for o in objects if o["SOPClassUID"] == SEG]
        referenced = {item["SeriesInstanceUID"] for item in seg["ReferencedSeriesSequence"]}
        assert referenced == {bone}
        # One result folder on the node: one version of one job.
        assert len(list(node.store_root.glob("results/*/*/v*-job*"))) == 1
    finally:
        orthanc.stop()
