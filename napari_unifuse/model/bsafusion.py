"""BSAFusion (Li et al., AAAI 2025): one-stage alignment and fusion of an unaligned 2-D pair.

Roles as in the paper: image A is the moving image (CT / PET / SPECT, misaligned), B the reference
(MRI). ``BSAFusion(config)(moving, reference)`` returns :class:`BSAFusionOutput` with ``fused``,
``aligned`` (the moving image warped onto the reference) and ``displacement`` (B, 2, H, W): the
package's convention (``docs/architecture.md``), voxels, sampling the moving image at x + u(x)
aligns it.

* **Encoder** (MDF-FR): two Restormer layers per image (shared weights); the first one's output
  F' (full resolution) goes straight to the fusion; the second one's is cut into patches of
  ``patch_size`` and passed, behind a learned class token, through ``encoder_layers`` Transformer
  layers: tokens F and the modality feature representation head f (MFRH, the class token). An MLP
  on f predicts the role (Eq. 1: A -> class 1, B -> class 0).
* **MDF-FR injection** (Eq. 2): F̂_A = F_A + f_B, F̂_B = F_B + f_A, then TransferA / TransferB
  (``transfer_layers`` Transformer layers each, not shared) give the alignment features F̃_A, F̃_B.
  Eq. 3 asks the encoder's own Transformer layers and MLP (applied with their weights detached, so
  only the Transfer blocks learn from it; the reference code copies them into a frozen replica
  after every epoch) to find F̃ modality-free: the logits are ``transfer_logits``.
* **BSFA** (Eq. 5-7): K = ``alignment_steps`` forward (FRL, moving side) and reverse (RRL,
  reference side) registration layers on a pyramid from the token grid (image / 2^(K-1)) up to full
  resolution. Step i sees concat(F^i_A, F^i_B) and its direction's running state D^{i-1}, predicts
  a bounded field φ^i (``max_step`` level voxels, tanh) and D^i; F^{i+1} = ↑2(W(F^i, φ^i)) (Eq. 6).
  ``model.bsafusion_fields`` composes the steps into the whole field.
* **MMFF** (Eq. 10): J = K FusionBLKs on the same pyramid over the pre-transfer tokens F_A, F_B:
  G^i = E_r(concat(W(F^i_A, φ↓), F^i_B, ↑2 G^{i-1})); then a reconstruction layer (Restormer,
  3×3 conv, sigmoid) on concat(G^J, F'_B, W(F'_A, φ)).

Ours, where the paper is silent: GroupNorm(1) for Restormer's channel LayerNorm, Restormer's MDTA
is ``model.attention.ChannelAttention`` without guidance, a depthwise-conv position encoding so the
Transformer layers take any image size divisible by ``size_multiple``, and the layer internals of
FRL / RRL / FusionBLK (conv blocks; the paper gives only their inputs and outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from napari_unifuse.errors import InputError
from napari_unifuse.model.attention import ChannelAttention
from napari_unifuse.model.bsafusion_fields import bidirectional_field, compose_steps, to_full_resolution, to_level
from napari_unifuse.model.config import DictConfig
from napari_unifuse.model.layers import (
    ConvBlock,
    conv,
    flatten_spatial,
    norm,
    pointwise_depthwise,
    unflatten_spatial,
    upsample,
)
from napari_unifuse.model.warp import warp

_SOURCE = "BSAFusionConfig"
SPATIAL_DIMS = 2
# Eq. 1's targets: the moving image (A) is class 1, the reference (B) class 0.
MOVING_CLASS, REFERENCE_CLASS = 1, 0


@dataclass(frozen=True)
class BSAFusionConfig(DictConfig):
    # The paper's network is 2-D; the field exists so that a 3-D request fails with a clear message.
    spatial_dims: int = SPATIAL_DIMS
    # Channels of the two encoder Restormer layers: F' (shallow, to the fusion) and the input of
    # the patch embedding (the reference code's Restormer(1, 8) and Restormer(8, 3)).
    shallow_channels: int = 8
    deep_channels: int = 3
    restormer_blocks: int = 1
    restormer_head_dim: int = 8
    # Transformer tokens: W' = token_dim, heads, MLP width; the patch size is 2^(alignment_steps-1)
    # so that the K-th step works at full resolution.
    token_dim: int = 256
    attention_heads: int = 4
    mlp_dim: int = 256
    encoder_layers: int = 2
    transfer_layers: int = 2
    # K: FRL / RRL steps (and FusionBLKs), and the channels on each pyramid level, coarsest first.
    alignment_steps: int = 5
    level_channels: tuple[int, ...] = (256, 64, 32, 16, 8)
    # Largest displacement one step may predict, in voxels of its own level.
    max_step: float = 1.0
    # Fixed-point iterations inverting the reverse field (0: the paper's subtraction).
    inverse_iterations: int = 5

    def __post_init__(self) -> None:
        def fail(problem: str) -> None:
            raise InputError(problem, _SOURCE)

        object.__setattr__(self, "level_channels", tuple(self.level_channels))
        if self.spatial_dims != SPATIAL_DIMS:
            fail(f"BSAFusion is a 2-D method (as in the paper); spatial_dims={self.spatial_dims!r} is not supported")
        for name in ("shallow_channels", "deep_channels", "restormer_blocks", "restormer_head_dim", "token_dim",
                     "attention_heads", "mlp_dim", "encoder_layers", "transfer_layers", "alignment_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.inverse_iterations, int) or self.inverse_iterations < 0:
            fail(f"inverse_iterations must be a non-negative integer, got {self.inverse_iterations!r}")
        if self.token_dim % self.attention_heads:
            fail(f"token_dim={self.token_dim} must be a multiple of attention_heads={self.attention_heads}")
        if len(self.level_channels) != self.alignment_steps or min(self.level_channels) < 1:
            fail(f"level_channels needs {self.alignment_steps} positive widths (one per alignment step), "
                 f"got {list(self.level_channels)}")
        if not self.max_step > 0:
            fail(f"max_step must be positive, got {self.max_step!r}")

    @property
    def patch_size(self) -> int:
        return 2 ** (self.alignment_steps - 1)

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be divisible by this (the patch grid)."""
        return self.patch_size

    @classmethod
    def paper(cls, spatial_dims: int = SPATIAL_DIMS) -> BSAFusionConfig:
        """The paper's sizes: K = J = 5, 16-pixel patches, 256-wide tokens, 2 + 2 Transformer layers."""
        return cls(spatial_dims=spatial_dims)

    @classmethod
    def small(cls, spatial_dims: int = SPATIAL_DIMS) -> BSAFusionConfig:
        """Same structure (five steps each way) at CPU scale, for tests and CPU training."""
        return cls(spatial_dims=spatial_dims, token_dim=64, mlp_dim=64, attention_heads=4, level_channels=(64, 32, 16, 8, 8))


