"""Field composition of Bidirectional Stepwise Feature Alignment (BSAFusion, AAAI 2025, Eq. 5-7).

BSFA moves the moving image's features forward (FRL) and the reference's features backward (RRL)
in K steps each, one per pyramid level, until they meet at an intermediate position. Step ``i``
predicts a field ``φ^i`` on its own level (``2^(K-i)`` times coarser than the image), in voxels of
that level. Everything here uses the package's convention (``model.warp``): sampling an image at
``x + u(x)`` moves it by ``u``.

* :func:`to_full_resolution` takes a step field to image voxels (upsample, scale by the factor).
* :func:`compose_steps` accumulates the steps. The paper sums them (Eq. 7, "path independence of
  vector displacement"), which is exact for translations and first-order otherwise; the features
  were in fact warped one step after the other, so we compose them exactly (``model.warp.compose``):
  for translations both agree (tests check this).
* :func:`bidirectional_field`: with the moving features sampled at ``x + Ψ(x)`` and the
  reference's at ``x + Ρ(x)`` aligned with each other, the field that aligns the moving image to
  the reference grid is Ψ after the inverse of Ρ. The paper writes φ_A − φ_B (again exact for
  translations); we invert Ρ by fixed-point iteration and compose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_unifuse.model.warp import compose, warp


def to_full_resolution(field: torch.Tensor, factor: int) -> torch.Tensor:
    """A (B, 2, h, w) field in voxels of a level ``factor`` times coarser -> (B, 2, h·f, w·f) in
    image voxels. Bilinear upsampling with half-pixel centres keeps a level voxel's centre where
    its ``factor``² image voxels' centres average, so a constant field stays exactly constant."""
    if factor == 1:
        return field
    return factor * F.interpolate(field, scale_factor=factor, mode="bilinear", align_corners=False)


def to_level(field: torch.Tensor, factor: int) -> torch.Tensor:
    """Image-voxel field -> a level ``factor`` times coarser (area average, voxels of the level)."""
    if factor == 1:
        return field
    return F.avg_pool2d(field, factor) / factor


def compose_steps(steps: list[torch.Tensor]) -> torch.Tensor:
    """The whole displacement of warping by ``steps[0]``, then the result by ``steps[1]``, …

    ``steps`` are image-voxel fields of one shape; the k-th was found on an image already moved by
    the ones before it, so the result samples the original at x + s_k(x) + s_{k-1}(x + s_k(x)) + …
    """
    total = steps[0]
    for step in steps[1:]:
        total = compose(total, step)
    return total


def invert_field(field: torch.Tensor, iterations: int) -> torch.Tensor:
    """``v`` with ``y + v(y) = x`` where ``x + field(x) = y``: the fixed point of
    ``v = −field(y + v(y))``, reached by iteration (a contraction while |∇field| < 1, which the
    smoothness loss keeps). Zero iterations give the paper's first-order −field."""
    inverse = -field
    for _ in range(iterations):
        inverse = -warp(field, inverse, padding_mode="border")
    return inverse


def bidirectional_field(forward: torch.Tensor, reverse: torch.Tensor, iterations: int) -> torch.Tensor:
    """The field aligning the moving image to the reference from the moving side's accumulated
    field ``forward`` (Ψ) and the reference side's ``reverse`` (Ρ): Ψ after Ρ⁻¹."""
    return compose(forward, invert_field(reverse, iterations))
