"""Per-vertebra segmentation (paper section 2.3.1-2.3.2): background / normal / fractured.

- :mod:`pipeline.segmentation.model`: the 3D U-Net, the 1 mm refiner, what ``segmentation.pt`` holds;
- :mod:`pipeline.segmentation.crops`: LPS-aligned crops around a centroid (eq. 10);
- :mod:`pipeline.segmentation.infer`: :func:`segment` -- crops through the network, merged onto the
  source grid with one VerSe label per vertebra;
- :mod:`pipeline.segmentation.dataset`, :mod:`~pipeline.segmentation.train`: training (eq. 12-13).
"""
from pipeline.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "CROP_SIZE": "pipeline.segmentation.crops",
    "CROP_SPACING_MM": "pipeline.segmentation.crops",
    "SegmentationResult": "pipeline.segmentation.infer",
    "SegmentedVertebra": "pipeline.segmentation.infer",
    "segment": "pipeline.segmentation.infer",
})
