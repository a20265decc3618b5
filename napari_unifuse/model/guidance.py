"""Degradation guidance extracted from the prompts P̂ (the "MLP" of Fig. 3 and of §3.5).

FA and UFR&F each own one instance (the paper: "an MLP with parameters different from those used
in FA"). Following Eq. 9's ``MLP(P̂ ⊙ p)``, every class's prompts are weighted by its
probability, so the guidance follows the recognised degradation.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptGuidance(nn.Module):
    def __init__(self, embed_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU(),
            nn.Linear(embed_dim, out_dim),
        )

    def forward(self, prompts: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
        """prompts P̂ (B, Ñ, L, M), class_probs p (B, Ñ) -> guidance (B, out_dim)."""
        selected = (prompts * class_probs[:, :, None, None]).sum(dim=1)  # (B, L, M)
        return self.mlp(selected).mean(dim=1)
