"""``spine-node process`` end to end on a small phantom study: summary.json as DESIGN.md says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.registry import read_manifest

CONTRACT_VERTEBRA_KEYS = {"name", "label", "centroid_mm", "fractured", "genant_grade", "morphology", "heights_mm"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from pipeline.phantom import generate, write_study

    out = tmp_path_factory.mktemp("study")
    # a short series (40 slices at 2.5 mm, 256 matrix) with one wedge fracture; seed outside 9001-9010
    ph = generate(8301, levels="T11-L3", fractures="L1:2:wedge",
                  acquisition={"matrix": 256, "pixel_spacing": 1.0, "slice_spacing": 2.5,
                               "slice_thickness": 2.5, "n_slices": 60})
    write_study(ph, out)
    return out, ph


@pytest.mark.skipif(not {"localization", "segmentation", "keypoints"} <= set(read_manifest()),
                    reason="model weights not installed (pipeline/weights/manifest.json)")
@pytest.mark.slow
def test_process_writes_the_contract_summary(study, tmp_path):
    from dicom_node.cli import app

    src, ph = study
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["process", str(src / "dicom"), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["study_instance_uid"] == ph.gt["study_instance_uid"]
    assert s["series_instance_uid"] == ph.gt["series_instance_uid"]
    assert isinstance(s["timings_s"], dict) and s["timings_s"]["total"] > 0
    assert s["vertebrae"], "no vertebra found"
    for v in s["vertebrae"]:
        assert CONTRACT_VERTEBRA_KEYS <= set(v)
        assert v["genant_grade"] in (0, 1, 2, 3)
        assert v["morphology"] in ("normal", "wedge", "biconcave", "crush")
        assert len(v["centroid_mm"]) == 3
        assert v["heights_mm"] is None or set(v["heights_mm"]) == {"anterior", "middle", "posterior"}
        assert v["fractured"] == (v["genant_grade"] >= 1)


def test_process_refuses_a_folder_without_dicom(tmp_path):
    from dicom_node.cli import app

    (tmp_path / "notes.txt").write_text("not DICOM")
    res = CliRunner().invoke(app, ["process", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "no DICOM files" in res.output


def _tiny_weights(weights_dir):
    """Untrained, tiny models of every name, installed into ``weights_dir``."""
    import torch

    from pipeline.junction.net import build_junction
    from pipeline.keypoints.train import build_keypoint_model
    from pipeline.nets.mscn import build_mscn
    from pipeline.registry import install_weights, weights_payload
    from pipeline.segmentation.model import build_segmentation

    torch.manual_seed(0)
    loc = build_mscn(spatial_dims=3, in_channels=1, out_channels=26, base=2, depth=3, gn_kernels=(3, 3, 3))
    seg = build_segmentation({"base": 2, "depth": 3})
    kp = build_keypoint_model(base=2, depth=3)
    for name, model, builder, meta in (
        ("localization", loc, "pipeline.nets.mscn:build_mscn",
         {"spacing_mm": 8.0, "patch": [32, 32, 32], "overlap": 0.25, "threshold": 0.0}),
        ("segmentation", seg, "pipeline.segmentation.model:build_segmentation",
         {"crop_size": 32, "crop_spacing_mm": 4.0}),
        ("keypoints", kp, "pipeline.nets.mscn:build_mscn", {"plane_size": 96, "plane_spacing_mm": 0.75}),
        ("junction", build_junction(2), "pipeline.junction.net:build_junction", {"threshold": 0.5}),
    ):
        path = weights_dir / f"{name}-src.pt"
        torch.save(weights_payload(model, builder, meta), path)
        install_weights(name, path, weights_dir)


def test_process_runs_end_to_end_with_any_installed_models(study, tmp_path, monkeypatch):
    """The whole path (DICOM files -> load -> localize -> segment -> keypoints -> Genant ->
    summary.json) with tiny untrained models, so that it runs without the shipped weights."""
    import functools

    import pipeline.registry as registry
    from dicom_node.cli import app

    weights = tmp_path / "weights"
    weights.mkdir()
    _tiny_weights(weights)
    monkeypatch.setattr(registry, "load_model", functools.partial(registry.load_model, weights_dir=weights))
    src, ph = study
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["process", str(src / "dicom"), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"study_instance_uid", "series_instance_uid", "vertebrae", "timings_s"}
    assert s["series_instance_uid"] == ph.gt["series_instance_uid"]
    assert {"localization", "segmentation", "keypoints", "genant", "total"} <= set(s["timings_s"])
    for v in s["vertebrae"]:
        assert CONTRACT_VERTEBRA_KEYS <= set(v)


REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real-ct" / \
    "totalsegmentator-example-ct"


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="the real CT fixture (../shared/data/real-ct) is absent")
@pytest.mark.skipif(not {"localization", "segmentation", "keypoints"} <= set(read_manifest()),
                    reason="model weights not installed (pipeline/weights/manifest.json)")
@pytest.mark.slow
def test_process_runs_a_real_jpeg2000_ct_without_error(tmp_path):
    """20 real slices (JPEG 2000 lossless, empty Study/Series/SOP Instance UIDs in the data set,
    SOP Class only in the file meta): decoded, analysed and reported without an error, whatever
    the phantom-trained models find on real anatomy."""
    from dicom_node.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["process", str(REAL_CT), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert isinstance(s["vertebrae"], list) and s["timings_s"]["total"] > 0
    for v in s["vertebrae"]:
        assert CONTRACT_VERTEBRA_KEYS <= set(v)
    assert sorted(p.name for p in out.glob("*.dcm")), "no DICOM result written"
    # The files carry no Study/Series Instance UID: the results get derived ones (same files,
    # same UIDs), say so, and still validate (Type 1 in every result object).
    assert "has no StudyInstanceUID" in res.output and "has no SeriesInstanceUID" in res.output
    assert s["study_instance_uid"] and s["series_instance_uid"]
    import pydicom

    from tests.helpers.synthetic_results import dciodvfy_errors

    for path in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == s["study_instance_uid"]
        errors, output = dciodvfy_errors(ds, tmp_path / f"check-{path.name}")
        assert not errors, f"{path.name}:\n{output}"
    again = tmp_path / "again"
    res2 = CliRunner().invoke(app, ["process", str(REAL_CT), "--out", str(again), "--device", "cpu"])
    assert res2.exit_code == 0, res2.output
    s2 = json.loads((again / "summary.json").read_text())
    assert (s2["study_instance_uid"], s2["series_instance_uid"]) == \
        (s["study_instance_uid"], s["series_instance_uid"])


def test_process_prints_an_ungraded_vertebra_as_not_graded():
    """A vertebra cut by the field of view (or C1/C2) keeps grade 0 in summary.json, but
    ``process`` says, as the key image does, that it was not graded, and shows no heights."""
    from dicom_node.commands.analysis import vertebra_line
    from pipeline.findings import GenantGrade, Heights, Morphology, VertebraFinding

    heights = Heights(anterior=14.0, middle=18.0, posterior=22.0)
    cut = VertebraFinding(label=12, name="T5", centroid_mm=(0.0, 0.0, 0.0), heights_mm=heights,
                          partial=True)
    c2 = VertebraFinding(label=2, name="C2", centroid_mm=(0.0, 0.0, 0.0),
                         grading_source="none")
    l1 = VertebraFinding(label=20, name="L1", centroid_mm=(0.0, 0.0, 0.0), heights_mm=heights,
                         fractured=True, genant_grade=GenantGrade.MODERATE,
                         morphology=Morphology.WEDGE)
    assert vertebra_line(cut.summary()) == "  T5  partial, not graded (cut by the field of view)"
    assert vertebra_line(c2.summary()) == "  C2  not graded"
    assert vertebra_line(l1.summary()) == ("  L1  grade 2  wedge      FRACTURED  HA  14.0  "
                                           "HM  18.0  HP  22.0 mm")
