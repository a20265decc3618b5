"""Local correlation (cost volume) between two feature maps, dimension-generic.

``local_correlation(a, b, r)[:, k, x] = <â(x), b̂(x + d_k)>`` for every offset ``d_k`` in the
window [-r, r]^ndim (raster order, last axis fastest), with â, b̂ the feature vectors normalised
to unit length over channels, and zero where ``x + d_k`` falls outside ``b``. This is the matching
signal of flow and registration networks (FlowNet's correlation layer, PWC-Net's cost volume): the
channel index of the best match *is* the displacement, which a convolution can read off directly.

:func:`correlation_pyramid` widens the search without a larger window: level ``l`` correlates the
maps average-pooled by 2^l, so the same radius reaches 2^l times farther at 2^l times coarser steps.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def window_size(spatial_dims: int, radius: int, levels: int = 1) -> int:
    """Output channels of a radius-``radius`` window (per pyramid level)."""
    return levels * (2 * radius + 1) ** spatial_dims


def _window_map(a: torch.Tensor, b: torch.Tensor, radius: int, compare, outside: float) -> torch.Tensor:
    """``compare(a(x), b(x + d_k))`` (a channel reduction) for every window offset d_k:
    (B, (2r+1)^ndim, *spatial), ``outside`` where x + d_k falls outside ``b``."""
    spatial = a.shape[2:]
    pad = [radius] * (2 * len(spatial))
    padded = F.pad(b, pad)
    inside = F.pad(torch.ones_like(b[:, :1]), pad)
    maps = []
    for start in itertools.product(range(2 * radius + 1), repeat=len(spatial)):
        window = (..., *(slice(s, s + size) for s, size in zip(start, spatial, strict=True)))
        valid = inside[window][:, 0] > 0
        maps.append(torch.where(valid, compare(a, padded[window]), outside))
    return torch.stack(maps, dim=1)


def local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, *spatial) × 2 -> (B, (2r+1)^ndim, *spatial) cosine similarities."""
    return _window_map(F.normalize(a, dim=1), F.normalize(b, dim=1), radius,
                       lambda x, y: (x * y).sum(dim=1), outside=0.0)


def local_distance(a: torch.Tensor, b: torch.Tensor, radius: int,
                   outside: float = float("inf")) -> torch.Tensor:
    """(B, C, *spatial) × 2 -> (B, (2r+1)^ndim, *spatial) mean squared differences over channels,
    ``outside`` where the offset leaves ``b`` (no match there), same window order as
    :func:`local_correlation`."""
    return _window_map(a, b, radius, lambda x, y: (x - y).square().mean(dim=1), outside=outside)


def correlation_pyramid(a: torch.Tensor, b: torch.Tensor, radius: int, levels: int) -> torch.Tensor:
    """Local correlations of ``a`` and ``b`` pooled by 1, 2, …, 2^(levels−1), each brought back to
    the input grid (nearest): (B, levels·(2r+1)^ndim, *spatial), level 0 first."""
    spatial = a.shape[2:]
    pool = (F.avg_pool2d, F.avg_pool3d)[len(spatial) - 2]
    costs = [local_correlation(a, b, radius)]
    for level in range(1, levels):
        factor = 2**level
        coarse = local_correlation(pool(a, factor, ceil_mode=True), pool(b, factor, ceil_mode=True),
                                   radius)
        costs.append(F.interpolate(coarse, size=spatial, mode="nearest"))
    return torch.cat(costs, dim=1)
