"""Prompt-modulated channel ("transposed") attention, shared by RegBLK (cross) and BaseNet (self).

Eq. 9: M = Resh(MLP(P̂ ⊙ p)) ⊙ (Conv(F) ⊗ Conv(F)ᵀ), V' = M ⊗ Conv(F). The attention matrix is
channels × channels per head (as in Restormer's MDTA), so its cost is linear in the number of
voxels — the only kind of attention that fits 160³ volumes; the Conv projections are 1×1 +
depthwise 3×3 as in Restormer. Queries and keys are L2-normalised
along space with a learned per-head temperature, then a softmax turns the modulated similarities
into mixing weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_unifuse.model.layers import pointwise_depthwise


class ChannelAttention(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, head_dim: int, guidance_dim: int) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.query = pointwise_depthwise(spatial_dims, channels, channels)
        self.key_value = pointwise_depthwise(spatial_dims, channels, 2 * channels)
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        # Resh(MLP(·)) of Eq. 9: one (head_dim × head_dim) modulation per head from the guidance.
        self.modulation = nn.Linear(guidance_dim, self.heads * head_dim * head_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        """Re-mix the channels of ``context`` by their similarity to those of ``x``.

        x, context: (B, C, *spatial); guidance: (B, guidance_dim). Returns (B, C, *spatial).
        ``context is x`` gives self-attention (BaseNet), another stream cross-attention (RegBLK).
        """
        batch, channels, *spatial = x.shape
        split = (batch, self.heads, self.head_dim, -1)
        query = F.normalize(self.query(x).reshape(split), dim=-1)
        key, value = (t.reshape(split) for t in self.key_value(context).chunk(2, dim=1))
        similarity = query @ F.normalize(key, dim=-1).transpose(-1, -2) * self.temperature
        modulation = 1.0 + self.modulation(guidance).view(
            batch, self.heads, self.head_dim, self.head_dim)
        weights = torch.softmax(similarity * modulation, dim=-1)
        return (weights @ value).reshape(batch, channels, *spatial)
