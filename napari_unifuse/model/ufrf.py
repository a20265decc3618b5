"""Universal Feature Restoration & Fusion (UFR&F, §3.5): a U-Net on
F̃ = Concat(W(F̄'_D, φ), F̄_R) with an ALSN in every scale's skip connection.

Two 1×1(×1) heads read the last decoder features: the fused image I_fuse and the restored, aligned
moving image (what the workbench shows next to the fusion). Both go through a sigmoid, since
model intensities live in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from napari_unifuse.model.alsn import ALSN
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.guidance import PromptGuidance
from napari_unifuse.model.layers import ConvBlock, conv, upsample


class RestorationFusion(nn.Module):
    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        dims, widths = config.spatial_dims, config.unet_channels
        self.guidance = PromptGuidance(config.embed_dim, config.embed_dim)
        self.encoders = nn.ModuleList(
            ConvBlock(dims, 2 * config.feature_channels if i == 0 else widths[i - 1], widths[i],
                      stride=1 if i == 0 else 2)
            for i in range(len(widths))
        )
        self.skips = nn.ModuleList(
            ALSN(dims, width, config.num_classes, config.lora_rank, config.head_dim,
                 config.embed_dim)
            for width in widths
        )
        self.decoders = nn.ModuleList(
            ConvBlock(dims, widths[i + 1] + widths[i], widths[i])
            for i in range(len(widths) - 1)
        )
        self.heads = conv(dims, widths[0], 2 * config.in_channels, 1)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor, prompts: torch.Tensor,
                class_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """moving (already warped), reference: (B, C, *spatial) features -> (fused, restored)."""
        guidance = self.guidance(prompts, class_probs)
        features = torch.cat([moving, reference], dim=1)
        skips = []
        for encoder, skip in zip(self.encoders, self.skips):
            features = encoder(features)
            skips.append(skip(features, guidance, class_probs))
        features = skips.pop()
        for decoder in reversed(self.decoders):
            features = decoder(torch.cat([upsample(features), skips.pop()], dim=1))
        fused, restored = torch.sigmoid(self.heads(features)).chunk(2, dim=1)
        return fused, restored
