"""Degradation-Aware Prompt Learning (DAPL, §3.2).

Shared 2-conv encoder for I'_D and I_R → Concat → conv → patch embedding (Q) → MambaBlock 1 →
three token orders (forward, reversed, bidirectional) each through the shared MambaBlock 2, whose
last hidden states are h1, h2, h3 → (a) degradation classifier p, (b) prompt selection G from h
through two MLPs, P̂ = P ⊙ G (Eq. 2).

Classifier input: the paper feeds h1..h3 through an MLP + linear + softmax. We feed MambaBlock 2's
outputs instead — each output token is the read-out C_t h_t of the hidden state at that position,
and the last one is exactly C h — because token read-outs can be pooled per z-slab, which gives
the per-slice degradation probabilities of 3-D volumes from the same head as the global p. The
pooled read-outs are standardised with running statistics before the MLP (see
:class:`~napari_unifuse.model.layers.RunningStandardize`): without it the head stays at the class
prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.layers import ConvBlock, RunningStandardize, conv, flatten_spatial
from napari_unifuse.model.mamba import MambaBlock


def token_orders(length: int, device=None) -> list[torch.Tensor]:
    """Index permutations of F_for, F_bac and F_bid (§3.2), 0-based.

    F_bid = [f¹ … f^(⌊N/2⌋−1), f^N … f^⌊N/2⌋]: the first ⌊N/2⌋−1 tokens in order, then the rest
    from the last one backwards.
    """
    forward = torch.arange(length, device=device)
    head = max(length // 2 - 1, 0)
    bidirectional = torch.cat([forward[:head], forward[head:].flip(0)])
    return [forward, forward.flip(0), bidirectional]


@dataclass
class DAPLOutput:
    moving_features: torch.Tensor      # F'_D (B, C, *spatial)
    reference_features: torch.Tensor   # F_R (B, C, *spatial)
    hidden_states: list[torch.Tensor]  # h1, h2, h3, each (B, inner_dim, d_state)
    class_logits: torch.Tensor         # (B, Ñ)
    slice_class_logits: torch.Tensor   # (B, S, Ñ)
    prompts: torch.Tensor              # P̂ (B, Ñ, L, M)


class DegradationAwarePromptLearning(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        dims, channels, embed = config.spatial_dims, config.feature_channels, config.embed_dim
        self.config = config
        self.encoder = nn.Sequential(ConvBlock(dims, config.in_channels, channels),
                                     ConvBlock(dims, channels, channels))
        self.merge = conv(dims, 2 * channels, channels, 1)
        self.patch_embed = conv(dims, channels, embed, config.patch_size, stride=config.patch_size)
        self.token_norm = nn.LayerNorm(embed)
        mamba = dict(d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
        self.mamba_first = MambaBlock(embed, **mamba)
        self.mamba_orders = MambaBlock(embed, **mamba)
        # MLP + linear + softmax head over pooled read-outs (softmax applied by the caller, next
        # to the CE loss).
        self.classifier = nn.Sequential(RunningStandardize(3 * embed),
                                        nn.Linear(3 * embed, embed), nn.GELU(),
                                        nn.Linear(embed, embed), nn.GELU(),
                                        nn.Linear(embed, config.num_classes))
        # The two MLPs giving G (Ñ×L×M) from the stacked h (3·inner_dim × d_state): one maps the
        # state axis to the L prompts, the other the channel axis to Ñ·M.
        self.select_prompts = nn.Sequential(nn.Linear(config.d_state, config.prompt_length),
                                            nn.GELU(),
                                            nn.Linear(config.prompt_length, config.prompt_length))
        self.select_classes = nn.Sequential(nn.Linear(3 * config.inner_dim, embed), nn.GELU(),
                                            nn.Linear(embed, config.num_classes * embed))
        # The degradation-aware prompt set P (embedding-like N(0, 1) initialisation).
        self.prompt_set = nn.Parameter(
            torch.randn(config.num_classes, config.prompt_length, embed))

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> DAPLOutput:
        moving_features, reference_features = self.encoder(moving), self.encoder(reference)
        merged = self.merge(torch.cat([moving_features, reference_features], dim=1))
        patches = self.patch_embed(merged)
        tokens = self.mamba_first(self.token_norm(flatten_spatial(patches)))
        readouts, hidden_states = [], []
        for order in token_orders(tokens.shape[1], tokens.device):
            readout, state = self.mamba_orders(tokens[:, order], return_last_state=True)
            readouts.append(readout[:, torch.argsort(order)])  # back to raster order
            hidden_states.append(state)
        token_features = torch.cat(readouts, dim=-1)
        pooled = [token_features.mean(dim=1, keepdim=True)]
        if self.config.spatial_dims == 3:
            pooled.append(self._slab_means(token_features, patches.shape[2:]))
        # One head call for the image and its slabs: they share the running statistics.
        logits = self.classifier(torch.cat(pooled, dim=1))
        class_logits = logits[:, 0]
        slice_class_logits = logits[:, 1:] if self.config.spatial_dims == 3 else logits
        return DAPLOutput(moving_features, reference_features, hidden_states, class_logits,
                          slice_class_logits, self._select_prompts(hidden_states))

    def _slab_means(self, token_features: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """(B, N, F) token features of a volume -> (B, S, F): their mean over each slab of
        ``slab_patches`` patch rows along the first array axis (z); the last slab may be thinner."""
        rows = token_features.reshape(token_features.shape[0], grid[0], -1,
                                      token_features.shape[-1]).mean(dim=2)
        return torch.stack([rows_in_slab.mean(dim=1)
                            for rows_in_slab in rows.split(self.config.slab_patches, dim=1)],
                           dim=1)

    def _select_prompts(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """h1..h3 -> G (B, Ñ, L, M) in (0, 1) -> P̂ = P ⊙ G."""
        stacked = torch.cat(hidden_states, dim=1)           # (B, 3·inner, d_state)
        per_prompt = self.select_prompts(stacked).transpose(1, 2)   # (B, L, 3·inner)
        selection = self.select_classes(per_prompt)          # (B, L, Ñ·M)
        batch, length = selection.shape[:2]
        selection = selection.view(batch, length, self.config.num_classes, -1).transpose(1, 2)
        return self.prompt_set * torch.sigmoid(selection)
