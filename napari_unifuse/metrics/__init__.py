"""Fusion and registration metrics on numpy arrays (numpy/scipy/scikit-image; no Qt, no napari).

* ``fusion_metrics(fused, source_a, source_b) -> dict[str, float]`` and the individual fusion
  metrics (``fusion``, ``fusion_gradient``), each following a named reference evaluator.
* ``registration_metrics(aligned, label, mask=None)``, ``jacobian_determinant(u)`` (a map),
  ``folding_percentage(u)``, ``sd_log_jacobian(u)`` (``registration``).
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
from napari_unifuse.metrics.fusion_gradient import q_abf, q_cv
from napari_unifuse.metrics.misalignment import local_misalignment_map, mind_descriptor
from napari_unifuse.metrics.registration import (
    folding_percentage,
    jacobian_determinant,
    registration_metrics,
    sd_log_jacobian,
)

__all__ = [
    "METRIC_NAMES",
    "average_gradient",
    "entropy",
    "folding_percentage",
    "fusion_metrics",
    "jacobian_determinant",
    "local_misalignment_map",
    "mind_descriptor",
    "mutual_information",
    "normalized_mutual_information",
    "q_abf",
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
]
