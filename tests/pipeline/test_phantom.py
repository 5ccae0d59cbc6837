"""The synthetic phantom (issue 3): ground truth that agrees with itself, valid DICOM, determinism.

Sizes are kept small (160x160 matrix, a few levels) so the module runs in seconds; one test runs
the CLI at the seed's realistic size.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.findings import GenantGrade
from pipeline.levels import BY_NAME, LEVELS
from pipeline.phantom import generate, write_study
from pipeline.phantom.fractures import parse_fractures
from tests.helpers import DCMTK_ENV, REPO, dcmtk, free_port

SMALL = {"matrix": 160, "pixel_spacing": 1.0, "slice_spacing": 1.5, "slice_thickness": 1.5,
         "fov_dx": 0.0, "fov_dy": 10.0}
FRACTURES = "T12:1:biconcave,L1:2:wedge,L3:3:crush"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    ph = generate(11, levels="T11-L4", fractures=FRACTURES, acquisition=SMALL)
    out = tmp_path_factory.mktemp("phantom")
    write_study(ph, out, preview=True)
    return ph, out


def _genant(h: dict, reference: float | None) -> tuple[float, int, str]:
    """DESIGN.md's Genant rule, written out again independently of the generator."""
    ha, hm, hp = h["anterior"], h["middle"], h["posterior"]
    shape = 1 - min(ha, hm, hp) / max(ha, hm, hp)
    crush = 1 - max(ha, hm, hp) / reference if reference else 0.0
    loss = max(shape, crush, 0.0)
    grade = 0 if loss < 0.20 else 1 if loss < 0.25 else 2 if loss <= 0.40 else 3
    if grade == 0:
        return loss, 0, "normal"
    if crush > shape:
        return loss, grade, "crush"
    lowest = min(("anterior", ha), ("middle", hm), ("posterior", hp), key=lambda kv: kv[1])[0]
    return loss, grade, {"anterior": "wedge", "middle": "biconcave", "posterior": "crush"}[lowest]


def test_label_centroids_equal_gt_centroids(study):
    ph, out = study
    lab_img = sitk.ReadImage(str(out / "labels.nii.gz"))
    lab = sitk.GetArrayFromImage(lab_img)
    gt = json.loads((out / "gt.json").read_text())
    present = set(np.unique(lab)) - {0}
    assert present == {v["label"] for v in gt["vertebrae"]}
    for v in gt["vertebrae"]:
        kk, jj, ii = np.nonzero(lab == v["label"])
        c = lab_img.TransformContinuousIndexToPhysicalPoint((ii.mean(), jj.mean(), kk.mean()))
        assert np.allclose(c, v["centroid_mm"], atol=2e-3), (v["name"], c, v["centroid_mm"])
        assert v["voxels"] == len(kk)


def test_gt_schema_and_levels(study):
    ph, out = study
    gt = json.loads((out / "gt.json").read_text())
    assert gt["seed"] == 11
    assert gt["study_instance_uid"] and gt["series_instance_uid"]
    names = [v["name"] for v in gt["vertebrae"]]
    assert {"T11", "T12", "L1", "L2", "L3", "L4"} <= set(names)
    orders = [BY_NAME[n].order for n in names]
    assert orders == sorted(orders)
    for v in gt["vertebrae"]:
        assert set(v) >= {"label", "name", "centroid_mm", "partial", "fractured", "genant_grade", "morphology",
                          "heights_mm", "keypoints_mm"}
        assert set(v["keypoints_mm"]) == {"A1", "A2", "M1", "M2", "P1", "P2"}
        assert BY_NAME[v["name"]].label == v["label"]
    # the requested levels are fully inside the volume
    for v in gt["vertebrae"]:
        if v["name"] in ("T11", "T12", "L1", "L2", "L3", "L4"):
            assert not v["partial"], v["name"]


def test_heights_and_grades_follow_the_genant_definition(study):
    ph, out = study
    gt = json.loads((out / "gt.json").read_text())
    vs = gt["vertebrae"]
    for v in vs:
        kp = {k: np.array(p) for k, p in v["keypoints_mm"].items()}
        for part, (a, b) in {"anterior": ("A1", "A2"), "middle": ("M1", "M2"), "posterior": ("P1", "P2")}.items():
            assert abs(np.linalg.norm(kp[a] - kp[b]) - v["heights_mm"][part]) < 2e-3, (v["name"], part)
        # superior points lie above the inferior ones (patient z is superior)
        assert kp["M1"][2] > kp["M2"][2]
        loss, grade, morph = _genant(v["heights_mm"], v["reference_height_mm"])
        assert grade == v["genant_grade"], v["name"]
        assert morph == v["morphology"], v["name"]
        assert v["fractured"] == (grade > 0)
        assert abs(loss - v["height_loss"]) < 1e-3
        assert GenantGrade(v["genant_grade"]) == GenantGrade.from_height_loss(v["height_loss"])
    # the crush reference: mean of the largest heights of the nearest normal neighbours above
    # and below within the same region (checked where both lie inside this study)
    checked = 0
    for k, v in enumerate(vs):
        refs = []
        for step in (-1, 1):
            j = k + step
            while 0 <= j < len(vs) and vs[j]["fractured"] and vs[j]["name"][0] == v["name"][0]:
                j += step
            if 0 <= j < len(vs) and vs[j]["name"][0] == v["name"][0]:
                refs.append(max(vs[j]["heights_mm"].values()))
        if len(refs) == 2:
            assert abs(np.mean(refs) - v["reference_height_mm"]) < 1e-3, v["name"]
            checked += 1
    assert checked >= 2


