"""Fusion fidelity maps: where the fused image shows structure its sources do not, or drops theirs.

All maps compare images on one grid, in the model's [0, 1] intensity window (2D or 3D), and
measure edges in-plane: within the plane of the two axes of finest voxel spacing
(:func:`in_plane_axes`), the plane a thick-slice series was acquired in, so that its thick slices do
not dominate through the gradient across them. Which array axes hold that plane depends on how the
volume is stored; the plane, and so every map, does not.

* **Edge strength** ``E``: the in-plane Gaussian gradient magnitude at ``EDGE_SCALE`` voxels,
  scaled by √(2π)·σ so that a clean step edge of height h reads h at the edge. Every map below
  is therefore in *step-height units*: the fraction of the [0, 1] window that an edge of that
  strength spans (0.1 = an edge a tenth of the window high).
* **Invented structure** = (E_fused − max(E_reference, E_moving))⁺: edge strength in the fused
  image beyond the stronger of the two aligned sources. A fusion that blends the sources with any
  constant weights scores 0 (the gradient of a convex blend is never longer than the longer
  source gradient), so what remains is structure that came from neither: a pasted blob, an edge
  sharpened past both inputs, a seam where the blending weight jumps.
* **Lost structure** = max over sources S of (E_S − 2·E_fused)⁺: a source's edge the fused image
  does not keep at least half of. An average of the two sources keeps at least half of an edge in
  one source only or in both with the same polarity (brighter on the same side), and scores 0
  there; an edge both have with opposite polarity (bone bright on CT, dark on T1) the average
  partly cancels, and it is flagged, rightly: the fused image lost its contrast. A source edge gone
  from the fused image scores its full height. Artefacts the restoration removed (motion ghosts,
  metal streaks) show here too: read it with the restoration change.
* **Restoration change** = |restored − warped moving|, Gaussian-smoothed in-plane at
  ``CHANGE_SCALE`` voxels: how much the restoration altered the aligned moving image, in its [0, 1]
  window. Near 0 on a pair the classifier calls "none" (the restoration is gated by p_none).

Thresholds (why): an edge or a change of a tenth of the window (``STEP_THRESHOLD``) is one step of a
ten-level grey scale, about what a reader notices side by side. Edge maps also must exceed
``NOISE_FACTOR`` times the edge strength that the noisier source's noise alone produces
(``skimage.restoration.estimate_sigma``, wavelet MAD), so that a noisy low-dose input is not
flagged for its grain.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma

from napari_unifuse.metrics._inputs import check_images

EDGE_SCALE = 1.0  # voxels, in-plane
CHANGE_SCALE = 1.0  # voxels, in-plane
STEP_THRESHOLD = 0.1  # fraction of the [0, 1] window
NOISE_FACTOR = 3.0
# Voxel sizes within 1 % of each other are one size: the difference is header rounding (spacings
# read from affines and DICOM positions differ in their last digits), not a thicker slice.
SAME_SPACING_TOLERANCE = 0.01
# A fused edge must keep at least this fraction of a source's edge not to count as lost.
KEPT_FRACTION = 0.5

# The plane every map is measured in, as the definitions recorded with the maps name it.
_IN_PLANE = "in-plane (the two axes of finest voxel spacing)"
DEFINITIONS: dict[str, str] = {
    "invented": f"{_IN_PLANE} edge strength of the fused image beyond the stronger aligned source's "
                f"(Gaussian gradient magnitude, sigma {EDGE_SCALE} voxel, in step heights of the [0, 1] window)",
    "lost": f"a source's {_IN_PLANE} edge strength beyond 1/{KEPT_FRACTION:g} times the fused image's, "
            "the larger over the two sources (step heights of the [0, 1] window)",
    "restoration_change": "absolute difference between the restored and the warped moving image, "
                          f"Gaussian-smoothed {_IN_PLANE} (sigma {CHANGE_SCALE} voxel), [0, 1] window",
}


@dataclass(frozen=True)
class FidelityMaps:
    """The three maps (float32, the images' shape) and the value above which each flags a voxel."""

    invented: np.ndarray
    lost: np.ndarray
    restoration_change: np.ndarray
    thresholds: dict[str, float]


def in_plane_axes(spacing: Sequence[float] | None, ndim: int) -> tuple[int, ...]:
    """The array axes of the plane edges are measured in: every axis but the one of coarsest
    spacing (a thick-slice series' slice axis), both axes of a 2D image. Among axes of one spacing
    (``SAME_SPACING_TOLERANCE``) the first counts as the coarsest, so that an isotropic volume
    (``spacing`` None) and one stored with its thick slices along axis 0 are measured in axes 1 and 2."""
    sizes = [1.0] * ndim if spacing is None else [float(size) for size in spacing]
    if len(sizes) != ndim:
        raise ValueError(f"{len(sizes)} spacings given for a {ndim}D image")
    if ndim == 2:
        return (0, 1)
    coarsest = max(sizes)
    through = next(axis for axis, size in enumerate(sizes) if size >= coarsest * (1 - SAME_SPACING_TOLERANCE))
    return tuple(axis for axis in range(ndim) if axis != through)


def _in_plane_sigmas(ndim: int, axes: Sequence[int], sigma: float) -> tuple[float, ...]:
    return tuple(sigma if axis in axes else 0.0 for axis in range(ndim))


def edge_strength(image: np.ndarray, sigma: float = EDGE_SCALE,
                  spacing: Sequence[float] | None = None) -> np.ndarray:
    """In-plane Gaussian gradient magnitude in step-height units (a step of height h reads h), in
    the plane of :func:`in_plane_axes` for voxels of ``spacing`` (None: isotropic)."""
    image = np.asarray(image, dtype=np.float32)
    axes = in_plane_axes(spacing, image.ndim)
    sigmas = _in_plane_sigmas(image.ndim, axes, sigma)
    squared = np.zeros_like(image)
    for axis in axes:
        order = [0] * image.ndim
        order[axis] = 1
        squared += ndimage.gaussian_filter(image, sigmas, order=order, mode="nearest") ** 2
    return np.sqrt(squared) * np.float32(math.sqrt(2 * math.pi) * sigma)


def noise_edge_strength(image: np.ndarray, sigma: float = EDGE_SCALE) -> float:
    """The RMS edge strength that white noise of ``image``'s estimated level gives: for noise of
    standard deviation s, each in-plane Gaussian derivative has variance s² / (8π σ⁴), so the
    gradient magnitude's RMS in step-height units is s / (√2 σ), whichever two axes the plane has
    (white noise is the same along every axis, and the wavelet estimate treats all axes alike)."""
    with warnings.catch_warnings():
        # An image with no finest-scale detail at all (constant, or piecewise constant on even
        # voxel boundaries) leaves estimate_sigma an empty median: it has no noise to speak of.
        warnings.simplefilter("ignore", RuntimeWarning)
        # A grey-scale image short along its last axis (a 3-voxel-wide slice) is not a colour image:
        # channel_axis=None says so, and skimage's guess otherwise would reach the user's console.
        warnings.filterwarnings("ignore", "image is size .* on the last axis", UserWarning)
        noise = float(estimate_sigma(np.asarray(image, dtype=np.float64), channel_axis=None))
    return noise / (math.sqrt(2.0) * sigma) if math.isfinite(noise) else 0.0


def edge_threshold(sources: Sequence[np.ndarray]) -> float:
    """``STEP_THRESHOLD``, raised to ``NOISE_FACTOR`` times the noisier source's noise edge."""
    return max(STEP_THRESHOLD, NOISE_FACTOR * max(noise_edge_strength(source) for source in sources))


def invented_structure(fused: np.ndarray, sources: Sequence[np.ndarray],
                       spacing: Sequence[float] | None = None) -> np.ndarray:
    """(E_fused − max_S E_S)⁺, see the module docstring."""
    strongest = np.maximum.reduce([edge_strength(source, spacing=spacing) for source in sources])
    return np.maximum(edge_strength(fused, spacing=spacing) - strongest, 0.0)


def lost_structure(fused: np.ndarray, sources: Sequence[np.ndarray],
                   spacing: Sequence[float] | None = None) -> np.ndarray:
    """max_S (E_S − E_fused / KEPT_FRACTION)⁺, see the module docstring."""
    needed = edge_strength(fused, spacing=spacing) / KEPT_FRACTION
    return np.maximum.reduce([np.maximum(edge_strength(source, spacing=spacing) - needed, 0.0)
                              for source in sources])


def restoration_change(restored: np.ndarray, warped_moving: np.ndarray, sigma: float = CHANGE_SCALE,
                       spacing: Sequence[float] | None = None) -> np.ndarray:
    """|restored − warped moving|, smoothed in-plane, see the module docstring."""
    difference = np.abs(np.asarray(restored, dtype=np.float32) - np.asarray(warped_moving, dtype=np.float32))
    sigmas = _in_plane_sigmas(difference.ndim, in_plane_axes(spacing, difference.ndim), sigma)
    return ndimage.gaussian_filter(difference, sigmas, mode="nearest")


def fidelity_maps(reference: np.ndarray, warped_moving: np.ndarray, restored: np.ndarray,
                  fused: np.ndarray, spacing: Sequence[float] | None = None) -> FidelityMaps:
    """The three maps and their thresholds for one fused pair, all in the [0, 1] window on the
    reference grid of voxel ``spacing`` (None: isotropic), which decides the plane edges are
    measured in: ``warped_moving`` is the moving input aligned by the field kept (before the
    restoration), ``restored`` the restored moving image the fused image was made from."""
    # float32: every map is computed in it, and four float64 copies of a 512×512×200 volume are 1.7 GB.
    reference, warped_moving, restored, fused = check_images(
        ("reference", "warped moving", "restored", "fused"), reference, warped_moving, restored, fused,
        dtype=np.float32)
    sources = (reference, warped_moving)
    threshold = edge_threshold(sources)
    return FidelityMaps(
        invented=invented_structure(fused, sources, spacing).astype(np.float32),
        lost=lost_structure(fused, sources, spacing).astype(np.float32),
        restoration_change=restoration_change(restored, warped_moving, spacing=spacing).astype(np.float32),
        thresholds={"invented": threshold, "lost": threshold, "restoration_change": STEP_THRESHOLD},
    )
