"""Per-vertebra segmentation (paper section 2.3.1-2.3.2): background / normal / fractured.

- :mod:`pipeline.segmentation.model`: the 3D U-Net, the 1 mm refiner, what ``segmentation.pt`` holds;
- :mod:`pipeline.segmentation.crops`: LPS-aligned crops around a centroid (eq. 10);
- :mod:`pipeline.segmentation.infer`: :func:`segment` -- crops through the network, merged onto the
  source grid with one VerSe label per vertebra;
- :mod:`pipeline.segmentation.dataset`, :mod:`~pipeline.segmentation.train`: training (eq. 12-13).
"""
import importlib

#: Where each public name lives; imported on first use, so that the package itself loads no torch
#: (the command line reads the training configs without it).
_PUBLIC = {
    "CROP_SIZE": "pipeline.segmentation.infer",
    "CROP_SPACING_MM": "pipeline.segmentation.infer",
    "SegmentationResult": "pipeline.segmentation.infer",
    "SegmentedVertebra": "pipeline.segmentation.infer",
    "segment": "pipeline.segmentation.infer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
