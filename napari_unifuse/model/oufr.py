"""Omni Unified Feature Representation (OUFR, §3.3, Eq. 3).

F'_D and F_R are patch-embedded (Q, shared weights) into tokens, concatenated as
[f_D¹ … f_D^N, f_R¹ … f_R^N], and passed through three Spatial-Mamba stages; stage j's SSM starts
from DAPL's hidden state h_j instead of zero (y = C(Ā h_j + B̄ f)). The output is split back into
F̄'_D and F̄_R (tokens, used by L_moda and, as token maps, by FA).

UFR&F needs full-resolution features to warp: a transposed conv (the inverse of the patching)
brings the tokens back to C channels at full size, added to the encoder features so the fine detail
that patching averages away still reaches the restoration / fusion network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.layers import conv, conv_transpose, flatten_spatial, unflatten_spatial
from napari_unifuse.model.mamba import MambaBlock


@dataclass
class OUFROutput:
    moving_tokens: torch.Tensor      # F̄'_D (B, N, M)
    reference_tokens: torch.Tensor   # F̄_R (B, N, M)
    moving_map: torch.Tensor         # F̄'_D as a token map (B, M, *spatial/Q): FA's input
    reference_map: torch.Tensor
    moving_full: torch.Tensor        # (B, C, *spatial): UFR&F's input (before warping)
    reference_full: torch.Tensor


class OmniUnifiedFeatureRepresentation(nn.Module):
    STAGES = 3  # one per DAPL hidden state h1, h2, h3

    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        dims, channels, embed = config.spatial_dims, config.feature_channels, config.embed_dim
        self.patch_embed = conv(dims, channels, embed, config.patch_size, stride=config.patch_size)
        self.token_norm = nn.LayerNorm(embed)
        self.stages = nn.ModuleList(
            MambaBlock(embed, config.d_state, config.d_conv, config.expand)
            for _ in range(self.STAGES))
        self.unpatch = conv_transpose(dims, embed, channels, config.patch_size)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor,
                hidden_states: list[torch.Tensor]) -> OUFROutput:
        """moving F'_D, reference F_R: (B, C, *spatial); hidden_states: [h1, h2, h3]."""
        moving_patches, reference_patches = self.patch_embed(moving), self.patch_embed(reference)
        grid = tuple(moving_patches.shape[2:])
        tokens = self.token_norm(torch.cat(
            [flatten_spatial(moving_patches), flatten_spatial(reference_patches)], dim=1))
        for stage, state in zip(self.stages, hidden_states, strict=True):
            tokens = stage(tokens, initial_state=state)
        moving_tokens, reference_tokens = tokens.chunk(2, dim=1)
        moving_map = unflatten_spatial(moving_tokens, grid)
        reference_map = unflatten_spatial(reference_tokens, grid)
        return OUFROutput(
            moving_tokens, reference_tokens, moving_map, reference_map,
            moving + self.unpatch(moving_map), reference + self.unpatch(reference_map),
        )