@dataclass
class BSAFusionOutput:
    fused: torch.Tensor                   # (B, 1, H, W) in [0, 1]
    aligned: torch.Tensor                 # (B, 1, H, W): the moving image warped by displacement
    displacement: torch.Tensor            # (B, 2, H, W) image voxels, moving -> reference
    forward_field: torch.Tensor           # Ψ: the moving features' accumulated field (FRL)
    reverse_field: torch.Tensor           # Ρ: the reference features' accumulated field (RRL)
    forward_steps: list[torch.Tensor]     # φ^i_A in voxels of level i (coarsest first), for Eq. 8
    reverse_steps: list[torch.Tensor]     # φ^i_B
    modality_logits: tuple[torch.Tensor, torch.Tensor]  # (y_A, y_B) of Eq. 1, (B, 2) each
    transfer_logits: tuple[torch.Tensor, torch.Tensor]  # (y'_A, y'_B) of Eq. 3


# ---------------------------------------------------------------------------------- building blocks


class RestormerBlock(nn.Module):
    """x + MDTA(norm(x)); x + GDFN(norm(x)) (Zamir et al. 2022), at constant width."""

    def __init__(self, channels: int, head_dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.attention_norm, self.feedforward_norm = norm(channels), norm(channels)
        self.attention = ChannelAttention(SPATIAL_DIMS, channels, math.gcd(channels, head_dim), guidance_dim=1)
        self.gated = pointwise_depthwise(SPATIAL_DIMS, channels, 2 * expansion * channels)
        self.project = conv(SPATIAL_DIMS, expansion * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = self.attention_norm(x)
        # No guidance: the modulation reduces to a learned per-head scaling of the similarities.
        x = x + self.attention(normalized, normalized, x.new_zeros(x.shape[0], 1))
        value, gate = self.gated(self.feedforward_norm(x)).chunk(2, dim=1)
        return x + self.project(value * nn.functional.gelu(gate))


class RestormerLayer(nn.Sequential):
    """3×3 conv to ``out_channels`` then ``blocks`` Restormer blocks ("Restormer(in_c, out_c)")."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, head_dim: int) -> None:
        super().__init__(conv(SPATIAL_DIMS, in_channels, out_channels, 3),
                         *(RestormerBlock(out_channels, head_dim) for _ in range(blocks)))


def transformer_layers(config: BSAFusionConfig, count: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(config.token_dim, config.attention_heads, config.mlp_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, count, enable_nested_tensor=False)


class HeadedTransformer(nn.Module):
    """Transformer layers behind a learned class token: tokens (B, P, W') -> (tokens, head (B, W'))."""

    def __init__(self, config: BSAFusionConfig, count: int) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.token_dim))
        self.layers = transformer_layers(config, count)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence = self.layers(torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1))
        return sequence[:, 1:], sequence[:, 0]


class ModalityEncoder(nn.Module):
    """Restormer layers, patch embedding, Transformer layers with the MFRH, and its role MLP."""

    def __init__(self, config: BSAFusionConfig) -> None:
        super().__init__()
        self.shallow = RestormerLayer(1, config.shallow_channels, config.restormer_blocks, config.restormer_head_dim)
        self.deep = RestormerLayer(config.shallow_channels, config.deep_channels, config.restormer_blocks,
                                   config.restormer_head_dim)
        self.patch_embedding = conv(SPATIAL_DIMS, config.deep_channels, config.token_dim, config.patch_size,
                                    stride=config.patch_size)
        self.position = conv(SPATIAL_DIMS, config.token_dim, config.token_dim, 3, groups=config.token_dim)
        self.transformer = HeadedTransformer(config, config.encoder_layers)
        self.role = nn.Sequential(nn.Linear(config.token_dim, config.token_dim), nn.GELU(),
                                  nn.Linear(config.token_dim, 2))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (B, 1, H, W) -> F' (B, C', H, W), tokens F (B, P, W'), head f (B, W'), role logits (B, 2)."""
        shallow = self.shallow(image)
        patches = self.patch_embedding(self.deep(shallow))
        tokens, head = self.transformer(flatten_spatial(patches + self.position(patches)))
        return shallow, tokens, head, self.role(head)

    def role_of_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Eq. 3's discriminator: this encoder's Transformer layers and MLP with their weights
        detached, so that its gradient reaches the tokens (the Transfer blocks) only."""
        transformer = {name: value.detach() for name, value in self.transformer.named_parameters()}
        role = {name: value.detach() for name, value in self.role.named_parameters()}
        _, head = functional_call(self.transformer, transformer, (tokens,))
        return functional_call(self.role, role, (head,))


class RegistrationLayer(nn.Module):
    """One FRL / RRL step: (concat(F^i_A, F^i_B), D^{i-1}) -> (φ^i in level voxels, D^i at the next level)."""

    def __init__(self, channels: int, next_channels: int | None, max_step: float) -> None:
        super().__init__()
        self.max_step = max_step
        self.mix = ConvBlock(SPATIAL_DIMS, 3 * channels, channels)
        self.refine = ConvBlock(SPATIAL_DIMS, channels, channels)
        self.flow = conv(SPATIAL_DIMS, channels, SPATIAL_DIMS, 3)
        # Start near the identity (VoxelMorph's initialisation of its flow head).
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self.next_state = ConvBlock(SPATIAL_DIMS, channels, next_channels) if next_channels else None

    def forward(self, pair: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed = self.mix(torch.cat([pair, state], dim=1))
        mixed = mixed + self.refine(mixed)
        field = self.max_step * torch.tanh(self.flow(mixed))
        state = self.next_state(upsample(mixed)) if self.next_state is not None else None
        return field, state


class LevelUp(nn.Sequential):
    """↑2 then a conv block to the next level's width (shared by both images, so their features
    stay comparable)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         ConvBlock(SPATIAL_DIMS, in_channels, out_channels))


