"""Vertebra localisation and labelling (paper section 2.2; DESIGN.md step 2).

``localize(image, device)`` returns the vertebrae of a CT volume as :class:`LocalizedVertebra`
(VerSe ``label``, ``name``, ``centroid_mm`` in patient LPS mm, ``score``, ``partial``).
"""
from pipeline.localization.inference import LocalizedVertebra, localize

__all__ = ["LocalizedVertebra", "localize"]
