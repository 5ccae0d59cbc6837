"""The model registry: SHA-256 checked weights, clear errors, device selection."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.nets import MSCN
from pipeline.registry import (
    ModelWeightsError,
    build_from_checkpoint,
    flush_subnormals,
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


def test_subnormal_weights_are_flushed_to_zero_and_nothing_else_changes():
    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([tiny / 4, -tiny / 1000, 0.0, tiny, -1e-30, 2.5])
    assert torch.equal(flush_subnormals(t), torch.tensor([0.0, 0.0, 0.0, tiny, -1e-30, 2.5]))
    assert torch.equal(flush_subnormals(torch.tensor([3, 0])), torch.tensor([3, 0]))

    model = MSCN(spatial_dims=3, out_channels=3, base=2, variant="mscn")
    with torch.no_grad():
        next(model.parameters()).view(-1)[:5] = tiny / 8
    ckpt = weights_payload(model, "pipeline.nets.mscn:build_mscn", {})
    loaded = build_from_checkpoint(ckpt)
    flushed = next(loaded.parameters()).view(-1)[:5]
    assert torch.equal(flushed, torch.zeros(5))


def test_the_shipped_localization_network_gives_the_same_heatmaps_with_subnormals_flushed():
    """The shipped weights hold subnormal values (the reason for the flush: they slow CPU
    convolutions many times); flushing them must not change one output bit."""
    from pipeline.registry import WEIGHTS_DIR

    path = verify("localization", WEIGHTS_DIR)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    tiny = torch.finfo(torch.float32).tiny
    assert sum(int(((v != 0) & (v.abs() < tiny)).sum()) for v in state.values()
               if v.is_floating_point()) > 0, "no subnormal weights left: this test checks nothing"
    flushed = build_from_checkpoint(ckpt)
    raw = build_from_checkpoint(ckpt)
    raw.load_state_dict(state)
    x = torch.randn(1, 1, 32, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(flushed(x), raw(x))
