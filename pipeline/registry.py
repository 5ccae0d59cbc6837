"""The one way the pipeline loads model weights (issue 4; docs/internal-interfaces.md).

Weights live in ``pipeline/weights/<name>.pt``; ``pipeline/weights/manifest.json`` lists, per
model name, the file and its SHA-256, checked on every load so that a truncated or swapped file
fails loudly instead of producing findings.

A weight file is a ``torch.save``-d dict (loaded with ``weights_only=True``)::

    {"builder": "pipeline.nets.mscn:build_mscn",   # callable(**config) -> nn.Module
     "config": {...}, "state_dict": {...},
     "meta": {...}}                                  # what inference needs (grid, patch, ...)

The builder must live in the ``pipeline`` package. The loaded module carries ``meta`` as its
attribute ``.meta``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
MODEL_NAMES = ("localization", "segmentation", "keypoints", "junction")


class ModelWeightsError(RuntimeError):
    """A model's weights are missing, not listed, or do not match their recorded SHA-256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelWeightsError(f"device {device!r} requested but no CUDA GPU is available "
                                "(set [pipeline] device = \"auto\" or \"cpu\")")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    path = Path(weights_dir) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _entry(name: str, weights_dir: Path) -> tuple[Path, str]:
    manifest = read_manifest(weights_dir)
    if name not in manifest:
        raise ModelWeightsError(
            f"model {name!r} is not listed in {Path(weights_dir) / MANIFEST}; train it "
            f"(`spine-node train {name} ...`) and install its weights")
    entry = manifest[name]
    path = Path(weights_dir) / entry["file"]
    if not path.exists():
        raise ModelWeightsError(f"weights of model {name!r} missing: {path} does not exist "
                                "(reinstall the package or retrain the model)")
    return path, entry["sha256"]


def verify(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """The path of ``name``'s weights after checking their SHA-256 against the manifest."""
    path, expected = _entry(name, weights_dir)
    actual = sha256_file(path)
    if actual != expected:
        raise ModelWeightsError(f"weights of model {name!r} at {path} have SHA-256 {actual}, "
                                f"the manifest expects {expected}: the file is damaged or was replaced")
    return path


def _builder(spec: str):
    module, _, attr = spec.partition(":")
    if not (module == "pipeline" or module.startswith("pipeline.")) or not attr:
        raise ModelWeightsError(f"weight file names builder {spec!r}; only pipeline.* builders are allowed")
    return getattr(importlib.import_module(module), attr)


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its subnormal values (nonzero, below ``torch.finfo(dtype).tiny``: 1.2e-38 in
    float32) set to zero; other tensors unchanged.

    Weight decay leaves such values in trained weights (the shipped localization network holds
    thousands, in the global network's 7^3 kernels). x86 CPUs compute with subnormal operands
    in microcode, many times slower. Their contribution to any output is below float32
    resolution, so the outputs stay the same (``tests/test_registry.py`` checks bit-equality on the shipped
    localization weights).
    """
    if not t.is_floating_point():
        return t
    return torch.where(t.abs() < torch.finfo(t.dtype).tiny, torch.zeros((), dtype=t.dtype), t)


def build_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The module a weight dict describes, with its weights loaded (as float32, subnormal values
    flushed to zero: :func:`flush_subnormals`) and ``.meta`` attached."""
    model = _builder(ckpt["builder"])(**ckpt["config"])
    model.load_state_dict({k: flush_subnormals(v.float()) if v.is_floating_point() else v
                           for k, v in ckpt["state_dict"].items()})
    model.meta = dict(ckpt.get("meta", {}))
    return model.eval()


_cache: dict[tuple[str, str, str, str], torch.nn.Module] = {}
_lock = threading.Lock()


def load_model(name: str, device: str | torch.device = "auto", weights_dir: Path = WEIGHTS_DIR) -> torch.nn.Module:
    """Model ``name`` in eval mode on ``device`` (``auto`` | ``cpu`` | ``cuda``).

    Raises :class:`ModelWeightsError` when the weights are missing, unlisted or fail the SHA-256
    check. Loaded models are cached per (name, device, weights) within the process.
    """
    dev = resolve_device(device)
    path = verify(name, weights_dir)
    key = (name, str(dev), str(path), read_manifest(weights_dir)[name]["sha256"])
    with _lock:
        if key not in _cache:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            _cache[key] = build_from_checkpoint(ckpt).to(dev)
        return _cache[key]


def weights_payload(model: torch.nn.Module, builder: str, meta: dict[str, Any], half: bool = False) -> dict[str, Any]:
    """The dict to ``torch.save`` as a shippable weight file (``half``: store float16)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    return {"builder": builder, "config": dict(model.config), "state_dict": state, "meta": dict(meta)}


def install_weights(name: str, source: Path, weights_dir: Path = WEIGHTS_DIR, **info: Any) -> Path:
    """Copy a weight file to ``weights_dir/<name>.pt`` and record its SHA-256 in the manifest."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / f"{name}.pt"
    if Path(source).resolve() != dest.resolve():
        shutil.copyfile(source, dest)
    manifest = read_manifest(weights_dir)
    manifest[name] = {"file": dest.name, "sha256": sha256_file(dest), "bytes": dest.stat().st_size, **info}
    tmp = weights_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(weights_dir / MANIFEST)
    return dest
