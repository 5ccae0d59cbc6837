"""Vertebra localisation and labelling (paper section 2.2; DESIGN.md step 2).

``localize(image, device)`` returns the vertebrae of a CT volume as :class:`LocalizedVertebra`
(VerSe ``label``, ``name``, ``centroid_mm`` in patient LPS mm, ``score``, ``partial``).
"""
import importlib

#: Where each public name lives; imported on first use, so that the package itself loads no torch
#: (the command line reads the training configs without it).
_PUBLIC = {
    "LocalizedVertebra": "pipeline.localization.infer",
    "localize": "pipeline.localization.infer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
