"""Mutual-information refinement of the structural matching: instance optimisation, in torch.

Block matching of MIND descriptors (``matching``) finds CT's bone and MRI's edges reliably, but a
blurry, noisy PET/SPECT image has few edges to match, and there it left 17 px of end-point error on
the Harvard validation pairs. What PET/SPECT and MRI do share is their intensity statistics: the
classical answer is to maximise mutual information (Mattes MI in SimpleITK/ANTs), and learning
based registration adds the same instance optimisation after its discrete step (ConvexAdam,
Siebert et al. 2021). This module does that, differentiably, for 2-D and 3-D:

* ``soft_mutual_information``: MI of a joint histogram with linear Parzen windows (a voxel's
  weight is split between its two nearest bins), so it has a gradient with respect to the moving
  intensities; over the reference's (dilated) foreground, fixed for every candidate so that the
  scores of different candidates compare;
* ``optimise_rigid``: rotation (one angle in 2-D, a rotation vector in 3-D) about the image centre
  and translation, composed after a starting field, by Adam on two resolution levels;
* ``optimise_deformable``: a displacement on a coarse control grid (linear interpolation between
  control points), added to a starting field, with a diffusion penalty on the control grid.

Everything is optimised on down-sampled images (at most ``_MAX_LEVEL_VOXELS`` voxels on the fine
level) so that it stays well under a second for a 256² image on two CPU cores. Nothing here
holds trained parameters; it runs with gradients enabled even inside ``torch.inference_mode``,
on copies of the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from napari_unifuse.model.smoothing import gaussian_blur
from napari_unifuse.model.warp import compose, identity_grid, warp

BINS = 32
# Intensity above which a voxel counts as showing something (images in [0, 1]).
FOREGROUND = 0.02
# Intensity standard deviation below which an image counts as flat.
_MIN_CONTRAST = 1e-3
# The fine level is the smallest power-of-two down-sampling (at least 2) with at most this many
# voxels; the coarse level is twice as coarse.
_MAX_LEVEL_VOXELS = 2 ** 15
_RIGID_ITERATIONS = (30, 20)  # coarse, fine
_RIGID_ANGLE_RATE = 0.01  # radians per Adam step
_RIGID_SHIFT_RATE = 0.25  # level voxels per Adam step
_DEFORMABLE_ITERATIONS = 40
_DEFORMABLE_RATE = 1.0  # voxels per Adam step
# Weight of the mean squared gradient of the control-grid displacement (voxels per voxel).
_DEFORMABLE_STIFFNESS = 10.0


def linear_bins(values: torch.Tensor, bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear Parzen windows of values (B, N) in [0, 1] over bin centres k / (bins − 1): each value
    lies between bins ``lower`` and ``lower + 1`` and gives them weights 1 − ``upper_weight`` and
    ``upper_weight`` (B, N each)."""
    position = values.clamp(0, 1) * (bins - 1)
    lower = position.detach().floor().clamp(max=bins - 2)
    return lower.long(), position - lower


