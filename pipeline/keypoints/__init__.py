"""Genant keypoints on the mid-sagittal plane of each vertebra (paper section 2.3.3, eq. 14-16).

A 2D M-SCN (:class:`pipeline.nets.MSCN` with ``spatial_dims=2``, the localization model's code)
regresses six heatmaps, one per keypoint of :data:`pipeline.findings.KEYPOINT_NAMES`
(A1 A2 M1 M2 P1 P2), from two channels of the sagittal plane through the vertebral body: the CT
(z-scored) and the vertebra's segmentation (foreground probability; the paper's
``s_i = Y_i[:, y_coord, :]`` takes the mask; the shipped model reads the CT alone).
``l_coord = argmax`` (eq. 16) where each heatmap has one clear peak, else the strongest
combination shaped like a vertebral body; refined to sub-pixel by a parabola through the
log-heatmap. :func:`locate_keypoints` runs two passes, the second centred on the first's points.
"""
from pipeline.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "PLANE_SIZE": "pipeline.keypoints.plane",
    "PLANE_SPACING_MM": "pipeline.keypoints.plane",
    "SagittalPlane": "pipeline.keypoints.plane",
    "sagittal_plane": "pipeline.keypoints.plane",
    "decode_heatmaps": "pipeline.keypoints.infer",
    "decode_keypoints": "pipeline.keypoints.infer",
    "locate_keypoints": "pipeline.keypoints.infer",
    "predict_keypoints": "pipeline.keypoints.infer",
})
