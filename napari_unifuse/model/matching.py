"""Structural matching: a parameter-free, modality-independent first estimate of the field.

FA learns to register only slowly (``bench/probe_registration.py``: after 500 steps of L_reg alone
UniFuse-small had removed 19 % of the squared misalignment), and in the full loss mix it did not
start at all within 1 500 CPU steps. Learning-based registration methods that work across
modalities on little data do not learn the matching from scratch either: they start from
hand-made modality-independent descriptors (Heinrich's MIND in PDD-Net and ConvexAdam) and a
discrete search over displacements. This module is that start, in torch, for 2-D and 3-D:

1. MIND descriptors of both images (structure, not intensity: unchanged by I → a·I + b), on
   Gaussian-smoothed images so that low-dose noise and streaks do not dominate them;
2. a cost volume on a grid of ``step`` voxels: mean squared descriptor difference for every offset
   within ``search_range`` voxels, summed over a block of cells (block matching);
3. a robust rigid fit to the best offsets (iteratively reweighted least squares, Cauchy weights;
   cells with no structure in the reference or with a flat cost carry no weight), on grids of
   ``step`` and 2·``step`` voxels; of these two and no motion, the one of highest mutual
   information wins and is refined by a rigid search ±2 cells around it;
4. the same search, one level finer and ``step`` voxels around the rigid result, whose offsets are
   smoothed with confidence weights (normalised convolution): the non-rigid rest;
5. (``mutual_information_refinement``) the result of 1-4 competes with the rigid candidates of
   step 3, each refined by maximising mutual information; the winner gets a smooth deformable MI
   refinement (``mi_refinement``). Descriptors find CT's bone; PET/SPECT have too few edges for
   them and share only intensity statistics with MRI.

Measured on the 30 Harvard validation pairs (end-point error, px; identity / one grid / both grids
chosen by mutual information / with the MI refinement): CT 22.2 / 7.9 / 5.0 / 5.0, PET 20.3 / 18.0
/ 16.8 / 5.0, SPECT 24.1 / 21.0 / 17.4 / 9.9 (SimpleITK rigid + B-spline with Mattes MI: 11.6 /
15.1 / 13.4). Steps 1-4 take 0.2 s per 256² image on two CPU cores, step 5 about 0.7 s.

Image pyramid (our addition for clinical sizes). Steps 1-5 run on one level of an image pyramid:
the pair average-pooled by per-axis powers of two until it holds at most ``_LEVEL_MAX_VOXELS``
(about 96³), pooling first the axes of finest physical spacing (``spacing``, mm), so that a
thick-slice volume (5 mm slices, 1 mm in-plane) is pooled in-plane only and its level voxels come
out nearly isotropic, as the rigid fit assumes. The level's field is brought back to the full grid
(trilinear, scaled per axis, each level voxel at the centre of its pooling window also where the
factor does not divide the size: ``upsample_pooled``). At 160³ this is what takes the matching
from ~45 s to a few seconds; the network and the alignment guard refine and judge the estimate at
full resolution. An axis too thin for a block of cells (a one-slice volume, 32×32×2) is matched
in-plane, slice by slice, with no motion along it; a volume thin along two axes is not matched at
all.

FA then predicts a learned correction on top (``FeatureAlignment``), and sees the moving features
already moved by this estimate. Nothing here is differentiated by the network's training
(``no_grad``; the MI refinement optimises its own fields): it holds no parameters and is not
trained. It runs on one torch thread (``model.repeatable``): the MI refinement amplifies the
rounding of a sum, whose order depends on the thread count, into pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from napari_unifuse.model.correlation import local_distance
from napari_unifuse.model.mi_refinement import FOREGROUND, mi_refinement, never_cancelled
from napari_unifuse.model.repeatable import on_one_thread
from napari_unifuse.model.smoothing import gaussian_blur
from napari_unifuse.model.warp import compose, identity_grid, warp

# Robust-fit scale, in grid cells: matches farther than this from the fitted motion count less.
_CAUCHY_SCALE_CELLS = 1.0
_FIT_ITERATIONS = 8
# Summed match confidence below which a pair counts as having no structure to match.
_MIN_TOTAL_CONFIDENCE = 1e-3
# Block matching compares blocks of this many cells per axis.
_BLOCK = 3
# Control-point spacing (voxels) of the deformable MI refinement: about the scale of the synthetic
# elastic warps (B-spline control points 32-64 voxels apart on the Harvard and phantom images).
_MI_CONTROL_SPACING = 32
# The pyramid level the matching runs on holds at most this many voxels (about 96³).
_LEVEL_MAX_VOXELS = 96**3


def mind(image: torch.Tensor, distance: int, patch_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MIND (Heinrich et al. 2012) of (B, 1, *spatial) with the 2·ndim neighbours ``distance``
    voxels away: (descriptor (B, 2·ndim, *spatial), local variance V (B, 1, *spatial))."""
    spatial_dims = image.dim() - 2
    distances = []
    for axis in range(spatial_dims):
        for step in (-distance, distance):
            shifted = torch.roll(image, shifts=step, dims=2 + axis)
            distances.append(gaussian_blur((image - shifted) ** 2, patch_sigma))
    distances = torch.cat(distances, dim=1)
    variance = distances.mean(dim=1, keepdim=True)
    mean = variance.flatten(1).mean(dim=1).view(-1, *[1] * (spatial_dims + 1)).clamp_min(1e-12)
    clamped = torch.minimum(torch.maximum(variance, 1e-3 * mean), 1e3 * mean)
    descriptor = torch.exp(-distances / clamped)
    return descriptor / descriptor.amax(dim=1, keepdim=True), variance / mean