def soft_mutual_information(reference: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                            moving: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """MI (nats) per pair of the joint linear-Parzen histogram of the reference (its
    ``linear_bins``) and the moving values (B, N) in [0, 1], over voxels weighted by ``mask`` (B, N).

    Each voxel spreads its weight over the 2×2 bins around it, so the histogram is built with four
    scatter-adds instead of an N × bins weight matrix, and differentiates with respect to the
    moving values.
    """
    reference_lower, reference_upper = reference
    moving_lower, moving_upper = linear_bins(moving, bins)
    joint = mask.new_zeros(mask.shape[0], bins * bins)
    for reference_offset, reference_weight in ((0, 1 - reference_upper), (1, reference_upper)):
        for moving_offset, moving_weight in ((0, 1 - moving_upper), (1, moving_upper)):
            index = (reference_lower + reference_offset) * bins + moving_lower + moving_offset
            joint = joint.scatter_add(1, index, mask * reference_weight * moving_weight)
    return joint_mutual_information(joint, bins)


def joint_mutual_information(joint: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """MI (nats) of each row of unnormalised joint histograms (R, bins²), reference bins major."""
    joint = joint.view(-1, bins, bins)
    joint = joint / joint.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    outer = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
    return (joint * torch.log((joint + 1e-10) / (outer + 1e-10))).sum(dim=(1, 2))


def rotation_matrices(rotation: torch.Tensor) -> torch.Tensor:
    """Rotations (B, ndim, ndim) from (B, 1) angles in 2-D or (B, 3) rotation vectors in 3-D
    (axis × angle, array-axis order): the exponential of the skew-symmetric generator."""
    batch, count = rotation.shape
    spatial_dims = {1: 2, 3: 3}[count]
    generator = rotation.new_zeros(batch, spatial_dims, spatial_dims)
    if spatial_dims == 2:
        generator[:, 0, 1], generator[:, 1, 0] = -rotation[:, 0], rotation[:, 0]
    else:
        x, y, z = rotation.unbind(1)
        generator = torch.stack([torch.stack([torch.zeros_like(x), -z, y], -1),
                                 torch.stack([z, torch.zeros_like(x), -x], -1),
                                 torch.stack([-y, x, torch.zeros_like(x)], -1)], 1)
    return torch.linalg.matrix_exp(generator)


class _Level:
    """One resolution level: the images pooled by ``factor`` and the voxel positions of the
    level's cells in full-resolution coordinates, so that every field is stated in full-resolution
    voxels and converted only where it is sampled."""

    def __init__(self, moving: torch.Tensor, reference: torch.Tensor, factor: int):
        self.factor = factor
        self.moving = _pool(moving, factor)
        pooled_reference = _pool(reference, factor)
        self.level_spatial = tuple(pooled_reference.shape[2:])
        mask = _max_pool(pooled_reference > FOREGROUND, 5)
        self.reference_bins = linear_bins(pooled_reference.flatten(1))
        self.mask = mask.flatten(1).to(reference.dtype)
        grid = identity_grid(self.level_spatial, reference.device, reference.dtype)
        self.positions = grid * factor + (factor - 1) / 2  # (ndim, *level) full-resolution voxels

    def pool_field(self, field: torch.Tensor) -> torch.Tensor:
        """A full-resolution displacement (B, ndim, *spatial) as level voxels on the level grid."""
        return _pool(field, self.factor) / self.factor

    def score(self, level_field: torch.Tensor) -> torch.Tensor:
        """MI of the reference with the moving image moved by a level-grid field (level voxels)."""
        return soft_mutual_information(self.reference_bins, self.mask, warp(self.moving, level_field).flatten(1))


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    return (F.avg_pool2d, F.avg_pool3d)[x.dim() - 4](x, factor, ceil_mode=True)


def _max_pool(mask: torch.Tensor, size: int) -> torch.Tensor:
    return (F.max_pool2d, F.max_pool3d)[mask.dim() - 4](mask.float(), size, stride=1, padding=size // 2) > 0


def level_factors(spatial: tuple[int, ...]) -> tuple[int, int]:
    """(coarse, fine) down-sampling factors for an image of this shape."""
    fine = 2
    while math.prod(math.ceil(size / fine) for size in spatial) > _MAX_LEVEL_VOXELS:
        fine *= 2
    return 2 * fine, fine


def rigid_displacement(rotation: torch.Tensor, shift: torch.Tensor, positions: torch.Tensor,
                       spatial: tuple[int, ...]) -> torch.Tensor:
    """u(p) = R (p − c) + c + t − p at ``positions`` (ndim, *grid), full-resolution voxels,
    c the centre of an image of shape ``spatial``: (B, ndim, *grid)."""
    spatial_dims = len(spatial)
    centre = torch.tensor([(size - 1) / 2 for size in spatial], dtype=positions.dtype,
                          device=positions.device).view(spatial_dims, 1)
    flat = positions.reshape(spatial_dims, -1) - centre
    moved = rotation_matrices(rotation) @ flat + shift[..., None]
    return (moved - flat).reshape(rotation.shape[0], spatial_dims, *positions.shape[1:])


def never_cancelled() -> None:
    """The default ``check_cancelled`` of the optimisations here and in the matching: a callable
    they call once per step, which stops the work by raising (the engine passes its Cancel's)."""


@contextmanager
def optimising():
    # The engine runs under inference_mode; the optimisation needs autograd on its own tensors.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def optimise_rigid(moving: torch.Tensor, reference: torch.Tensor, start: torch.Tensor,
                   check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
    """The displacement "``start``, then the rigid motion of highest soft MI" (B, ndim, *spatial),
    optimised from no extra motion on a coarse and a fine level."""
    spatial = tuple(reference.shape[2:])
    spatial_dims = len(spatial)
    with optimising():
        moving, reference, start = (x.detach().clone() for x in (moving, reference, start))
        rotation = moving.new_zeros(moving.shape[0], {2: 1, 3: 3}[spatial_dims], requires_grad=True)
        shift = moving.new_zeros(moving.shape[0], spatial_dims, requires_grad=True)
        coarse, fine = level_factors(spatial)
        for factor, iterations in zip((coarse, fine), _RIGID_ITERATIONS):
            level = _Level(gaussian_blur(moving, factor / 2), gaussian_blur(reference, factor / 2), factor)
            level_start = level.pool_field(start)
            optimiser = torch.optim.Adam([{"params": [rotation], "lr": _RIGID_ANGLE_RATE},
                                          {"params": [shift], "lr": _RIGID_SHIFT_RATE * factor}])
            for _ in range(iterations):
                check_cancelled()
                motion = rigid_displacement(rotation, shift, level.positions, spatial) / factor
                loss = -level.score(compose(level_start, motion)).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            full = identity_grid(spatial, moving.device, moving.dtype)
            return compose(start, rigid_displacement(rotation, shift, full, spatial)).detach()


def optimise_deformable(moving: torch.Tensor, reference: torch.Tensor, start: torch.Tensor,
                        spacing: int, check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
    """``start`` plus a smooth displacement on a control grid of ``spacing`` voxels that maximises
    the soft MI on the fine level, with a diffusion penalty (B, ndim, *spatial)."""
    spatial = tuple(reference.shape[2:])
    mode = ("bilinear", "trilinear")[len(spatial) - 2]
    with optimising():
        moving, reference, start = (x.detach().clone() for x in (moving, reference, start))
        factor = level_factors(spatial)[1]
        level = _Level(gaussian_blur(moving, factor / 2), gaussian_blur(reference, factor / 2), factor)
        level_start = level.pool_field(start)
        control = start.new_zeros(start.shape[0], start.shape[1],
                                  *[size // spacing + 1 for size in spatial], requires_grad=True)
        optimiser = torch.optim.Adam([control], lr=_DEFORMABLE_RATE)
        for _ in range(_DEFORMABLE_ITERATIONS):
            check_cancelled()
            dense = F.interpolate(control, size=level.level_spatial, mode=mode, align_corners=True)
            stiffness = sum(control.diff(dim=axis).pow(2).mean() for axis in range(2, control.dim()))
            loss = (-level.score(level_start + dense / factor).sum()
                    + _DEFORMABLE_STIFFNESS * stiffness / spacing ** 2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return (start + F.interpolate(control, size=spatial, mode=mode, align_corners=True)).detach()


def score_fields(moving: torch.Tensor, reference: torch.Tensor, fields: list[torch.Tensor]) -> torch.Tensor:
    """Soft MI on the fine level of each candidate field: (len(fields), B)."""
    factor = level_factors(tuple(reference.shape[2:]))[1]
    level = _Level(gaussian_blur(moving, factor / 2), gaussian_blur(reference, factor / 2), factor)
    return torch.stack([level.score(level.pool_field(field)) for field in fields])


def mi_refinement(moving: torch.Tensor, reference: torch.Tensor, structural: torch.Tensor,
                  rigid_starts: list[torch.Tensor], spacing: int,
                  check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
    """Of ``structural`` (the matching's estimate, kept as it is) and each of ``rigid_starts``
    refined by ``optimise_rigid``, the field of highest soft MI, then ``optimise_deformable``.

    One pair at a time: Adam with these step sizes amplifies rounding differences, and batched
    arithmetic rounds differently from a single pair's, so a batch would not give each pair the
    result it gets alone (measured: up to 2.6 px on a 64² phantom)."""
    return torch.cat([_refine_pair(moving[i:i + 1], reference[i:i + 1], structural[i:i + 1],
                                   [start[i:i + 1] for start in rigid_starts], spacing, check_cancelled)
                      for i in range(moving.shape[0])])


def _refine_pair(moving: torch.Tensor, reference: torch.Tensor, structural: torch.Tensor,
                 rigid_starts: list[torch.Tensor], spacing: int, check_cancelled: Callable[[], None]) -> torch.Tensor:
    # A flat image has zero MI for every motion, and Adam, which normalises the gradient, would
    # turn the rounding noise of that zero into steps.
    if moving.std() <= _MIN_CONTRAST or reference.std() <= _MIN_CONTRAST:
        return structural
    # All starts in one batch: one pass of autograd costs far less than one for each.
    count = len(rigid_starts)
    optimised = optimise_rigid(moving.expand(count, *moving.shape[1:]),
                               reference.expand(count, *reference.shape[1:]), torch.cat(rigid_starts),
                               check_cancelled)
    candidates = torch.cat([structural, optimised])
    best = int(score_fields(moving, reference, list(candidates.split(1))).argmax())
    return optimise_deformable(moving, reference, candidates[best:best + 1], spacing, check_cancelled)
