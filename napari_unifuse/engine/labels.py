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
from napari_unifuse.io.readers import colour_in_unit_range, real_finite_values
from napari_unifuse.metrics import registration_metrics

# Past this share of the label's voxels above its background outside the moving image's window, the
# label is in other units: a clean moving image loses ~1-6 % to the window's percentile tails
# (synthesised MR volumes, every degradation), a 16-bit label beside an 8-bit moving image ~100 %.
CLIPPED_SHARE_WARNING = 0.2
# Below this share of the moving image's range (its values' 99th percentile above its background),
# the label's is in much smaller units: a clean label spans 0.99-1.19 of its moving image's across
# `unifuse synth` outputs of every degradation (3-D phantoms, Harvard pictures); a label scaled to
# [0, 1] beside an MR image in scanner units spans 0.003 of it, an 8-bit one beside 16 bits 1/257.
SMALL_UNITS_SPAN_SHARE = 0.25
# A label of at most this many distinct whole numbers, beside a moving image of more grey values,
# reads as a segmentation's ids (a clean image has many more).
SEGMENTATION_MAX_IDS = 16
# A label of more whole numbers reads as a segmentation's ids where at least this share of its
# neighbouring voxels hold the same value (_flat_share) and its moving image's do not: 0.74 for an
# aparc+aseg-like parcellation at 3.4 mm, 0.80 at 2.3 mm; at most 0.66 for the 1316 Harvard pictures
# (CT, MR, and the grey luma of the colour PET and SPECT), 0.1 for int16 phantoms.
SEGMENTATION_FLAT_SHARE = 0.7
# Voxels the label checks look at first: enough for a share to the percent and for a label's values.
SAMPLE_SIZE = 1_000_000
CLEAN_MOVING_IMAGE = ("give the clean moving image aligned to the reference, an intensity image in the moving "
                      "image's units")


