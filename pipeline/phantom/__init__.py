"""Synthetic spine CT phantom with exact ground truth (issue 3; docs/internal-interfaces.md).

``generate(seed, levels=None, fractures="auto", spacing_mm=None) -> Phantom``;
``write_study(phantom, out_dir)`` writes ``dicom/``, ``labels.nii.gz``, ``gt.json`` and ``verse/``.
"""
from pipeline.phantom.generator import Phantom, generate

__all__ = ["Phantom", "generate", "write_study"]


def write_study(phantom, out_dir, preview: bool = False):
    """Write the study (DICOM series, labels, gt.json, VerSe export[, preview.png]) to ``out_dir``."""
    from pipeline.phantom.writer import write_study as _write

    return _write(phantom, out_dir, preview=preview)