def test_keypoints_lie_on_the_endplates_of_the_labelled_body(study):
    """2 mm inside each keypoint (along the body axis) is the vertebra, 2 mm outside is not."""
    ph, _ = study
    lab = sitk.GetArrayViewFromImage(ph.labels)

    def label_at(pt):
        i = np.round(ph.labels.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in pt))).astype(int)
        return lab[i[2], i[1], i[0]]

    checked = 0
    for v in ph.gt["vertebrae"]:
        if v["partial"]:
            continue
        kp = {k: np.array(p) for k, p in v["keypoints_mm"].items()}
        for sup, inf in (("A1", "A2"), ("M1", "M2"), ("P1", "P2")):
            axis = (kp[sup] - kp[inf]) / np.linalg.norm(kp[sup] - kp[inf])
            for name, sign in ((sup, 1.0), (inf, -1.0)):
                assert label_at(kp[name] - 2.0 * sign * axis) == v["label"], (v["name"], name, "inside")
                assert label_at(kp[name] + 2.0 * sign * axis) != v["label"], (v["name"], name, "outside")
                checked += 1
    assert checked >= 6 * 5


def test_requested_fractures_are_drawn_with_their_grade_and_morphology(study):
    ph, out = study
    got = {v["name"]: (v["genant_grade"], v["morphology"]) for v in ph.gt["vertebrae"] if v["fractured"]}
    assert got == {"T12": (1, "biconcave"), "L1": (2, "wedge"), "L3": (3, "crush")}


def test_fractured_body_is_visibly_shorter_in_the_label_map(study):
    """The label map itself shows the collapse: fewer voxels than the neighbours' mean."""
    ph, _ = study
    vox = {v["name"]: v["voxels"] for v in ph.gt["vertebrae"]}
    assert vox["L3"] < 0.85 * (vox["L2"] + vox["L4"]) / 2


def test_dicom_series_matches_the_phantom_grid(study):
    ph, out = study
    files = sorted((out / "dicom").iterdir())
    assert len(files) == ph.ct.GetSize()[2]
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(out / "dicom"))
    reader.SetFileNames(names)
    img = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ph.ct))
    assert np.allclose(img.GetOrigin(), ph.ct.GetOrigin(), atol=1e-3)
    assert np.allclose(img.GetDirection(), ph.ct.GetDirection())
    assert np.allclose(img.GetSpacing(), ph.ct.GetSpacing(), atol=1e-4)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert str(ds.PatientName) == "PHANTOM^SEED11"
    assert ds.StudyInstanceUID == ph.gt["study_instance_uid"]
    assert ds.SeriesInstanceUID == ph.gt["series_instance_uid"]
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)


@pytest.mark.integration
def test_dciodvfy_accepts_every_file_without_errors(study):
    ph, out = study
    tool = dcmtk("dciodvfy")
    files = sorted((out / "dicom").iterdir())
    for f in files[:: max(len(files) // 8, 1)] + [files[-1]]:
        res = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        assert "Error" not in report, f"{f.name}:\n{report}"


@pytest.mark.integration
@pytest.mark.parametrize("seed", [1, 2, 8])  # unsigned+padding HF, unsigned FF, signed+padding
def test_dciodvfy_accepts_every_acquisition_variant(tmp_path, seed):
    tool = dcmtk("dciodvfy")
    ph = generate(seed, acquisition={"matrix": 64, "pixel_spacing": 1.0, "n_slices": 3})
    write_study(ph, tmp_path)
    for f in sorted((tmp_path / "dicom").iterdir()):
        res = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        assert "Error" not in res.stdout + res.stderr, f"{f.name}:\n{res.stdout}{res.stderr}"
    ds = pydicom.dcmread(next((tmp_path / "dicom").iterdir()))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    k = int(ds.InstanceNumber)  # any slice: its HU must equal the phantom's slice at that position
    z = float(ds.ImagePositionPatient[2])
    kk = int(round(ph.ct.TransformPhysicalPointToContinuousIndex((0.0, 0.0, z))[2]))
    assert k >= 1 and np.array_equal(hu, sitk.GetArrayViewFromImage(ph.ct)[kk].astype(float))


def test_same_seed_gives_identical_output(tmp_path):
    small = {**SMALL, "matrix": 64, "n_slices": 24}
    a = generate(77, acquisition=small)
    b = generate(77, acquisition=small)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(b.ct))
    assert np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))
    assert a.gt == b.gt
    write_study(a, tmp_path / "a")
    write_study(b, tmp_path / "b")

    def digest(d: Path) -> dict[str, str]:
        return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    c = generate(78, acquisition=small)
    assert c.gt["study_instance_uid"] != a.gt["study_instance_uid"]


