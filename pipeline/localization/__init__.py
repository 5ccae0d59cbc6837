"""Vertebra localisation and labelling (paper section 2.2; DESIGN.md step 2).

``localize(image, device)`` returns the vertebrae of a CT volume as :class:`LocalizedVertebra`
(VerSe ``label``, ``name``, ``centroid_mm`` in patient LPS mm, ``score``, ``partial``).
"""
from pipeline.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "LocalizedVertebra": "pipeline.localization.infer",
    "localize": "pipeline.localization.infer",
})