# ---------------------------------------------------------------------------------- the network


class BSAFusion(nn.Module):
    method = "bsafusion"  # model.networks' name
    config_class = BSAFusionConfig

    def __init__(self, config: BSAFusionConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or BSAFusionConfig.paper()
        widths = config.level_channels
        steps = config.alignment_steps
        self.encoder = ModalityEncoder(config)
        self.transfer_moving = HeadedTransformer(config, config.transfer_layers)     # TransferA
        self.transfer_reference = HeadedTransformer(config, config.transfer_layers)  # TransferB
        # BSFA: tokens -> level 1, then shared ↑2 between levels; K FRLs and K RRLs.
        self.alignment_entry = conv(SPATIAL_DIMS, config.token_dim, widths[0], 1)
        self.alignment_up = nn.ModuleList(LevelUp(widths[i], widths[i + 1]) for i in range(steps - 1))
        self.forward_layers = nn.ModuleList(
            RegistrationLayer(widths[i], widths[i + 1] if i + 1 < steps else None, config.max_step)
            for i in range(steps))
        self.reverse_layers = nn.ModuleList(
            RegistrationLayer(widths[i], widths[i + 1] if i + 1 < steps else None, config.max_step)
            for i in range(steps))
        # MMFF: its own pyramid of the pre-transfer tokens, J = K FusionBLKs, reconstruction.
        self.fusion_entry = conv(SPATIAL_DIMS, config.token_dim, widths[0], 1)
        self.fusion_up = nn.ModuleList(LevelUp(widths[i], widths[i + 1]) for i in range(steps - 1))
        self.fusion_blocks = nn.ModuleList(
            RestormerLayer(2 * widths[i] + (widths[i - 1] if i else 0), widths[i], config.restormer_blocks,
                           config.restormer_head_dim)
            for i in range(steps))
        self.reconstruction = nn.Sequential(
            RestormerLayer(widths[-1] + 2 * config.shallow_channels, config.shallow_channels,
                           config.restormer_blocks, config.restormer_head_dim),
            conv(SPATIAL_DIMS, config.shallow_channels, 1, 3),
            nn.Sigmoid(),
        )

    def level_factor(self, level: int) -> int:
        """How much coarser than the image pyramid level ``level`` (0 = the token grid) is."""
        return 2 ** (self.config.alignment_steps - 1 - level)

    def _check(self, moving: torch.Tensor, reference: torch.Tensor) -> None:
        if moving.ndim != 4 or moving.shape[1] != 1:
            raise InputError(f"BSAFusion is a 2-D method: it takes (B, 1, H, W) images, got shape "
                             f"{tuple(moving.shape)}", "BSAFusion")
        if moving.shape != reference.shape:
            raise InputError(f"moving {tuple(moving.shape)} and reference {tuple(reference.shape)} differ in shape",
                             "BSAFusion")
        multiple = self.config.size_multiple
        if any(size % multiple for size in moving.shape[2:]):
            raise InputError(f"BSAFusion needs sizes divisible by {multiple}, got {tuple(moving.shape[2:])}",
                             "BSAFusion")

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> BSAFusionOutput:
        self._check(moving, reference)
        grid = tuple(size // self.config.patch_size for size in moving.shape[2:])
        shallow_a, tokens_a, head_a, role_a = self.encoder(moving)
        shallow_b, tokens_b, head_b, role_b = self.encoder(reference)
        # Eq. 2: each image's tokens carry the other's modality head; then TransferA / TransferB.
        aligned_tokens_a, _ = self.transfer_moving(tokens_a + head_b[:, None])
        aligned_tokens_b, _ = self.transfer_reference(tokens_b + head_a[:, None])
        transfer_logits = (self.encoder.role_of_tokens(aligned_tokens_a),
                           self.encoder.role_of_tokens(aligned_tokens_b))

        forward_steps, reverse_steps = self._align(unflatten_spatial(aligned_tokens_a, grid),
                                                   unflatten_spatial(aligned_tokens_b, grid))
        forward_field = compose_steps([to_full_resolution(f, self.level_factor(i)) for i, f in enumerate(forward_steps)])
        reverse_field = compose_steps([to_full_resolution(f, self.level_factor(i)) for i, f in enumerate(reverse_steps)])
        displacement = bidirectional_field(forward_field, reverse_field, self.config.inverse_iterations)

        fused = self._fuse(unflatten_spatial(tokens_a, grid), unflatten_spatial(tokens_b, grid),
                           shallow_a, shallow_b, displacement)
        return BSAFusionOutput(
            fused=fused, aligned=warp(moving, displacement), displacement=displacement,
            forward_field=forward_field, reverse_field=reverse_field,
            forward_steps=forward_steps, reverse_steps=reverse_steps,
            modality_logits=(role_a, role_b), transfer_logits=transfer_logits,
        )

    def _align(self, features_a: torch.Tensor, features_b: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """BSFA (Eq. 6): the K forward and K reverse step fields, in voxels of their levels."""
        features_a, features_b = self.alignment_entry(features_a), self.alignment_entry(features_b)
        state_forward, state_reverse = features_a, features_b  # D^0_A = F^1_A, D^0_B = F^1_B
        forward_steps, reverse_steps = [], []
        for level, (frl, rrl) in enumerate(zip(self.forward_layers, self.reverse_layers)):
            pair = torch.cat([features_a, features_b], dim=1)
            step_a, state_forward = frl(pair, state_forward)
            step_b, state_reverse = rrl(pair, state_reverse)
            forward_steps.append(step_a)
            reverse_steps.append(step_b)
            if level + 1 < len(self.forward_layers):
                up = self.alignment_up[level]
                features_a = up(warp(features_a, step_a, padding_mode="border"))
                features_b = up(warp(features_b, step_b, padding_mode="border"))
        return forward_steps, reverse_steps

    def _fuse(self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, shallow_a: torch.Tensor,
              shallow_b: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """MMFF (Eq. 10): FusionBLKs from the token grid up, the moving side warped by φ at every level."""
        features_a, features_b = self.fusion_entry(tokens_a), self.fusion_entry(tokens_b)
        fused = None
        for level, block in enumerate(self.fusion_blocks):
            field = to_level(displacement, self.level_factor(level))
            inputs = [warp(features_a, field, padding_mode="border"), features_b]
            if fused is not None:
                inputs.append(upsample(fused))
            fused = block(torch.cat(inputs, dim=1))
            if level + 1 < len(self.fusion_blocks):
                up = self.fusion_up[level]
                features_a, features_b = up(features_a), up(features_b)
        shallow_a = warp(shallow_a, displacement, padding_mode="border")
        return self.reconstruction(torch.cat([fused, shallow_b, shallow_a], dim=1))
