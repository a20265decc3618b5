"""Feature Alignment (FA, §3.4): J RegBLKs from the token grid up to full resolution, then
3×3(×3) conv → LeakyReLU → 1×1(×1) conv, times ``config.displacement_scale`` → displacement φ
(voxels, array-axis order).

The last conv starts near zero (N(0, 1e-5), as VoxelMorph does) so an untrained network predicts
the identity transform while gradients still reach every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.guidance import PromptGuidance
from napari_unifuse.model.layers import conv
from napari_unifuse.model.regblock import RegBlock


class FeatureAlignment(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        dims = config.spatial_dims
        self.guidance = PromptGuidance(config.embed_dim, config.embed_dim)
        widths = (config.embed_dim, *config.regblock_channels)
        first_upsampling = config.num_regblocks - config.upsampling_regblocks
        self.blocks = nn.ModuleList(
            RegBlock(dims, widths[i], widths[i + 1], config.head_dim, config.embed_dim,
                     upsamples=i >= first_upsampling)
            for i in range(config.num_regblocks)
        )
        last = widths[-1]
        self.output = nn.Sequential(
            conv(dims, 2 * last, last, 3), nn.LeakyReLU(0.2), conv(dims, last, dims, 1))
        nn.init.normal_(self.output[-1].weight, std=1e-5)
        nn.init.zeros_(self.output[-1].bias)
        self.displacement_scale = config.displacement_scale

    def forward(self, moving: torch.Tensor, reference: torch.Tensor, prompts: torch.Tensor,
                class_probs: torch.Tensor) -> torch.Tensor:
        """moving, reference: token maps (B, M, *spatial/Q) -> φ (B, ndim, *spatial)."""
        guidance = self.guidance(prompts, class_probs)
        for block in self.blocks:
            moving, reference = block(moving, reference, guidance)
        return self.output(torch.cat([moving, reference], dim=1)) * self.displacement_scale