def _pool(x: torch.Tensor, step: int) -> torch.Tensor:
    return (F.avg_pool2d, F.avg_pool3d)[x.dim() - 4](x, step, ceil_mode=True)


def _offsets(spatial_dims: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """Window offsets (K, ndim) in the raster order of ``correlation.local_distance``."""
    axes = [torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)] * spatial_dims
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, spatial_dims)


def block_match(moving: torch.Tensor, reference: torch.Tensor, structure: torch.Tensor, step: int,
                radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best offsets of the moving descriptors for each cell of ``step`` voxels of the reference.

    Returns (offsets (B, ndim, *grid) in voxels, confidence (B, 1, *grid) ≥ 0). Confidence is the
    cell's reference structure times how much the best cost stands out of the window's mean cost.
    """
    spatial_dims = moving.dim() - 2
    # Offsets off the image cost +inf (no match there), also for every block that reaches them;
    # offset 0 always stays finite.
    cost = local_distance(_pool(reference, step), _pool(moving, step), radius)
    # Block matching: the cost of a cell is that of the block of cells around it.
    pool = (F.avg_pool2d, F.avg_pool3d)[spatial_dims - 2]
    cost = pool(cost, _BLOCK, stride=1, padding=_BLOCK // 2, count_include_pad=False)
    best_cost, best = cost.min(dim=1, keepdim=True)
    offsets = _offsets(spatial_dims, radius, cost)[best.squeeze(1)]  # (B, *grid, ndim)
    # Against the mean over the offsets that exist: a flat image matches everything equally well.
    finite = torch.isfinite(cost)
    mean_cost = torch.where(finite, cost, 0.0).sum(dim=1, keepdim=True) / finite.sum(dim=1, keepdim=True)
    distinctness = (1.0 - best_cost / mean_cost.clamp_min(1e-12)).clamp_min(0)
    confidence = distinctness * _pool(structure, step)
    return offsets.movedim(-1, 1) * step, confidence


def _cell_centres(grid: tuple[int, ...], step: int, like: torch.Tensor) -> torch.Tensor:
    return identity_grid(grid, like.device, like.dtype) * step + (step - 1) / 2


def fit_rigid(positions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Robust weighted rigid map positions → targets (rotation + translation, Kabsch).

    positions, targets (B, ndim, N), weights (B, N) -> matrices (B, ndim, ndim + 1) with
    ``targets ≈ A[:, :, :ndim] @ positions + A[:, :, ndim:]``. Residuals are reweighted with Cauchy
    weights of scale ``scale`` voxels. Rigid, not affine: where one image shows less than the
    other (a PET brain without the MRI's scalp), matches of the larger outline to the smaller one
    all point inwards, and an affine fit turns them into a spurious shrinkage (measured on
    Harvard PET-MRI: scale 0.55-0.75, end-point error 20 → 35 px).
    """
    robust = torch.ones_like(weights)
    for _ in range(_FIT_ITERATIONS):
        w = weights * robust + 1e-12
        w = (w / w.sum(-1, keepdim=True))[:, None]
        source_centre = (positions * w).sum(-1, keepdim=True)
        target_centre = (targets * w).sum(-1, keepdim=True)
        covariance = ((targets - target_centre) * w) @ (positions - source_centre).transpose(1, 2)
        # On the CPU: cuSOLVER's SVD of a few tiny matrices costs orders of magnitude more than the
        # CPU's (pytorch/pytorch#41306, #86234), and the fit waits for the result either way.
        u, _, vh = torch.linalg.svd(covariance.cpu())
        # A reflection is no motion of a head: flip the last axis where det(U Vᵀ) < 0.
        sign = torch.ones_like(u[:, 0])
        sign[:, -1] = torch.linalg.det(u @ vh).sign()
        rotation = (u @ torch.diag_embed(sign) @ vh).to(covariance.device)
        translation = target_centre - rotation @ source_centre
        residual = (rotation @ positions + translation - targets).norm(dim=1)
        robust = 1.0 / (1.0 + (residual / scale) ** 2)
    return torch.cat([rotation, translation], dim=2)


def affine_displacement(matrices: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """The displacement u(x) = A·x + t − x (B, ndim, *spatial) of affine maps (B, ndim, ndim + 1)."""
    spatial_dims = len(spatial)
    grid = identity_grid(spatial, matrices.device, matrices.dtype).reshape(spatial_dims, -1)
    mapped = matrices[:, :, :spatial_dims] @ grid + matrices[:, :, spatial_dims:]
    return (mapped - grid).reshape(matrices.shape[0], spatial_dims, *spatial)


def upsample_pooled(values: torch.Tensor, factors: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """``values`` (B, C, *pooled) on the grid that ceil-mode pooling by ``factors`` made of
    ``spatial``, linearly interpolated back to (B, C, *spatial), held at the border beyond the
    outermost pooled voxels. Pooled voxel i sits at factor·i + (factor − 1)/2, the centre of its
    window: align_corners=False with the scale ``factors`` maps it so. Where a factor does not divide
    the size the last window is cut short, so the whole windows are interpolated and then cut to the
    image; sized to the image directly the grid would stretch by size / pooled instead of the factor
    (at 200 voxels pooled by 16 into 13, 0.19 voxels off on average for a 5 % gradient)."""
    mode = ("bilinear", "trilinear")[values.dim() - 4]
    whole_windows = F.interpolate(values, scale_factor=[float(f) for f in factors], mode=mode,
                                  align_corners=False, recompute_scale_factor=False)
    return whole_windows[(..., *(slice(size) for size in spatial))]


def _describe(image: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MIND at the scale of a ``step``-voxel grid (patches and neighbours of about a quarter / half
    cell, on the image smoothed likewise) and the structure map: local variance relative to the
    image mean, in [0, 1] (flat background ~0)."""
    descriptor, variance = mind(gaussian_blur(image, step / 4), max(1, step // 2), step / 4)
    return descriptor, variance.clamp(max=4.0) / 4.0


def rigid_matching(moving: torch.Tensor, reference: torch.Tensor, step: int, radius: int) -> torch.Tensor:
    """Block matching on a ``step``-voxel grid within ±``radius`` cells, then the robust rigid fit:
    the rigid displacement (B, ndim, *spatial); zero for a pair with nothing to match."""
    spatial = tuple(reference.shape[2:])
    spatial_dims = len(spatial)
    reference_descriptor, structure = _describe(reference, step)
    offsets, confidence = block_match(_describe(moving, step)[0], reference_descriptor, structure, step,
                                      radius)
    grid = tuple(offsets.shape[2:])
    positions = _cell_centres(grid, step, offsets).reshape(1, spatial_dims, -1).expand(offsets.shape[0], -1, -1)
    matrices = fit_rigid(positions, positions + offsets.flatten(2), confidence.flatten(1),
                         scale=_CAUCHY_SCALE_CELLS * step)
    # A pair with no distinct match anywhere (a flat image) says nothing: stay where it is.
    informative = confidence.flatten(1).sum(-1) > _MIN_TOTAL_CONFIDENCE
    return affine_displacement(matrices, spatial) * informative.view(-1, *[1] * (spatial_dims + 1))


def local_matching(moving: torch.Tensor, reference: torch.Tensor, step: int,
                   smoothing_cells: float) -> torch.Tensor:
    """Block matching at half the step, ±1 step, whose offsets are smoothed with their confidence
    as weights (normalised convolution): a smooth non-rigid displacement (B, ndim, *spatial)."""
    fine_step = max(1, step // 2)
    reference_descriptor, structure = _describe(reference, step)
    local, confidence = block_match(_describe(moving, step)[0], reference_descriptor, structure,
                                    fine_step, 2)
    weighted = gaussian_blur(local * confidence, smoothing_cells)
    norm = gaussian_blur(confidence, smoothing_cells)
    # Where no cell nearby is confident the correction fades to zero instead of dividing noise.
    local = weighted / norm.clamp_min(1e-6) * (norm / (norm + 1e-3))
    spatial = tuple(reference.shape[2:])
    return upsample_pooled(local, (fine_step,) * len(spatial), spatial)


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Histogram mutual information (nats) of each pair of (B, 1, *spatial) images in [0, 1],
    over the voxels where either shows anything (shared background would dominate it)."""
    values = []
    for x, y in zip(a.clamp(0, 1).flatten(1), b.clamp(0, 1).flatten(1)):
        foreground = (x > FOREGROUND) | (y > FOREGROUND)
        ix = (x[foreground] * (bins - 1)).round().long()
        iy = (y[foreground] * (bins - 1)).round().long()
        joint = torch.bincount(ix * bins + iy, minlength=bins * bins).reshape(bins, bins).double()
        joint = joint / joint.sum().clamp_min(1)
        outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        seen = joint > 0
        values.append((joint[seen] * (joint[seen] / outer[seen]).log()).sum())
    return torch.stack(values).to(a.dtype)


def pyramid_factors(spatial: tuple[int, ...], spacing: tuple[float, ...] | None = None,
                    max_voxels: int | None = None, min_side: int = 2 * _BLOCK) -> tuple[int, ...]:
    """Per-axis power-of-two pooling factors of the level the matching runs on.

    An axis is pooled while its level spacing is at most half the coarsest one (towards isotropic
    level voxels), then, while the level holds more than ``max_voxels``, the axis of finest level
    spacing (the longest on ties) is pooled; an axis is never pooled below ``min_side`` voxels.
    """
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(spatial)
    max_voxels = _LEVEL_MAX_VOXELS if max_voxels is None else max_voxels
    factors = [1] * len(spatial)

    def poolable(axis: int) -> bool:
        return math.ceil(spatial[axis] / (2 * factors[axis])) >= min_side

    def level_spacing(axis: int) -> float:
        return spacing[axis] * factors[axis]

    while True:
        coarsest = max(level_spacing(axis) for axis in range(len(spatial)))
        finer = [axis for axis in range(len(spatial)) if poolable(axis) and 2 * level_spacing(axis) <= coarsest]
        if finer:
            factors[min(finer, key=level_spacing)] *= 2
            continue
        voxels = math.prod(math.ceil(size / factor) for size, factor in zip(spatial, factors))
        candidates = [axis for axis in range(len(spatial)) if poolable(axis)]
        if voxels <= max_voxels or not candidates:
            return tuple(factors)
        factors[min(candidates, key=lambda axis: (level_spacing(axis), -spatial[axis] / factors[axis]))] *= 2


@on_one_thread
@torch.no_grad()
def structural_matching(moving: torch.Tensor, reference: torch.Tensor, step: int, search_range: int,
                        smoothing_cells: float = 2.0, mutual_information_refinement: bool = True,
                        spacing: tuple[float, ...] | None = None,
                        check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
    """The displacement (B, ndim, *spatial), voxels, aligning ``moving`` to ``reference`` (both
    (B, 1, *spatial) in [0, 1]), found on a level of the image pyramid (see the module docstring;
    ``spacing``: the voxel size per array axis, mm, isotropic when None). ``search_range`` is in
    full-resolution voxels, ``step`` in level voxels. ``check_cancelled`` is called between the
    matching's steps and at every step of its MI refinement; what it raises stops the matching.

    Pair by pair: a batch's arithmetic rounds differently from one pair's (another kernel for
    another batch size), and the MI refinement amplifies that rounding into pixels (measured on
    32² phantoms: 4e-6 px apart after the structural steps, 0.38 px after the MI refinement), so
    each pair gets the field it gets alone."""
    return torch.cat([_match_pair(moving[i:i + 1], reference[i:i + 1], step, search_range, smoothing_cells,
                                  mutual_information_refinement, spacing, check_cancelled)
                      for i in range(moving.shape[0])])


def _match_pair(moving: torch.Tensor, reference: torch.Tensor, step: int, search_range: int,
                smoothing_cells: float, mutual_information_refinement: bool, spacing: tuple[float, ...] | None,
                check_cancelled: Callable[[], None]) -> torch.Tensor:
    spatial = tuple(reference.shape[2:])
    factors = pyramid_factors(spatial, spacing)
    if all(factor == 1 for factor in factors):
        return _match_level(moving, reference, step, search_range, smoothing_cells, mutual_information_refinement,
                            check_cancelled)
    pool = (F.avg_pool2d, F.avg_pool3d)[len(spatial) - 2]
    level_moving, level_reference = (pool(x, factors, ceil_mode=True) for x in (moving, reference))
    level_range = max(1, math.ceil(search_range / max(factors)))
    level = _match_level(level_moving, level_reference, step, level_range, smoothing_cells,
                         mutual_information_refinement, check_cancelled)
    scale = torch.tensor(factors, dtype=level.dtype, device=level.device).view(1, -1, *[1] * len(spatial))
    return upsample_pooled(level * scale, factors, spatial)


def _match_level(moving: torch.Tensor, reference: torch.Tensor, step: int, search_range: int,
                 smoothing_cells: float, mutual_information_refinement: bool,
                 check_cancelled: Callable[[], None]) -> torch.Tensor:
    """Steps 1-5 of the module docstring on one pyramid level; an axis too thin for a block of
    cells is matched in-plane, slice by slice (zero motion along it)."""
    spatial = tuple(reference.shape[2:])
    thin = [axis for axis, size in enumerate(spatial) if size < _BLOCK * step]
    if len(spatial) == 3 and len(thin) == 1:
        return _match_in_plane(moving, reference, thin[0], step, search_range, smoothing_cells,
                               mutual_information_refinement, check_cancelled)
    if thin:  # a 2-D image or a volume too small along two axes: nothing to match blocks on
        return moving.new_zeros(moving.shape[0], len(spatial), *spatial)
    return _match_blocks(moving, reference, step, search_range, smoothing_cells, mutual_information_refinement,
                         check_cancelled)


def _match_in_plane(moving: torch.Tensor, reference: torch.Tensor, axis: int, step: int, search_range: int,
                    smoothing_cells: float, mutual_information_refinement: bool,
                    check_cancelled: Callable[[], None]) -> torch.Tensor:
    """2-D matching of every slice across ``axis`` of a (B, 1, *spatial) volume, as one batch."""
    batch, spatial = moving.shape[0], tuple(moving.shape[2:])

    def slices(x: torch.Tensor) -> torch.Tensor:  # (B, 1, *spatial) -> (B·n, 1, *plane)
        x = x.movedim(2 + axis, 1)
        return x.reshape(-1, 1, *x.shape[3:])

    planar = _match_level(slices(moving), slices(reference), step, search_range, smoothing_cells,
                          mutual_information_refinement, check_cancelled)  # (B·n, 2, *plane)
    planar = planar.reshape(batch, spatial[axis], 2, *planar.shape[2:]).movedim(1, 2)  # (B, 2, n, *plane)
    field = torch.cat([planar[:, :axis], planar.new_zeros(batch, 1, *planar.shape[2:]), planar[:, axis:]], dim=1)
    return field.movedim(2, 2 + axis)


def _match_blocks(moving: torch.Tensor, reference: torch.Tensor, step: int, search_range: int,
                  smoothing_cells: float, mutual_information_refinement: bool,
                  check_cancelled: Callable[[], None]) -> torch.Tensor:
    """Rigid candidates on grids of ``step`` and 2·``step`` voxels (the coarse one sees the outline of a
    blurry PET/SPECT image better, the fine one the detail of CT) and no motion at all; each image
    keeps the candidate of highest mutual information, which is refined by a rigid search ±2 cells
    around it and then by the smooth local correction. With ``mutual_information_refinement``
    that result, and the rigid candidates each refined by maximising mutual information, compete
    on mutual information, and the winner gets a smooth deformable MI refinement on a control grid
    of ``_MI_CONTROL_SPACING`` voxels (``mi_refinement``).
    """
    spatial_dims = reference.dim() - 2
    candidates = [torch.zeros_like(moving).expand(-1, spatial_dims, *[-1] * spatial_dims)]
    # A grid needs a block of cells along every axis to match blocks on (``step`` always has one).
    for grid_step in (g for g in (step, 2 * step) if min(reference.shape[2:]) >= _BLOCK * g):
        check_cancelled()
        candidates.append(rigid_matching(moving, reference, grid_step, max(1, math.ceil(search_range / grid_step))))
    scores = torch.stack([mutual_information(warp(moving, field), reference) for field in candidates])
    best = scores.argmax(dim=0)
    chosen = torch.stack(candidates)[best, torch.arange(moving.shape[0])]
    check_cancelled()
    refined = compose(chosen, rigid_matching(warp(moving, chosen, padding_mode="border"), reference, step, 2))
    check_cancelled()
    local = local_matching(warp(moving, refined, padding_mode="border"), reference, step, smoothing_cells)
    structural = compose(refined, local)
    if not mutual_information_refinement:
        return structural
    check_cancelled()
    return mi_refinement(moving, reference, structural, candidates, spacing=_MI_CONTROL_SPACING,
                         check_cancelled=check_cancelled)
