"""Fusion and registration metrics on numpy arrays (numpy/scipy/scikit-image; no Qt, no napari).

* ``fusion_metrics(fused, source_a, source_b) -> dict[str, float]`` and the individual fusion
  metrics (``fusion``, ``fusion_gradient``), each following a named reference evaluator.
* ``ssim_gains(fused, a, b) -> SourceGains`` (``fusion_gain``): per-source SSIM gain over the
  other source, the fusion score a copy of one source cannot win (issue 16).
* ``q_cb`` (Chen–Blum) and ``vif_f`` (Han et al.) (``fusion_perceptual``): per-pixel weighted
  fusion metrics, which can still rank a copy above an average fusion.
* ``bone_retention(fused, ct)`` (``retention``): mean fused intensity over the CT's bone.
* ``registration_metrics(aligned, label, mask=None)``, ``end_point_error(u, truth, mask=None)``,
  ``jacobian_determinant(u)`` (a map),
  ``folding_percentage(u)``, ``sd_log_jacobian(u)``, or both from one determinant map with
  ``jacobian_regularity(determinant)`` (``registration``).
* ``local_misalignment_map(image, reference)``: MIND-based, for alignment without a label
  (``misalignment``).
"""

from napari_unifuse.metrics.fusion import (
    METRIC_NAMES,
    average_gradient,
    entropy,
    fusion_metrics,
    mutual_information,
    normalized_mutual_information,
    q_cc,
    q_mse,
    q_psnr,
    q_s,
    q_scd,
    q_ssim,
    q_vif,
)
from napari_unifuse.metrics.fusion_gain import SourceGains, ssim_gains
from napari_unifuse.metrics.fusion_gradient import q_abf, q_cv
from napari_unifuse.metrics.fusion_perceptual import q_cb, vif_f
from napari_unifuse.metrics.misalignment import local_misalignment_map, mind_descriptor
from napari_unifuse.metrics.registration import (
    JacobianRegularity,
    end_point_error,
    folding_percentage,
    jacobian_determinant,
    jacobian_regularity,
    registration_metrics,
    sd_log_jacobian,
)
from napari_unifuse.metrics.retention import BONE_THRESHOLD, bone_retention

__all__ = [
    "BONE_THRESHOLD",
    "JacobianRegularity",
    "METRIC_NAMES",
    "SourceGains",
    "average_gradient",
    "bone_retention",
    "end_point_error",
    "entropy",
    "folding_percentage",
    "fusion_metrics",
    "jacobian_determinant",
    "jacobian_regularity",
    "local_misalignment_map",
    "mind_descriptor",
    "mutual_information",
    "normalized_mutual_information",
    "q_abf",
    "q_cb",
    "q_cc",
    "q_cv",
    "q_mse",
    "q_psnr",
    "q_s",
    "q_scd",
    "q_ssim",
    "q_vif",
    "registration_metrics",
    "sd_log_jacobian",
    "ssim_gains",
    "vif_f",
]
