"""Gaussian smoothing of (B, C, *spatial) tensors, shared by the matching and its MI refinement."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, *spatial) along every spatial axis, edges replicated.

    Each axis is a weighted sum of shifted views of the padded tensor rather than a depthwise
    convolution: CPU convolutions with a one-channel 1-D kernel run far below memory speed (a 160³
    volume: 0.29-0.33 s per blur against 0.04-0.06 s on one thread), and these blurs are most of
    what the matching, the class read-out and the dense refinement spend outside the network."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (taps / taps.sum()).tolist()
    spatial_dims = x.dim() - 2
    for axis in range(spatial_dims):
        padding = [0, 0] * spatial_dims
        padding[2 * (spatial_dims - 1 - axis)] = padding[2 * (spatial_dims - 1 - axis) + 1] = radius
        padded = F.pad(x, padding, mode="replicate")
        dim, size = 2 + axis, x.shape[2 + axis]
        blurred = padded.narrow(dim, 0, size) * weights[0]
        for shift, weight in enumerate(weights[1:], start=1):
            blurred.add_(padded.narrow(dim, shift, size), alpha=weight)
        x = blurred
    return x
