"""Alignment uncertainty: how much the displacement moves when the input is nudged.

The alignment's local stage is run again on a few perturbed copies of the moving image, each
shifted by a known amount along an in-plane axis (one of the two axes of finest voxel spacing,
``metrics.fidelity.in_plane_axes``, whichever array axes the volume stores them in) and given a
little intensity jitter (gain and noise, as a rescan would differ). A shift ``s`` of the content
(``moving_k(x) = moving(x + s)``) makes ``u − s`` the right answer for the copy, so ``s`` is added
back to its estimate; what remains differs from the unperturbed estimate only where the images do
not pin the alignment down. The per-voxel spread (sample standard deviation over the unperturbed
and the perturbed estimates, the vector's length in mm with the reference spacing) is the map; its
flag threshold is one voxel (:func:`uncertainty_threshold_mm`).

Which aligner: :func:`matching_estimator`, the structural matching's local stage
(``model.matching.local_matching``: MIND block matching at half the matching step, smoothed with
its confidence) started from the field the engine kept. Where the images have structure it follows
the shift; in a flat region nothing tells it where to go, its confidence is low and its estimate
stays where the start put it, so the copies disagree there by the shift's length. The block
matching resolves offsets on a grid of half the matching step, so the shifts are that long
(``matching_shift_voxels``: 2 voxels for both bundled checkpoints) and along the array axes, which
it can represent exactly: a structured region then reads about 0, a blind one the shift. A
sub-voxel shift fell between its offsets and read about the same everywhere. Measured on the
bundled samples: the network's field, given the same copies after the unperturbed matching, did
not follow a sub-voxel shift anywhere (a uniform spread equal to the shift), and re-running the
whole matching costs 2-5 s a pass on the 3D sample, so neither fits the interactive budget as a
measure of precision; the local stage costs 0.1-0.5 s a pass (``bench/bench_quality_overhead.py``).

This measures the *precision* of the alignment, not its accuracy: a confidently wrong alignment
can still be precise (the guard's and the metrics' job), but an imprecise one cannot be trusted.
Shifts come in opposite pairs (``+s``, ``−s``) along the in-plane axes (in array order), then the
through-plane axis, so that a bias of the aligner towards one side does not shrink the spread. The
in-plane axes come from the reference's own spacing, not the matching level's: the level pools the
fine axes towards isotropic voxels, where the thick axis would no longer stand out.

A moving image covering only part of the reference grid: the passes get the reference as the
alignment estimates saw it, blanked where the moving image has no data (``engine.inference.within_field_of_view``),
so that they measure the spread of the problem whose field was kept. Against the whole reference
the copies' zeros met its tissue beyond the slab: on a half-coverage phantom the covered slices
beside the edge read up to 1.8 times the spread they read against the blanked reference, and three
of them were flagged. Where the moving image has no data both images are blank: the map there
reads the aligner's blindness and what its smoothing carries in from the covered part, no
measurement of the moving image's alignment (those slices are ``outside_moving``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.metrics.fidelity import in_plane_axes
from napari_unifuse.model.matching import local_matching, pyramid_factors, upsample_pooled
from napari_unifuse.model.warp import compose, warp

GAIN_JITTER = 0.03  # standard deviation of the multiplicative gain
NOISE_JITTER = 0.01  # standard deviation of added noise, fraction of the [0, 1] window
DEFAULT_PASSES = 4  # ± along each in-plane axis
_SEED = 0  # the intensity jitter's

# The structural matching's smoothing of its local offsets (model.matching.structural_matching).
_SMOOTHING_CELLS = 2.0

# A field estimator: the moving image (1, 1, *spatial) in [0, 1] -> its field (ndim, *spatial),
# voxels, for the reference the caller holds.
FieldEstimator = Callable[[torch.Tensor], np.ndarray]

DEFINITION = ("sample standard deviation (vector length, mm) of the structural matching's local estimate, "
              "started from the kept field, over the moving image and copies of it shifted by ± half a matching "
              "step along the two in-plane axes (those of finest voxel spacing; shift added back) with "
              f"{GAIN_JITTER:.0%} gain and {NOISE_JITTER:.0%} noise jitter; flagged above one voxel (mean spacing, "
              "mm) of the grid the passes run on, the structural matching's pyramid level: it pools the fine axes "
              "of anisotropic voxels by powers of two towards the coarsest spacing (0.5 × 0.5 × 4 mm voxels run at "
              "4 × 4 × 4 mm) and a volume beyond about 96³ voxels further, so the threshold can span several of "
              "the image's own voxels")


def matching_estimator(reference: torch.Tensor, start: torch.Tensor, step: int) -> FieldEstimator:
    """The structural matching's local stage against ``reference`` (1, 1, *spatial), started from
    the field ``start`` (1, ndim, *spatial): block matching of the moved image on half a ``step``
    grid, composed with ``start``."""

    def estimate(moving: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            moved = warp(moving, start, padding_mode="border")
            return compose(start, local_matching(moved, reference, step, _SMOOTHING_CELLS))[0].numpy()

    return estimate


def matching_shift_voxels(step: int) -> float:
    """The shift length the matching's local stage represents exactly: one cell of its grid."""
    return float(max(1, step // 2))


def perturbation_shifts(passes: int, ndim: int, length: float, in_plane: Sequence[int]) -> list[np.ndarray]:
    """``passes`` shift vectors (voxels, array-axis order) of ``length``: +/- along each axis of
    ``in_plane`` in turn, then along the through-plane axis (3D), then round again."""
    axes = [*in_plane, *(axis for axis in range(ndim) if axis not in in_plane)]
    shifts = []
    for index in range(passes):
        shift = np.zeros(ndim)
        shift[axes[(index // 2) % ndim]] = length if index % 2 == 0 else -length
        shifts.append(shift)
    return shifts


def perturbed_copy(moving: torch.Tensor, shift: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """``moving`` (1, 1, *spatial) sampled at x + ``shift`` with gain and noise jitter, in [0, 1]."""
    spatial = moving.shape[2:]
    field = torch.tensor(shift, dtype=moving.dtype).view(1, -1, *[1] * len(spatial)).expand(1, -1, *spatial)
    field = field.contiguous()
    shifted = warp(moving, field, padding_mode="border")
    gain = 1.0 + GAIN_JITTER * rng.normal()
    noise = torch.from_numpy(rng.normal(0.0, NOISE_JITTER, size=tuple(spatial)).astype(np.float32))
    return (shifted * gain + noise).clamp(0.0, 1.0)


def displacement_spread_mm(fields: Sequence[np.ndarray], spacing: Sequence[float]) -> np.ndarray:
    """Per-voxel standard deviation of the fields (each (ndim, *spatial), voxels) as a vector
    length in mm: sqrt(Σ_axis var(u_axis · spacing_axis)). Sample variance (n − 1)."""
    stacked = np.stack([np.asarray(field, dtype=np.float64) for field in fields])
    scale = np.asarray(spacing, dtype=np.float64).reshape(1, -1, *[1] * (stacked.ndim - 2))
    variance = (stacked * scale).var(axis=0, ddof=1).sum(axis=0)
    return np.sqrt(variance).astype(np.float32)


def alignment_uncertainty(
    moving: torch.Tensor,
    estimate: FieldEstimator,
    spacing: Sequence[float],
    *,
    shift_voxels: float,
    passes: int = DEFAULT_PASSES,
    in_plane: Sequence[int] | None = None,
    cancel: CancelToken | None = None,
    seed: int = _SEED,
) -> np.ndarray:
    """The spread map (mm, ``moving``'s spatial shape) of ``estimate`` over ``moving``
    (1, 1, *spatial) and ``passes`` copies of it shifted by ``shift_voxels`` (``passes`` + 1 calls),
    first along the ``in_plane`` axes (default: those of ``spacing``, ``in_plane_axes``)."""
    if passes < 1:
        raise ValueError(f"alignment uncertainty needs at least one perturbed pass, got {passes}")
    ndim = moving.dim() - 2
    axes = in_plane_axes(spacing, ndim) if in_plane is None else tuple(in_plane)
    rng = np.random.default_rng(seed)
    fields = [estimate(moving)]
    for shift in perturbation_shifts(passes, ndim, shift_voxels, axes):
        if cancel is not None:
            cancel.raise_if_cancelled()
        estimated = estimate(perturbed_copy(moving, shift, rng))
        fields.append(estimated + shift.reshape(-1, *[1] * (estimated.ndim - 1)))
    return displacement_spread_mm(fields, spacing)


def uncertainty_threshold_mm(spacing: Sequence[float]) -> float:
    """The flag threshold of the uncertainty map: one voxel (the mean spacing) in mm. A structured
    region reads about 0 and one where the aligner is blind reads the shift (2 voxels with the
    bundled checkpoints); beyond one voxel the alignment is not determined to the image's own
    resolution."""
    return float(math.fsum(spacing) / len(spacing))


def uncertainty_on_matching_level(
    reference: torch.Tensor,
    moving: torch.Tensor,
    start: torch.Tensor,
    spacing: Sequence[float],
    step: int,
    *,
    passes: int = DEFAULT_PASSES,
    cancel: CancelToken | None = None,
) -> tuple[np.ndarray, float]:
    """The uncertainty map of the matching's local stage (``matching_estimator``, started from
    ``start`` (1, ndim, *spatial)) for ``moving`` against ``reference`` (1, 1, *spatial; as the
    alignment saw it, blanked where the moving image has no data, module docstring), measured on
    the level of the image pyramid the structural matching itself runs on
    (``model.matching.pyramid_factors``: the fine axes of anisotropic voxels pooled towards the
    coarsest spacing, a volume beyond about 96³ voxels pooled further), then brought back to the
    full grid; and its flag threshold, one voxel of that level (mm). At a
    clinical 176 × 216 × 180 the full-grid passes took as long as the network. The shifts go along
    the in-plane axes of ``spacing`` (the full grid's), see the module docstring."""
    spatial = tuple(reference.shape[2:])
    in_plane = in_plane_axes(spacing, len(spatial))
    factors = pyramid_factors(spatial, tuple(spacing))
    level_spacing = tuple(float(size) * factor for size, factor in zip(spacing, factors))
    if any(factor > 1 for factor in factors):
        pool = (F.avg_pool2d, F.avg_pool3d)[len(spatial) - 2]
        scale = torch.tensor(factors, dtype=start.dtype).view(1, -1, *[1] * len(spatial))
        reference, moving = (pool(x, factors, ceil_mode=True) for x in (reference, moving))
        start = pool(start, factors, ceil_mode=True) / scale
    spread = alignment_uncertainty(moving, matching_estimator(reference, start, step), level_spacing,
                                   shift_voxels=matching_shift_voxels(step), passes=passes, in_plane=in_plane,
                                   cancel=cancel)
    if spread.shape != spatial:
        spread = upsample_pooled(torch.from_numpy(spread)[None, None], factors, spatial)[0, 0].numpy()
    return spread, uncertainty_threshold_mm(level_spacing)
