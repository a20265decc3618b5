"""RegBLK (Fig. 3): one step of FA's coarse-to-fine feature matching.

Each stream attends to the other (prompt-modulated channel cross-attention, shared weights for
both directions since matching is symmetric) and is correlated with it over a window of
``correlation_radius`` voxels on ``correlation_levels`` pyramid levels (a cost volume, projected to
the stream's width); a 3×3(×3) conv compares the stream with both, and optionally both streams are
upsampled ×2.

Why the cost volume: channel attention mixes channels at one location only, so nothing in the
paper's block says *where* the other image's matching feature is. Probes, L_reg only (figure: mean
squared end-point error over that of the best constant field; 1 = nothing learned). Shift probe
(same-modality shifts of up to 4 px on 64² noise), FA alone on patch-embedded images:

* channel attention only (no cost volume): 1.03 after 900 steps, never moving;
* one-level cost volume, with GroupNorm in the convs and VoxelMorph's N(0, 1e-5) output init:
  1.03 after 1300 steps; without GroupNorm 0.45 (steps 600-900); with GroupNorm and PyTorch's
  default init 0.53 after 1000; without GroupNorm and at N(0, 1e-2): 0.07 after 800;
* as built (two levels, no GroupNorm, N(0, 1e-2)), ``bench/probe_registration.py --network fa``:
  1.06 until step 900, 0.56 at 1000, 0.44 at 1500 (its plain 4-layer CNN control: 0.25 at 1500).

On the Harvard training pairs (cross-modal, ~17 px misalignments), whole UniFuse-small: with one
level (±12 px) the validation end-point error did not move in 300 steps; with two levels it fell
from 17.1 to 14.5 px in 500 steps (``--harvard`` mode of the committed script: 14.9 px, 0.81 of
the constant field's L_reg). (Items other than the script's were measured with development
versions of it.)
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model.attention import ChannelAttention
from napari_unifuse.model.correlation import correlation_pyramid, window_size
from napari_unifuse.model.layers import ConvBlock, conv, upsample


class RegBlock(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, head_dim: int,
                 guidance_dim: int, correlation_radius: int, correlation_levels: int,
                 upsamples: bool) -> None:
        super().__init__()
        self.upsamples = upsamples
        self.correlation_radius = correlation_radius
        self.correlation_levels = correlation_levels
        self.cross_attention = ChannelAttention(spatial_dims, in_channels, head_dim, guidance_dim)
        self.cost_projection = conv(spatial_dims, window_size(
            spatial_dims, correlation_radius, correlation_levels), in_channels, 1)
        # No GroupNorm here: with it, FA did not learn the probe above.
        self.compare = ConvBlock(spatial_dims, 3 * in_channels, in_channels, normalize=False)
        self.project = ConvBlock(spatial_dims, in_channels, out_channels, normalize=False)

    def _update(self, stream: torch.Tensor, other: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        gathered = self.cross_attention(stream, other, guidance)
        cost = self.cost_projection(correlation_pyramid(
            stream, other, self.correlation_radius, self.correlation_levels))
        stream = stream + self.compare(torch.cat([stream, gathered, cost], dim=1))
        return self.project(upsample(stream) if self.upsamples else stream)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor,
                guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._update(moving, reference, guidance),
                self._update(reference, moving, guidance))