def test_isotropic_training_grid_shows_the_same_patient(study):
    ph, _ = study
    iso = generate(11, levels="T11-L4", fractures=FRACTURES, spacing_mm=2.0)
    assert iso.ct.GetSpacing() == (2.0, 2.0, 2.0)
    assert iso.ct.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    a = {v["name"]: v for v in ph.gt["vertebrae"] if not v["partial"]}
    b = {v["name"]: v for v in iso.gt["vertebrae"] if not v["partial"]}
    for name in set(a) & set(b):
        assert np.linalg.norm(np.subtract(a[name]["centroid_mm"], b[name]["centroid_mm"])) < 2.0, name
        assert a[name]["heights_mm"] == b[name]["heights_mm"]
        assert a[name]["genant_grade"] == b[name]["genant_grade"]


def test_auto_fractures_and_variety_over_seeds():
    counts, levels, orient = [], set(), set()
    for seed in range(12):
        ph = generate(seed, spacing_mm=4.0)
        gt = ph.gt
        n = sum(v["fractured"] for v in gt["vertebrae"])
        counts.append(n)
        assert 5 <= len(gt["levels"]) <= 17
        levels.add(gt["levels"][0])
        orient.add(gt["acquisition"]["head_first"])
        for v in gt["vertebrae"]:
            assert v["label"] in {lv.label for lv in LEVELS}
    assert max(counts) <= 3
    assert len(set(counts)) >= 2
    assert len(levels) >= 4
    assert orient == {True, False}


@pytest.mark.parametrize("spec, message", [
    ("Q1:2", "unknown level"), ("L1:4", "grade"), ("L1:2:banana", "morphology"), ("C1:2", "C1 and C2"),
])
def test_bad_fracture_specs_are_refused_with_a_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fractures(spec)


def test_explicit_fracture_spec_parses():
    got = parse_fractures("L1:2:wedge,T12:1:biconcave")
    assert [(r.name, r.grade, r.morphology) for r in got] == [("L1", 2, "wedge"), ("T12", 1, "biconcave")]
    assert parse_fractures("none") == [] and parse_fractures("auto") == "auto"


def test_preview_png_is_written(study):
    _, out = study
    from PIL import Image

    im = Image.open(out / "preview.png")
    assert im.width > 200 and im.height > 200


@pytest.mark.integration
def test_storescu_sends_the_series_to_storescp(study, tmp_path):
    ph, out = study
    scu, scp = dcmtk("storescu"), dcmtk("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen([scp, "-aet", "PHSCP", "-od", str(received), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        res = None
        for _ in range(50):  # wait for the listener
            res = subprocess.run([scu, "-aec", "PHSCP", "+sd", "127.0.0.1", str(port), str(out / "dicom")],
                                 capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
            if res.returncode == 0 or "Association Request Failed" not in res.stderr + res.stdout:
                break
            time.sleep(0.1)
        assert res is not None and res.returncode == 0, res.stdout + res.stderr
        sent = len(list((out / "dicom").iterdir()))
        deadline = time.monotonic() + 10
        while len(list(received.iterdir())) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        got = list(received.iterdir())
        assert len(got) == sent
        uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in got}
        assert len(uids) == sent
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_cli_writes_a_realistic_study(tmp_path):
    """The one realistic-size run: the seed's own acquisition grid through ``spine-node phantom``."""
    out = tmp_path / "study"
    res = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--seed", "9001", "--out", str(out),
                          "--levels", "L1-L3", "--fractures", "L2:2:wedge", "--preview"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("dicom", "labels.nii.gz", "gt.json", "verse/ct.nii.gz", "verse/seg-vert_msk.nii.gz",
                 "verse/ctd.json", "preview.png"):
        assert (out / name).exists(), name
    gt = json.loads((out / "gt.json").read_text())
    assert gt["levels"] == ["L1", "L2", "L3"]
    assert {v["name"]: v["genant_grade"] for v in gt["vertebrae"]}["L2"] == 2
    n = len(list((out / "dicom").iterdir()))
    assert n == gt["grid"]["shape_zyx"][0] and n > 20
    bad = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--seed", "1", "--out", str(tmp_path / "x"),
                          "--fractures", "L1:9"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "grade" in bad.stdout + bad.stderr
