"""A ground-truth label of a run: whether it can be scored against, and its metrics.

The label is the moving image's ground truth aligned to the reference (the clean moving image).
``unifuse fuse --label``, ``unifuse evaluate`` and the workbench check it with
:func:`label_coverage_warnings` before any work, and the first and last score a run against it
with :func:`label_metrics`, so that one run and one label give the same numbers everywhere.
"""

from __future__ import annotations

import numpy as np

from napari_unifuse.engine.inference import PARTIAL_COVERAGE_WARNING, the_reference
from napari_unifuse.engine.overlays import slice_of
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume, grid_coverage, resample_to_reference
from napari_unifuse.metrics import registration_metrics


def label_coverage_warnings(label: ImageVolume, reference: ImageVolume) -> list[str]:
    """What a run should say of how much of the reference grid ``label`` reaches in space, by the
    moving image's threshold (``engine.inference.PARTIAL_COVERAGE_WARNING``): its metrics compare
    the aligned image with the label's 0 wherever it does not reach. An InputError for a label of
    another dimensionality than the reference, or one that reaches none of its grid (metrics against
    nothing but zeros). A one-slice reference is checked in 3D, as its moving image is resampled."""
    if label.ndim != reference.ndim:
        raise InputError(f"the label is {label.ndim}D but {the_reference(reference)} is {reference.ndim}D; "
                         f"give a {reference.ndim}D label, the moving image's ground truth aligned to the reference",
                         label.source)
    coverage = grid_coverage(label, reference)
    if coverage == 0:
        raise InputError(f"the label does not overlap {the_reference(reference)} in space, so there is "
                         "nothing to measure the aligned image against; check the label's origin and orientation "
                         "(its affine), or give this pair's own label", label.source)
    if coverage >= PARTIAL_COVERAGE_WARNING:
        return []
    return [f"{label.source or 'label'}: the label covers only {100 * coverage:.3g} % of the reference grid in space; "
            "the label metrics compare the aligned image with the label's 0 elsewhere"]


def label_in_model_units(result: FusionResult, label: ImageVolume) -> np.ndarray:
    """``label`` on the run's output grid (the reference's), through the moving image's intensity
    mapping (luma for RGB): the [0, 1] units the model aligned the moving image in, and those of
    ``result.in_model_units("moving", result.aligned)``."""
    on_grid = label if label.on_grid_of(result.aligned) else resample_to_reference(label, result.aligned)
    return result.in_model_units("moving", on_grid)


def label_metrics(result: FusionResult, label_units: np.ndarray) -> dict[str, float]:
    """MSE / NCC / SSIM of the run's aligned moving image to its label, both in the model's [0, 1]
    units (``label_units``: :func:`label_in_model_units`), so that MSE is on the scale UniFuse's
    alignment results are reported in, whatever window either image is displayed in. A one-slice
    volume is scored as the 2D image it was fused as (``model_dimensions``): a 3D SSIM window cannot
    fit in one slice."""
    slice_axis = result.aligned.single_slice_axis
    aligned_units = result.in_model_units("moving", result.aligned)
    return registration_metrics(slice_of(aligned_units, slice_axis, 0), slice_of(label_units, slice_axis, 0))