def checked_label(label: ImageVolume, reference: ImageVolume,
                  undefined_for_constant: tuple[str, ...] = ("NCC",)) -> tuple[ImageVolume, list[str]]:
    """``label`` as a run scores it beside ``reference``, and what the run should say of it, checked
    before any work as the moving image is: a one-slice volume beside a 2-D reference is the 2-D image
    of its slice (:func:`one_slice_label`); NaN, infinite and complex values are made usable as
    ``FusionEngine.validate`` makes the moving image's (``io.readers.real_finite_values``). Warnings
    naming the label: its reader's notes (values it replaced, NIfTI forms that disagree) and those
    changes, a picture's guessed place in space (``inference.picture_placement_warnings``), a
    constant label (the metrics ``undefined_for_constant`` names are NaN against it: the NCC of a run's
    label metrics; evaluate's fusion metrics add theirs) and :func:`label_coverage_warnings`. An InputError
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
        undefined = " and ".join(", ".join(undefined_for_constant).rsplit(", ", 1))
        notes.append(f"the label is constant ({grey.flat[0]:g} everywhere): the {undefined} to a constant image "
                     f"{'is' if len(undefined_for_constant) == 1 else 'are'} undefined (NaN), and the other label "
                     f"metrics measure how flat the aligned image is; {CLEAN_MOVING_IMAGE}")
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
    the aligned image with the moving image's background wherever it does not reach
    (:func:`label_on_grid`). An InputError for a label of
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
            "elsewhere the label metrics compare the aligned image with the moving image's background (the bottom "
            "of its intensity window, 0 in the model's units)"]


def label_units_warnings(label: ImageVolume, moving: ImageVolume, mapping: IntensityMapping | None) -> list[str]:
    """What a run should say where ``label`` (:func:`checked_label`'s) seems not to be in the moving
    image's units, which its metrics assume: the label goes through the moving image's intensity
    ``mapping`` (luma for RGB, a grey label taken as :func:`label_in_moving_grey_units` says), whose
    window clips it. A segmentation (:func:`_segmentation_ids`: a few whole-number ids beside a moving
    image of many grey values, or more of them in flat patches); a share of the label's voxels above
    its background past ``CLIPPED_SHARE_WARNING`` outside the window (a 16-bit label beside an 8-bit
    moving image); or a label whose range is under ``SMALL_UNITS_SPAN_SHARE`` of the moving image's
    (a label scaled to [0, 1] beside a moving image in scanner units, an 8-bit label beside a 16-bit
    moving image), which the window maps to a faint image. ``mapping`` None (a label given its own)
    checks the first alone, and so does a constant moving image, whose window is a placeholder."""
    values = grey_values(label)  # a segmentation's ids as stored, whole numbers beside a colour image too
    ids = _segmentation_ids(label, values, moving) if not label.is_rgb else None
    if ids is not None:
        shown = ", ".join(f"{value:g}" for value in ids[:8]) + (", ..." if ids.size > 8 else "")
        held = (f"only {ids.size} distinct whole numbers ({shown})" if ids.size <= SEGMENTATION_MAX_IDS
                else f"{ids.size} distinct whole numbers ({shown}) in flat patches")
        return [f"{_label_name(label)}: the label holds {held}, as a segmentation does, but the label metrics "
                f"compare the aligned image's intensities with its values; {CLEAN_MOVING_IMAGE}"]
    if mapping is None:
        return []
    moving_grey = grey_values(moving)
    if np.nanmin(moving_grey) == np.nanmax(moving_grey):
        # A constant moving image's window is a placeholder ([v, v + 1]): clipping by it says nothing
        # of the label's units, and the run already says the moving image is constant.
        return []
    values = grey_values(label_in_moving_grey_units(label, moving.is_rgb))
    sample = _strided_sample(values)  # a share, not every voxel: a clinical label has 10⁸ of them
    above_background = sample[sample > values.min()]
    if not above_background.size:
        return []  # a constant label: checked_label says so
    scaled = mapping.scaled(above_background)
    share = np.count_nonzero((scaled < 0) | (scaled > 1)) / scaled.size
    if share > CLIPPED_SHARE_WARNING:
        return [f"{_label_name(label)}: {100 * share:.0f} % of the label's voxels above its background lie outside "
                f"the moving image's intensity window [{mapping.lower:g}, {mapping.upper:g}] and are clipped to its "
                f"ends before the label metrics; the label must be in the moving image's units (a 16-bit label "
                f"beside an 8-bit moving image is not): {CLEAN_MOVING_IMAGE}"]
    label_bottom, label_top = _range_above_background(values)
    moving_bottom, moving_top = _range_above_background(moving_grey)
    if label_top - label_bottom >= SMALL_UNITS_SPAN_SHARE * (moving_top - moving_bottom):
        return []
    return [f"{_label_name(label)}: the label's values reach {label_top:.4g} from its background {label_bottom:.4g}, "
            f"the moving image's {moving_top:.4g} from {moving_bottom:.4g} (99th percentiles above the background): "
            f"the label seems to be in much smaller units than the moving image (a label rescaled to [0, 1], an "
            f"8-bit label beside a 16-bit moving image), and the moving image's intensity window "
            f"[{mapping.lower:g}, {mapping.upper:g}] makes it a faint image before the label metrics; "
            f"{CLEAN_MOVING_IMAGE}"]


def _range_above_background(values: np.ndarray) -> tuple[float, float]:
    """An image's background (its lowest value) and the 99th percentile of its values above it,
    from a sample: its range, robust to a few hot voxels."""
    sample = _strided_sample(values)
    sample = sample[np.isfinite(sample)]  # a layer's NaN: the engine fills them, with a warning
    if not sample.size:
        return 0.0, 0.0
    bottom = float(sample.min())
    above = sample[sample > bottom]
    return bottom, float(np.percentile(above, 99)) if above.size else bottom


def run_moving_mapping(result: FusionResult) -> IntensityMapping:
    """The intensity mapping ``result``'s run took the moving image through: the label's too."""
    return IntensityMapping.from_dict(result.provenance["intensity_mappings"]["moving"])


def _segmentation_ids(label: ImageVolume, values: np.ndarray, moving: ImageVolume) -> np.ndarray | None:
    """The values of ``label`` (``values``, its grey values) where they read as a segmentation's ids,
    else None: whole numbers, at most ``SEGMENTATION_MAX_IDS`` of them beside a moving image of more
    grey values, or more of them in flat patches (``SEGMENTATION_FLAT_SHARE``) beside a moving image
    that is not, on the label's grid (FreeSurfer's aseg holds ~45 ids, aparc+aseg ~110; a 4 mm PET
    label taken onto a 1 mm grid by nearest neighbour is as flat, and so is its moving image there).
    A sample decides first: an ordinary label shows fractions, or more values than a few and grey
    ramps between them, in a few of its voxels."""
    sample = _strided_sample(values)
    if not np.array_equal(sample, np.round(sample)):
        return None
    if np.unique(sample).size > SEGMENTATION_MAX_IDS and _flat_share(values) < SEGMENTATION_FLAT_SHARE:
        return None
    if not np.array_equal(values, np.round(values)):
        return None
    ids = np.unique(values)
    if ids.size < 2:
        return None
    moving_values = grey_values(moving)
    if ids.size > SEGMENTATION_MAX_IDS:
        if _flat_share(values) < SEGMENTATION_FLAT_SHARE:
            return None
        grey_moving = ImageVolume(moving_values, moving.geometry)
        if not grey_moving.on_grid_of(label):
            grey_moving = resample_to_reference(grey_moving, label, "nearest", fill_value=float(np.nanmin(moving_values)))
        return ids if _flat_share(grey_moving.array) < SEGMENTATION_FLAT_SHARE else None
    many_grey_values = (np.unique(_strided_sample(moving_values)).size > SEGMENTATION_MAX_IDS
                        or np.unique(moving_values).size > SEGMENTATION_MAX_IDS)
    return ids if many_grey_values else None


def _flat_share(values: np.ndarray) -> float:
    """The share of neighbouring voxels along rows (the last axis) that hold the same value, among
    those strictly between the image's lowest and highest values, over evenly strided whole rows
    (about ``SAMPLE_SIZE`` voxels). A segmentation's ids fill patches; a picture's grey values ramp,
    its background (the lowest) and a CT picture's saturated bone (the highest) left out."""
    rows = values.reshape(-1, values.shape[-1])
    rows = rows[:: max(1, rows.size // SAMPLE_SIZE)]
    inside = (rows > rows.min()) & (rows < rows.max())
    pairs = inside[:, :-1] & inside[:, 1:]
    count = np.count_nonzero(pairs)
    return np.count_nonzero(pairs & (rows[:, :-1] == rows[:, 1:])) / count if count else 0.0


def _strided_sample(values: np.ndarray) -> np.ndarray:
    """About ``SAMPLE_SIZE`` of ``values``' voxels, evenly strided (all of a small image)."""
    flat = values.ravel()
    return flat[:: max(1, flat.size // SAMPLE_SIZE)]


def _label_name(label: ImageVolume) -> str:
    """The label as its warnings name it: its file, said to be the label, where it has one."""
    return f"{label.source} (the label)" if label.source else "label"


def label_in_moving_grey_units(label: ImageVolume, moving_is_rgb: bool) -> ImageVolume:
    """``label`` in the grey units its moving image is scored in. A grey label beside a colour moving
    image is that image's luma in the colour's scale, held as the package holds colour
    (``io.readers.colour_in_unit_range``): 8-bit values divided by 255 (PIL's ``convert("L")`` of an
    RGB PET), 16-bit by 65535, floats in [0, 1] as they are, 8-bit values stored as floats divided by
    255; one of no colour scale (other integers, floats past 255) is kept, for
    :func:`label_units_warnings` to say where the luma's window clips it. Any other label as it is."""
    if label.is_rgb or not moving_is_rgb:
        return label
    if label.array.dtype == np.uint8:
        luma = label.array / float(np.iinfo(np.uint8).max)
    else:
        try:
            luma, _ = colour_in_unit_range(label.array)
        except InputError:
            return label
    return dataclasses.replace(label, array=np.asarray(luma, dtype=np.float32))


def label_on_grid(label: ImageVolume, grid: ImageVolume, mapping: IntensityMapping | None,
                  moving_is_rgb: bool) -> ImageVolume:
    """``label`` as it is scored on ``grid`` (the run's outputs'): in the moving image's grey units
    (:func:`label_in_moving_grey_units`), resampled where it lies on another grid. Where it does not
    reach it holds the value ``mapping`` (the moving image's) takes to 0, the bottom of its window (a
    CT's air), as the moving image reads there, padded after its normalisation: a 0 would read as
    water in a CT. ``mapping`` None (a colour label scored by its own luma) pads with 0."""
    label = label_in_moving_grey_units(label, moving_is_rgb)
    if label.on_grid_of(grid):
        return label
    background = 0.0 if mapping is None or label.is_rgb else mapping.lower
    return resample_to_reference(label, grid, fill_value=background)


def label_in_model_units(result: FusionResult, label: ImageVolume) -> np.ndarray:
    """``label`` on the run's output grid (the reference's, :func:`label_on_grid`), through the
    moving image's intensity mapping (luma for RGB): the [0, 1] units the model aligned the moving
    image in, and those of ``result.in_model_units("moving", result.aligned)``."""
    on_grid = label_on_grid(label, result.aligned, run_moving_mapping(result), result.aligned.is_rgb)
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
