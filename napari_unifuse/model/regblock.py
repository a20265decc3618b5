"""RegBLK (Fig. 3): one step of FA's coarse-to-fine feature matching.

Each stream attends to the other (prompt-modulated channel cross-attention, shared weights for
both directions since matching is symmetric), a 3×3(×3) conv compares the stream with what it
gathered from the other one at the same location, and optionally both streams are upsampled ×2.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model.attention import ChannelAttention
from napari_unifuse.model.layers import ConvBlock, upsample


class RegBlock(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, head_dim: int,
                 guidance_dim: int, upsamples: bool) -> None:
        super().__init__()
        self.upsamples = upsamples
        self.cross_attention = ChannelAttention(spatial_dims, in_channels, head_dim, guidance_dim)
        self.compare = ConvBlock(spatial_dims, 2 * in_channels, in_channels)
        self.project = ConvBlock(spatial_dims, in_channels, out_channels)

    def _update(self, stream: torch.Tensor, other: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        gathered = self.cross_attention(stream, other, guidance)
        stream = stream + self.compare(torch.cat([stream, gathered], dim=1))
        return self.project(upsample(stream) if self.upsamples else stream)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor,
                guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._update(moving, reference, guidance),
                self._update(reference, moving, guidance))
