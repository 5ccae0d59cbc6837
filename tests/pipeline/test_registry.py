"""The model registry: SHA-256 checked weights, clear errors, device selection."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.nets import MSCN
from pipeline.registry import (
    ModelWeightsError,
    install_weights,
    load_model,
    read_manifest,
    resolve_device,
    verify,
    weights_payload,
)


@pytest.fixture()
def weights_dir(tmp_path):
    model = MSCN(spatial_dims=3, out_channels=3, base=2, variant="mscn")
    src = tmp_path / "src.pt"
    torch.save(weights_payload(model, "pipeline.nets.mscn:build_mscn", {"spacing_mm": 4.0}), src)
    d = tmp_path / "weights"
    install_weights("localization", src, d)
    return d, model


def test_load_model_rebuilds_the_network_with_its_meta(weights_dir):
    d, model = weights_dir
    loaded = load_model("localization", "cpu", weights_dir=d)
    assert loaded.meta == {"spacing_mm": 4.0}
    assert not loaded.training
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


def test_a_damaged_weight_file_is_refused_with_both_hashes(weights_dir):
    d, _ = weights_dir
    with open(d / "localization.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelWeightsError, match="SHA-256"):
        verify("localization", d)


def test_missing_and_unlisted_weights_name_the_problem(weights_dir):
    d, _ = weights_dir
    with pytest.raises(ModelWeightsError, match="not listed"):
        load_model("keypoints", "cpu", weights_dir=d)
    (d / "localization.pt").unlink()
    with pytest.raises(ModelWeightsError, match="missing"):
        load_model("localization", "cpu", weights_dir=d)


def test_builders_outside_the_pipeline_package_are_refused(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"builder": "os:system", "config": {}, "state_dict": {}, "meta": {}}, src)
    install_weights("localization", src, tmp_path / "w")
    with pytest.raises(ModelWeightsError, match="builder"):
        load_model("localization", "cpu", weights_dir=tmp_path / "w")


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelWeightsError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_shipped_manifest_matches_the_shipped_files():
    manifest = read_manifest()
    for name in manifest:
        verify(name)  # raises on a mismatch
    assert json.loads(json.dumps(manifest)) == manifest
