"""Input checks, the 0–255 grey scale the fusion references use, and per-slice averaging."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from napari_unifuse.errors import InputError

# Float inputs whose values all lie in [0, 1] (the model's range) are read as unit-scale images.
# A little float32 round-off above 1 must not flip an image to the 0–255 reading, nor round-off
# below 0 (an interpolation's −1e-9) refuse it; both are clipped.
UNIT_SCALE_TOLERANCE = 1e-5
# Float images whose maximum lies between 1 (+ tolerance) and this are neither clearly unit-scale nor
# clearly grey levels (a 0–255 image of anatomy reaches far higher): they are refused.
AMBIGUOUS_FLOAT_MAX = 2.0
# A 3D array whose last axis holds 3 or 4 values and whose other two axes both reach this is read as
# a colour image (y, x, RGB(A)), not as a (z, y, x) volume. A colour image is larger than this a side,
# and a volume of this many slices only 3 or 4 pixels wide fits no fusion metric's window (SSIM needs
# 7); a small volume with few slices, (5, 64, 3), and a 3-slice one, (3, 64, 64), stay volumes.
COLOUR_IMAGE_MIN_SIDE = 8


def check_images(names: tuple[str, ...], *arrays: object, min_side: int = 1,
                 dtype: type[np.floating] = np.float64, refuse_colour: bool = False) -> list[np.ndarray]:
    """Return the arrays as ``dtype`` after checking that they are finite, equally shaped 2D/3D images.

    ``min_side`` is the smallest in-plane (last two axes) size the calling metric can work with.
    ``refuse_colour``: refuse what looks like an RGB(A) image (see ``COLOUR_IMAGE_MIN_SIDE``), for
    metrics that read a 3D array as slices along axis 0 and would score an (y, x, 3) image as y
    slices 3 pixels wide. Callers that take volumes in any storage order (a thick-slice series
    stored slices last, (y, x, 3)) leave it off.
    ``dtype``: float32 for a metric that computes in float32 anyway. An array already of ``dtype``
    is returned as it is, not copied: metrics read their inputs and never write to them.
    """
    checked = []
    for name, array in zip(names, arrays, strict=True):
        data = np.asarray(array)
        if data.ndim not in (2, 3):
            raise InputError(f"expected a 2D (y, x) image or a 3D (z, y, x) volume, got shape {data.shape}", name)
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise InputError(f"expected numeric intensities, got dtype {data.dtype}", name)
        if data.size == 0:
            raise InputError("the image is empty", name)
        if refuse_colour and _looks_like_colour(data.shape):
            raise InputError(f"shape {data.shape} looks like a colour image (y, x, channels); the metrics take "
                             "grey images: pass its luma, napari_unifuse.data.color.rgb_to_ycbcr(image[..., :3])"
                             "[..., 0], or a volume as (z, y, x)", name)
        data = data.astype(dtype, copy=False)
        if not np.isfinite(data).all():
            raise InputError("the image contains NaN or infinite values", name)
        if min(data.shape[-2:]) < min_side:
            raise InputError(f"each slice must be at least {min_side}×{min_side} pixels, got {data.shape[-2:]}", name)
        checked.append(data)
    shapes = {data.shape for data in checked}
    if len(shapes) > 1:
        raise InputError(f"the images must have the same shape, got {', '.join(map(str, (a.shape for a in checked)))}")
    return checked


def _looks_like_colour(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) >= COLOUR_IMAGE_MIN_SIDE


def to_grey_scale(names: tuple[str, ...], *arrays: object, min_side: int = 1) -> list[np.ndarray]:
    """Bring images onto the 0–255 grey scale the references assume, each by its own type and values.

    Integer images are grey levels (0–255). Float images whose values all lie in [0, 1] (the model's
    range, up to float round-off either side, which is clipped) are multiplied by 255; floats that
    reach past ``AMBIGUOUS_FLOAT_MAX`` are taken as grey levels. They were judged together: one fused
    value of 1.00002 beside sources in [0, 1] read all three as 0–255, dark images, and MI fell from
    2.6 to 0.2 without a word; a uint8 source beside [0, 1] floats did the same. Floats just above 1
    (an interpolation overshoot?) could be either, and are refused, as are negative values beyond
    round-off and anything past 255 (CT in HU, 16-bit data): normalise first. Colour images are
    refused (``check_images``).
    """
    checked = check_images(names, *arrays, min_side=min_side, refuse_colour=True)
    on_grey_scale = []
    for name, original, data in zip(names, arrays, checked, strict=True):
        low, high = float(data.min()), float(data.max())
        unit_float = np.issubdtype(np.asarray(original).dtype, np.floating) and high <= 1.0 + UNIT_SCALE_TOLERANCE
        if low >= -UNIT_SCALE_TOLERANCE and unit_float:
            on_grey_scale.append(np.clip(data, 0.0, 1.0) * 255.0)
        elif low >= 0.0 and high <= 255.0 and not (unit_float or _ambiguous(original, high)):
            on_grey_scale.append(data)
        else:
            hint = (" (floats just above 1: clip them to [0, 1], or give grey levels 0–255)"
                    if low >= 0.0 and _ambiguous(original, high) else " (normalise the image first)")
            raise InputError(f"intensities span [{low:g}, {high:g}]; fusion metrics expect images in [0, 1] or on "
                             f"a 0–255 grey scale{hint}", name)
    return on_grey_scale


def _ambiguous(array: object, high: float) -> bool:
    """A float image whose maximum is a little above 1: a unit-scale image overshooting, or a
    nearly black 0–255 one; nothing says which."""
    return bool(np.issubdtype(np.asarray(array).dtype, np.floating) and 1.0 + UNIT_SCALE_TOLERANCE < high
                <= AMBIGUOUS_FLOAT_MAX)


# An average of two 8-bit images puts about a quarter of its pixels on half grey levels (k + 0.5),
# where rounding turns on float round-off: the same average in float32 or float64 went up or down
# there, EN 7.54 or 7.65. Values this close to a half level are on it, and round as exact halves
# do. It is above the round-off of [0, 1] float32 images (1e-5 grey levels) and of the engine's
# own average (5e-4), and far below a grey level.
HALF_LEVEL_TOLERANCE = 1e-3


def grey_levels(image: np.ndarray) -> np.ndarray:
    """Round a 0–255 image to uint8 grey levels, as the histogram-based references do (``np.round``:
    halves to even), values within ``HALF_LEVEL_TOLERANCE`` of a half level taken as that half."""
    half_level = np.floor(image) + 0.5
    on_half_level = np.abs(image - half_level) <= HALF_LEVEL_TOLERANCE
    return np.round(np.where(on_half_level, half_level, image)).astype(np.uint8)


def stretch_to_grey_levels(image: np.ndarray) -> np.ndarray:
    """Z. Liu's ``normalize1`` (metricChen.m, metricChenBlum.m): stretch to 0–255 and round.

    Each image is stretched on its own. A constant image becomes 0 (the MATLAB code keeps an
    all-zero image and divides by zero for any other constant one).
    """
    low, high = image.min(), image.max()
    if high == low:
        return np.zeros_like(image)
    return np.round((image - low) / (high - low) * 255)


def mean_over_axial_slices(metric_2d: Callable[..., float], *images: np.ndarray) -> float:
    """Apply a metric defined on 2D images to each axial slice (axis 0) of 3D volumes and average.

    2D images are passed straight through. The first image is the one scored (the fused image), the
    others its sources. Slices where every source is constant (empty background around the anatomy)
    carry no information and are skipped whatever the scored image holds there: the slices averaged
    must not depend on the method scored (background noise on them scored near-perfect, raising
    Q_vif from 0.43 to 0.95). Slices whose metric is undefined (NaN) are skipped too; the result is
    NaN only if no slice is left. A metric may return NaN only where its sources leave it undefined
    (Q_CB on a flat source), never for what the scored image holds (a blank fused slice scores what
    the metric gives an image without contrast), so that this skips the same slices for every
    method. A single image is its own source.
    """
    if images[0].ndim == 2:
        return float(metric_2d(*images))
    sources = images[1:] or images
    values = [
        metric_2d(*(image[z] for image in images))
        for z in range(images[0].shape[0])
        if not all(np.ptp(source[z]) == 0 for source in sources)
    ]
    defined = [value for value in values if not np.isnan(value)]
    return float(np.mean(defined)) if defined else float("nan")


FUSION_INPUT_NAMES = ("fused", "source_a", "source_b")

MetricValue = TypeVar("MetricValue")


def fusion_metric(min_side: int = 1) -> Callable[[Callable[..., MetricValue]], Callable[..., MetricValue]]:
    """Turn ``core(fused, a, b)`` on 0–255 float64 arrays into a public metric on raw inputs.

    The public function checks and scales its inputs (see ``to_grey_scale``); ``core`` stays
    reachable as ``.on_grey_scale`` so ``fusion_metrics`` scales once and calls every core.
    """

    def wrap(core: Callable[..., MetricValue]) -> Callable[..., MetricValue]:
        @functools.wraps(core)
        def metric(fused: object, source_a: object, source_b: object) -> MetricValue:
            return core(*to_grey_scale(FUSION_INPUT_NAMES, fused, source_a, source_b, min_side=min_side))

        metric.on_grey_scale = core  # type: ignore[attr-defined]
        metric.min_side = min_side  # type: ignore[attr-defined]
        return metric

    return wrap
