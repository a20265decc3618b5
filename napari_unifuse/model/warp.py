"""Spatial-transformer warp (Jaderberg et al. 2015) in the project's displacement convention.

``warp(image, u)[x] = image[x + u(x)]`` with ``u`` in voxels and its components in array-axis
order ((y, x) or (z, y, x)), linear interpolation between voxel centres — the same as
``scipy.ndimage.map_coordinates(image, x + u, order=1, mode="grid-constant")`` for the default
zero padding (tests check this). ``data.misalign.warp_array`` is the numpy counterpart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_unifuse.errors import InputError


def identity_grid(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates (ndim, *shape) of every voxel, array-axis order."""
    axes = [torch.arange(size, device=device, dtype=dtype) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, *spatial) at ``x + displacement(x)``.

    ``displacement`` is (B, ndim, *spatial), voxels, array-axis order. ``mode`` is "bilinear"
    (linear in every axis, also in 3-D) or "nearest"; ``padding_mode`` as in ``grid_sample``.
    """
    spatial = tuple(image.shape[2:])
    ndim = len(spatial)
    expected = (image.shape[0], ndim, *spatial)
    if ndim not in (2, 3) or tuple(displacement.shape) != expected:
        raise InputError(f"displacement must have shape {expected} for an image of shape "
                         f"{tuple(image.shape)}, got {tuple(displacement.shape)}", "warp")
    # x + u(x), then 2 (x + u) / extent - 1, in place: a 3-D field is large (0.6 GB at 512×512×200)
    # and each temporary of the plain expression was one more. The same operations in the same
    # order, so the same bits; none of them needs its input for the backward pass.
    positions = displacement.clone()
    for axis, size in enumerate(spatial):
        positions[:, axis] += torch.arange(size, device=image.device, dtype=displacement.dtype).view(
            *(size if other == axis else 1 for other in range(ndim)))
    # grid_sample with align_corners=True maps -1 / +1 to the centres of the first / last voxel.
    extent = torch.tensor([max(size - 1, 1) for size in spatial], device=image.device,
                          dtype=displacement.dtype).view(1, ndim, *([1] * ndim))
    positions.mul_(2.0).div_(extent).sub_(1.0)
    # grid_sample wants the last axis as (x, y[, z]): the reverse of array-axis order.
    grid = positions.movedim(1, -1).flip(-1)
    del positions
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=True)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The displacement of "move by ``first``, then by ``second``": sampling the image at
    x + second(x) + first(x + second(x)), where ``first`` was found on the original moving image
    and ``second`` on the image already moved by ``first``."""
    return second + warp(first, second, padding_mode="border")
