"""A ground-truth label of a run: whether it can be scored against, and its metrics.

The label is the moving image's ground truth aligned to the reference: the clean moving image, an
intensity image in the moving image's units (not a segmentation). ``unifuse fuse --label``,
``unifuse evaluate`` and the workbench check it with :func:`checked_label` before any work and with
:func:`label_units_warnings` once the moving image's intensity mapping is known, and the first and
last score a run against it with :func:`label_metrics`, so that one run and one label give the same
numbers and the same warnings everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from napari_unifuse.engine.inference import (
    PARTIAL_COVERAGE_WARNING,
    one_slice_beside_2d,
    picture_placement_warnings,
    the_reference,
)
from napari_unifuse.engine.overlays import grey_values, slice_of
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume, IntensityMapping, grid_coverage, resample_to_reference
from napari_unifuse.io.readers import real_finite_values
from napari_unifuse.metrics import registration_metrics

# Past this share of the label's voxels above its background outside the moving image's window, the
# label is in other units: a clean moving image loses ~1-6 % to the window's percentile tails
# (synthesised MR volumes, every degradation), a 16-bit label beside an 8-bit moving image ~100 %.
CLIPPED_SHARE_WARNING = 0.2
# A label of at most this many distinct whole numbers, beside a moving image of more grey values,
# reads as a segmentation's ids (a clean image has many more).
SEGMENTATION_MAX_IDS = 16
# Voxels the label checks look at first: enough for a share to the percent and for a label's values.
SAMPLE_SIZE = 1_000_000
CLEAN_MOVING_IMAGE = ("give the clean moving image aligned to the reference, an intensity image in the moving "
                      "image's units")


def checked_label(label: ImageVolume, reference: ImageVolume) -> tuple[ImageVolume, list[str]]:
    """``label`` as a run scores it beside ``reference``, and what the run should say of it, checked
    before any work as the moving image is: a one-slice volume beside a 2-D reference is the 2-D image
    of its slice (:func:`one_slice_label`); NaN, infinite and complex values are made usable as
    ``FusionEngine.validate`` makes the moving image's (``io.readers.real_finite_values``). Warnings
    naming the label: its reader's notes (values it replaced, NIfTI forms that disagree) and those
    changes, a picture's guessed place in space (``inference.picture_placement_warnings``), a
    constant label (the NCC to it is undefined) and :func:`label_coverage_warnings`. An InputError
    for a label that cannot be scored (no finite voxel, another dimensionality, no overlap)."""
    label = one_slice_label(label, reference)
    coverage = label_coverage_warnings(label, reference)
    try:
        array, replaced = real_finite_values(label.array)
    except InputError as error:
        raise InputError(f"the label: {error.problem}", label.source or "label") from error
    label = dataclasses.replace(label, array=array)
    notes = [*label.metadata.get("warnings", []), *replaced, *picture_placement_warnings(reference, label)]
    grey = grey_values(label)
    if (grey == grey.flat[0]).all():
        notes.append(f"the label is constant ({grey.flat[0]:g} everywhere): the NCC to a constant image is "
                     f"undefined (NaN), and the other label metrics measure how flat the aligned image is; "
                     f"{CLEAN_MOVING_IMAGE}")
    return label, [*coverage, *(f"{_label_name(label)}: {note}" for note in notes)]


def one_slice_label(label: ImageVolume, reference: ImageVolume) -> ImageVolume:
    """``label`` beside a 2D ``reference``: a one-slice volume (stored like a one-slice moving image)
    as the 2D image of its slice, as ``inference.one_slice_beside_2d`` takes the moving image; any
    other label as it is, for :func:`label_coverage_warnings` to check."""
    beside = one_slice_beside_2d(reference, label, moving_role="label")
    return label if beside is None else beside[1]


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


def label_units_warnings(label: ImageVolume, moving: ImageVolume, mapping: IntensityMapping | None) -> list[str]:
    """What a run should say where ``label`` (:func:`checked_label`'s) seems not to be in the moving
    image's units, which its metrics assume: the label goes through the moving image's intensity
    ``mapping`` (luma for RGB), whose window clips it. A segmentation (a few whole-number ids beside
    a moving image of many grey values), or a share of the label's voxels above its background past
    ``CLIPPED_SHARE_WARNING`` outside the window (a 16-bit label beside an 8-bit moving image);
    ``mapping`` None (a label given its own) checks the first alone."""
    values = grey_values(label)
    ids = _segmentation_ids(values, moving) if not label.is_rgb else None
    if ids is not None:
        shown = ", ".join(f"{value:g}" for value in ids[:8]) + (", ..." if ids.size > 8 else "")
        return [f"{_label_name(label)}: the label holds only {ids.size} distinct whole numbers ({shown}), as a "
                "segmentation does, but the label metrics compare the aligned image's intensities with its values; "
                f"{CLEAN_MOVING_IMAGE}"]
    if mapping is None:
        return []
    sample = _strided_sample(values)  # a share, not every voxel: a clinical label has 10⁸ of them
    above_background = sample[sample > values.min()]
    if not above_background.size:
        return []  # a constant label: checked_label says so
    scaled = mapping.scaled(above_background)
    share = np.count_nonzero((scaled < 0) | (scaled > 1)) / scaled.size
    if share <= CLIPPED_SHARE_WARNING:
        return []
    return [f"{_label_name(label)}: {100 * share:.0f} % of the label's voxels above its background lie outside the "
            f"moving image's intensity window [{mapping.lower:g}, {mapping.upper:g}] and are clipped to its ends "
            f"before the label metrics; the label must be in the moving image's units (a 16-bit label beside an "
            f"8-bit moving image is not): {CLEAN_MOVING_IMAGE}"]


def run_moving_mapping(result: FusionResult) -> IntensityMapping:
    """The intensity mapping ``result``'s run took the moving image through: the label's too."""
    return IntensityMapping.from_dict(result.provenance["intensity_mappings"]["moving"])


def _segmentation_ids(values: np.ndarray, moving: ImageVolume) -> np.ndarray | None:
    """The label's distinct values where they read as a segmentation's ids, else None. A sample
    decides first: an ordinary label shows more values, or fractions, in a few of its voxels."""
    sample = _strided_sample(values)
    if np.unique(sample).size > SEGMENTATION_MAX_IDS or not np.array_equal(sample, np.round(sample)):
        return None
    if not np.array_equal(values, np.round(values)):
        return None
    ids = np.unique(values)
    if not 2 <= ids.size <= SEGMENTATION_MAX_IDS:
        return None
    moving_values = grey_values(moving)
    many_grey_values = (np.unique(_strided_sample(moving_values)).size > SEGMENTATION_MAX_IDS
                        or np.unique(moving_values).size > SEGMENTATION_MAX_IDS)
    return ids if many_grey_values else None


def _strided_sample(values: np.ndarray) -> np.ndarray:
    """About ``SAMPLE_SIZE`` of ``values``' voxels, evenly strided (all of a small image)."""
    flat = values.ravel()
    return flat[:: max(1, flat.size // SAMPLE_SIZE)]


def _label_name(label: ImageVolume) -> str:
    """The label as its warnings name it: its file, said to be the label, where it has one."""
    return f"{label.source} (the label)" if label.source else "label"


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
