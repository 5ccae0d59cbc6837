"""Network building blocks shared by the models of the pipeline.

- :mod:`pipeline.nets.blocks`: dimension-generic convolution, normalisation, residual double-conv
  blocks and attention gates (2D or 3D through ``spatial_dims``).
- :mod:`pipeline.nets.mscn`: the M-SCN of the paper (section 2.2) and the variants of its ablation
  (Table 4): SCN, LN only, GN only, LN+GN, M-SCN. The 3D model localises vertebrae; the 2D model
  (``spatial_dims=2``) regresses the six Genant keypoints (section 2.3.3).
"""
from pipeline.nets.mscn import MSCN, VARIANTS, build_mscn

__all__ = ["MSCN", "VARIANTS", "build_mscn"]
