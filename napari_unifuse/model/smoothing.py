"""Gaussian smoothing of (B, C, *spatial) tensors, shared by the matching and its MI refinement."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, *spatial) along every spatial axis, edges replicated."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    taps = torch.exp(-0.5 * (taps / sigma) ** 2)
    taps = taps / taps.sum()
    spatial_dims = x.dim() - 2
    channels = x.shape[1]
    conv = (F.conv2d, F.conv3d)[spatial_dims - 2]
    for axis in range(spatial_dims):
        shape = [1] * spatial_dims
        shape[axis] = taps.numel()
        kernel = taps.view(1, 1, *shape).repeat(channels, 1, *[1] * spatial_dims)
        padding = [0, 0] * spatial_dims
        padding[2 * (spatial_dims - 1 - axis)] = padding[2 * (spatial_dims - 1 - axis) + 1] = radius
        x = conv(F.pad(x, padding, mode="replicate"), kernel, groups=channels)
    return x
