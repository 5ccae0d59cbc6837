"""Generative domain randomisation from real vertebra label maps (SynthSeg-style).

The networks were trained on a box-like phantom only, and a network learns whatever texture its
one renderer draws. Here the anatomy comes from real expert masks (VerSe labels) and everything
that is not anatomy is drawn at random for every volume, so that no single appearance can be
learned:

- :mod:`~pipeline.synthesis.geometry`: frames of the vertebrae (spine axis, anterior) and their
  bodies, shared by the other modules;
- :mod:`~pipeline.synthesis.pose`: a label map onto a 1 mm LPS grid with a random rotation,
  scale, low-frequency bending and field of view;
- :mod:`~pipeline.synthesis.fracture`: a Genant compression fracture of one vertebral body;
- :mod:`~pipeline.synthesis.render`: label map -> CT-like HU image with random appearance;
- :mod:`~pipeline.synthesis.generate`: the three together (:func:`synthesize`);
- :mod:`~pipeline.synthesis.seg_source`: training crops for the segmentation network.
"""
from __future__ import annotations

from pipeline.synthesis.generate import SynthCase, SynthOptions, synthesize

__all__ = ["SynthCase", "SynthOptions", "synthesize"]
