"""Dense instance optimisation on MIND descriptors: the Adam stage of ConvexAdam (Siebert, Hansen
and Heinrich 2021), in torch, for 2-D and 3-D.

The structural matching (``matching``) and its MI refinement leave residuals of a few voxels:
their local correction lives on a grid of 4-8 voxels and the deformable MI step on control points
32 voxels apart, coarser than the 2-4 voxel non-rigid residual of a pair that a scanner console
has already registered. ConvexAdam closes that gap with a dense displacement optimised by Adam
directly on MIND descriptors (modality-independent: they describe local self-similarity, not
intensity), smoothed by average pooling at every step and penalised for roughness. This is that
stage:

* MIND of both images (after ``start`` is applied to the moving one) on a level of at most
  ``_MAX_LEVEL_VOXELS`` voxels, down-sampled by the smallest integer factor of at least 2 that
  fits it (half resolution for a 256² image or a 128³ volume, a third for 160³);
* a dense correction on that level, smoothed by two 3-voxel box filters at every step (ConvexAdam's
  B-spline-like parametrisation), fitted by Adam to the squared descriptor difference plus a
  diffusion penalty, over the voxels where either image shows structure;
* the correction, up-sampled, composed after ``start``.

It is the classical bar a learned fine alignment (FA) must beat, an evaluation baseline
(``engine.classical``), and it holds no trained parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from napari_unifuse.model.matching import mind
from napari_unifuse.model.mi_refinement import never_cancelled, optimising
from napari_unifuse.model.smoothing import gaussian_blur
from napari_unifuse.model.warp import compose, warp

# The optimisation level: the smallest integer down-sampling (at least 2, as ConvexAdam's half
# resolution) with at most this many voxels (128² for 256²; 64³ for 128³, 54³ for 160³). A 2-4
# voxel residual is 1-2 level voxels at half resolution; on 4-voxel levels (the power-of-two budget
# of 2^16 this replaced) the 128³ phantom pairs kept 40-70 % more of it (bench/probe_dense_3d.py).
_MAX_LEVEL_VOXELS = 2 ** 18
# MIND neighbour distance and patch sigma on the level, in level voxels.
_MIND_DISTANCE = 1
_MIND_SIGMA = 1.0
_ITERATIONS = 60
_LEARNING_RATE = 0.5  # level voxels per Adam step
# Weight of the mean squared forward difference of the correction (level voxels per voxel); with
# descriptors in [0, 1] this keeps the correction smooth over a few voxels, as ConvexAdam's
# lambda of 1.25 over its grid does.
_STIFFNESS = 1.0
# A level thinner than this along an axis is too thin for the 3-voxel box filters and MIND's
# neighbourhoods (a volume of a few slices under a large in-plane grid): the start is kept.
_MIN_LEVEL_SIDE = 3
# Voxels whose MIND local variance is below this fraction of the image's mean count as flat.
_STRUCTURE_FRACTION = 0.05


def _level_shape(spatial: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(math.ceil(size / factor) for size in spatial)  # avg pooling with ceil_mode


def level_factor(spatial: tuple[int, ...]) -> int:
    factor = 2
    while math.prod(_level_shape(spatial, factor)) > _MAX_LEVEL_VOXELS:
        factor += 1
    return factor


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return (F.avg_pool2d, F.avg_pool3d)[x.dim() - 4](x, factor, ceil_mode=True)


def _box_smooth(field: torch.Tensor) -> torch.Tensor:
    pool = (F.avg_pool2d, F.avg_pool3d)[field.dim() - 4]
    return pool(pool(field, 3, stride=1, padding=1, count_include_pad=False), 3, stride=1, padding=1,
                count_include_pad=False)


def _describe(image: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    descriptor, variance = mind(_pool(gaussian_blur(image, factor / 2), factor), _MIND_DISTANCE, _MIND_SIGMA)
    return descriptor, variance


def dense_refinement(moving: torch.Tensor, reference: torch.Tensor, start: torch.Tensor,
                     check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
    """``start`` (B, ndim, *spatial) composed with a dense correction that aligns the MIND
    descriptors of ``moving`` warped by it to those of ``reference`` (both (B, 1, *spatial) in
    [0, 1]); the whole displacement, voxels. A pair with no structure, or too thin along an axis
    for a level (``_MIN_LEVEL_SIDE``), keeps ``start``. ``check_cancelled`` is called at every Adam
    step; what it raises stops the refinement."""
    spatial = tuple(reference.shape[2:])
    mode = ("bilinear", "trilinear")[len(spatial) - 2]
    factor = level_factor(spatial)
    if min(_level_shape(spatial, factor)) < _MIN_LEVEL_SIDE:
        return start
    with optimising():
        # No copies of the full-resolution inputs (1 GB at 512×512×200): autograd only ever saves the
        # level's descriptors, made here outside inference mode.
        moving, reference, start = (x.detach() for x in (moving, reference, start))
        moving_descriptor, moving_variance = _describe(warp(moving, start, padding_mode="border"), factor)
        reference_descriptor, reference_variance = _describe(reference, factor)
        structure = ((moving_variance > _STRUCTURE_FRACTION) | (reference_variance > _STRUCTURE_FRACTION)).to(
            moving.dtype)
        if not bool(structure.flatten(1).sum(1).gt(0).all()):
            return start
        correction = moving.new_zeros(moving.shape[0], len(spatial), *reference_descriptor.shape[2:],
                                      requires_grad=True)
        optimiser = torch.optim.Adam([correction], lr=_LEARNING_RATE)
        weights = structure / structure.flatten(1).sum(1).view(-1, *[1] * (structure.dim() - 1))
        for _ in range(_ITERATIONS):
            check_cancelled()
            smooth = _box_smooth(correction)
            moved = warp(moving_descriptor, smooth, padding_mode="border")
            similarity = ((moved - reference_descriptor) ** 2).mean(dim=1, keepdim=True)
            roughness = sum(smooth.diff(dim=axis).pow(2).mean() for axis in range(2, smooth.dim()))
            loss = (similarity * weights).sum() + _STIFFNESS * roughness
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            dense = F.interpolate(_box_smooth(correction), size=spatial, mode=mode, align_corners=False).mul_(factor)
            return compose(start, dense).detach()
