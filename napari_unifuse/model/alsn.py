"""Adaptive LoRA Synergistic Network (ALSN, §3.5, Eq. 7-10): the skip connection of UFR&F.

F_rf = F + B(F, P̂) + Σ_j p_j R_j(F, P̂)    (Eq. 7, plus a residual so the skip starts as one)

* BaseNet B (Eq. 9-10): prompt-modulated channel self-attention V' = M ⊗ Conv(F), then the
  gated projection Conv(V') ⊙ GELU(Conv(V')) (Restormer's gated-dconv form: 1×1 + depthwise
  3×3 convs).
* LoRA branch R_j = A_j diag(1 + γ_j(P̂)) B_j: a rank-r 3×3(×3) conv B_j, scaled per rank by the
  prompt guidance, and a 1×1(×1) conv A_j back to C channels (Eq. 8: W x + Σ λ_j A_j B_j x, with
  λ_j = p_j the degradation probabilities). Because A_j is linear, Σ_j p_j A_j(x_j) equals one
  1×1 conv over the concatenated, p-weighted x_j, which never materialises Ñ full-size outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model.attention import ChannelAttention
from napari_unifuse.model.layers import conv, pointwise_depthwise


class BaseNet(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, head_dim: int, guidance_dim: int) -> None:
        super().__init__()
        self.attention = ChannelAttention(spatial_dims, channels, head_dim, guidance_dim)
        self.gated_projection = pointwise_depthwise(spatial_dims, channels, 2 * channels)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        mixed = self.attention(features, features, guidance)
        value, gate = self.gated_projection(mixed).chunk(2, dim=1)
        return value * nn.functional.gelu(gate)


class ALSN(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, num_classes: int, rank: int,
                 head_dim: int, guidance_dim: int, lora_init_std: float = 1e-3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rank = rank
        self.spatial_dims = spatial_dims
        self.base = BaseNet(spatial_dims, channels, head_dim, guidance_dim)
        # B_j for all Ñ branches at once, their prompt scaling γ_j, and [A_1 … A_Ñ].
        self.lora_down = conv(spatial_dims, channels, num_classes * rank, 3, bias=False)
        self.lora_scale = nn.Linear(guidance_dim, num_classes * rank)
        self.lora_up = conv(spatial_dims, num_classes * rank, channels, 1, bias=False)
        # LoRA starts (almost) switched off so the base network dominates early training, but not
        # exactly zero, which would block every gradient to B_j.
        nn.init.normal_(self.lora_up.weight, std=lora_init_std)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor,
                class_probs: torch.Tensor) -> torch.Tensor:
        """features (B, C, *spatial), guidance (B, G), class_probs p (B, Ñ) -> (B, C, *spatial)."""
        weights = (1.0 + self.lora_scale(guidance)) * class_probs.repeat_interleave(self.rank, 1)
        low_rank = self.lora_down(features) * weights.view(*weights.shape, *[1] * self.spatial_dims)
        return features + self.base(features, guidance) + self.lora_up(low_rank)

    def lora_parameter_count(self) -> int:
        """Parameters of the LoRA branches (for the ALSN vs multi-expert comparison)."""
        return sum(p.numel() for m in (self.lora_down, self.lora_scale, self.lora_up)
                   for p in m.parameters())
