"""MMIF-AMIN (adaptive loss-driven multi-scale invertible dense network), 2D, from its paper (§3).

``MMIFAMIN(config)(moving, reference)`` fuses two aligned images ``(B, 1, y, x)`` in [0, 1] (the
Y channel of an RGB PET/SPECT, as in the paper) into one ``(B, 1, y, x)`` in [0, 1]. Four parts:

* two **invertible dense networks** (IDN), one per modality: a 3×3 convolution lifts the image to
  ``feature_channels`` features R_0, then ``num_idb`` invertible dense blocks (IDB). An IDB is an
  affine coupling: half of the channels pass unchanged and feed a dense network (Eq. 1–2: four
  densely connected 3×3 conv + LeakyReLU layers, then a 3×3 conv of all of them), whose output
  gives the scaling factor S = exp(clamp · 2 · (sigmoid(R_out) − 0.5)) (Eq. 3, clamp = 2) and a
  shift for the other half; the halves swap between blocks. ``IDB.inverse`` undoes it exactly
  from the same parameters (Fig. 3b).
* the **multi-scale complementary feature extraction module** (MCFEM) on the two sources stacked
  along channels: CBAM (Eq. 4–6: channel attention from average- and max-pooled MLPs, then 7×7
  spatial attention), convolutions of several kernel sizes (the pre-positioned CNN), a Transformer
  block of ``num_tmu`` pre-norm units (Eq. 7) on patch tokens, and a post-positioned 3×3 CNN.
* **reconstruction**: a 1×1 convolution of all three feature sets and HardSigmoid.

Ours, where the paper is silent: the Transformer works on ``patch_size``² patch tokens (full-
resolution tokens would need a 65 536² attention matrix at 256²) without a position embedding, so
any size divisible by ``patch_size`` works; the dense network's output width is twice the half
(scale and shift). The paper's model has 76.47 K parameters; :meth:`MMIFAMINConfig.paper` has
166 K (the patch embedding and its inverse hold 49 K of them), :meth:`MMIFAMINConfig.small` 109 K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_unifuse.errors import InputError
from napari_unifuse.model.config import DictConfig

_SOURCE = "MMIFAMINConfig"
_NEGATIVE_SLOPE = 0.2


@dataclass(frozen=True)
class MMIFAMINConfig(DictConfig):
    spatial_dims: int = 2
    in_channels: int = 1
    feature_channels: int = 8  # IDN width (even: the coupling splits it in halves)
    dense_growth: int = 8  # channels of each dense layer R_1..R_4 (Eq. 1)
    dense_layers: int = 4
    num_idb: int = 6  # IDBs per IDN (§3.1: 6)
    clamp: float = 2.0  # Eq. 3
    mcfem_channels: int = 12  # pre-positioned CNN output, split evenly over the kernel sizes
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    cbam_hidden: int = 4  # channel attention MLP width
    spatial_kernel: int = 7  # CBAM's spatial attention convolution (Eq. 5: 7×7)
    patch_size: int = 8
    embed_dim: int = 32
    num_tmu: int = 3  # TMB: three TMUs (§3.2.2)
    num_heads: int = 8  # §4.1.2
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.spatial_dims != 2:
            raise InputError(f"MMIF-AMIN is a 2D network (as in its paper), not {self.spatial_dims}D", _SOURCE)
        if self.feature_channels % 2:
            raise InputError(f"feature_channels must be even (the coupling halves it), got {self.feature_channels}",
                             _SOURCE)
        if self.mcfem_channels % len(self.kernel_sizes):
            raise InputError(f"mcfem_channels ({self.mcfem_channels}) must divide evenly over the kernel sizes "
                             f"{self.kernel_sizes}", _SOURCE)
        if self.embed_dim % self.num_heads:
            raise InputError(f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})",
                             _SOURCE)

    @property
    def size_multiple(self) -> int:
        return self.patch_size

    @classmethod
    def paper(cls, spatial_dims: int = 2) -> MMIFAMINConfig:
        return cls(spatial_dims=spatial_dims)

    @classmethod
    def small(cls, spatial_dims: int = 2) -> MMIFAMINConfig:
        """CPU-sized: fewer blocks, a narrower Transformer (about a third of the paper's operations)."""
        return cls(spatial_dims=spatial_dims, dense_growth=6, num_idb=4, embed_dim=32, num_tmu=2, num_heads=4)


class DenseNetwork(nn.Module):
    """Eq. 1–2: R_i = LeakyReLU(W_i * [R_0, …, R_{i−1}] + b_i), R_out = W_out * [R_0, …, R_4] + b_out."""

    def __init__(self, in_channels: int, growth: int, layers: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv2d(in_channels + index * growth, growth, 3, padding=1) for index in range(layers))
        self.out = nn.Conv2d(in_channels + layers * growth, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(F.leaky_relu(layer(torch.cat(features, dim=1)), _NEGATIVE_SLOPE))
        return self.out(torch.cat(features, dim=1))


class InvertibleDenseBlock(nn.Module):
    """An IDB: (x1, x2) → (x2 · S(x1) + t(x1), x1), S from Eq. 3; exactly invertible."""

    def __init__(self, config: MMIFAMINConfig) -> None:
        super().__init__()
        self.half = config.feature_channels // 2
        self.clamp = config.clamp
        self.dense = DenseNetwork(self.half, config.dense_growth, config.dense_layers, 2 * self.half)

    def _scale_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_out, shift = self.dense(x1).chunk(2, dim=1)
        return torch.exp(self.clamp * 2 * (torch.sigmoid(r_out) - 0.5)), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.split(self.half, dim=1)
        scale, shift = self._scale_shift(x1)
        # Swapped, so that the next block transforms the half this one passed through.
        return torch.cat([x2 * scale + shift, x1], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        transformed, x1 = y.split(self.half, dim=1)
        scale, shift = self._scale_shift(x1)
        return torch.cat([x1, (transformed - shift) / scale], dim=1)


class InvertibleDenseNetwork(nn.Module):
    """One modality's IDN: lift to features, then the IDBs (invertible from the features on)."""

    def __init__(self, config: MMIFAMINConfig) -> None:
        super().__init__()
        self.lift = nn.Conv2d(config.in_channels, config.feature_channels, 3, padding=1)
        self.blocks = nn.ModuleList(InvertibleDenseBlock(config) for _ in range(config.num_idb))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(self.lift(image))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            features = block(features)
        return features

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            features = block.inverse(features)
        return features


class CBAM(nn.Module):
    """Eq. 4–6: M_c from average- and max-pooled MLPs, then M_s from a 7×7 conv of channel pools."""

    def __init__(self, channels: int, hidden: int, spatial_kernel: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True)))
        x = channel * x
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled)) * x


class TransformerUnit(nn.Module):
    """Eq. 7: X + MSA(LN(X)), then + MLP(LN(·)) (pre-norm)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


class ComplementaryFeatures(nn.Module):
    """MCFEM: CBAM → multi-scale convolutions → Transformer block on patch tokens → 3×3 CNN."""

    def __init__(self, config: MMIFAMINConfig) -> None:
        super().__init__()
        sources = 2 * config.in_channels
        self.cbam = CBAM(sources, config.cbam_hidden, config.spatial_kernel)
        width = config.mcfem_channels // len(config.kernel_sizes)
        self.branches = nn.ModuleList(nn.Conv2d(sources, width, k, padding=k // 2) for k in config.kernel_sizes)
        self.patch = config.patch_size
        self.embed = nn.Conv2d(config.mcfem_channels, config.embed_dim, self.patch, stride=self.patch)
        self.units = nn.Sequential(*(TransformerUnit(config.embed_dim, config.num_heads, config.mlp_ratio)
                                     for _ in range(config.num_tmu)))
        self.unembed = nn.Linear(config.embed_dim, config.mcfem_channels * self.patch**2)
        self.post = nn.Conv2d(2 * config.mcfem_channels, config.mcfem_channels, 3, padding=1)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        attended = self.cbam(pair)
        local = F.leaky_relu(torch.cat([branch(attended) for branch in self.branches], dim=1), _NEGATIVE_SLOPE)
        grid = self.embed(local)
        batch, dim, rows, cols = grid.shape
        tokens = self.units(grid.flatten(2).transpose(1, 2))
        patches = self.unembed(tokens).transpose(1, 2).reshape(batch, -1, rows, cols)
        global_features = F.pixel_shuffle(patches, self.patch)
        return F.leaky_relu(self.post(torch.cat([local, global_features], dim=1)), _NEGATIVE_SLOPE)


class MMIFAMIN(nn.Module):
    method = "mmif-amin"  # model.networks: the name checkpoints record
    config_class = MMIFAMINConfig

    def __init__(self, config: MMIFAMINConfig) -> None:
        super().__init__()
        self.config = config
        self.moving_idn = InvertibleDenseNetwork(config)
        self.reference_idn = InvertibleDenseNetwork(config)
        self.complementary = ComplementaryFeatures(config)
        self.reconstruct = nn.Conv2d(2 * config.feature_channels + config.mcfem_channels, config.in_channels, 1)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The fused image ``(B, 1, y, x)`` in [0, 1] of two aligned sources of that shape."""
        self._check_inputs(moving, reference)
        features = torch.cat([self.moving_idn(moving), self.reference_idn(reference),
                              self.complementary(torch.cat([moving, reference], dim=1))], dim=1)
        return F.hardsigmoid(self.reconstruct(features))

    def _check_inputs(self, moving: torch.Tensor, reference: torch.Tensor) -> None:
        multiple = self.config.size_multiple
        for name, image in (("moving", moving), ("reference", reference)):
            shape = tuple(image.shape)
            if image.dim() != 4 or shape[1] != self.config.in_channels or any(s % multiple or s == 0 for s in shape[2:]):
                raise InputError(f"MMIF-AMIN takes 2D images (batch, {self.config.in_channels}, y, x) with y and x "
                                 f"multiples of {multiple}, got {shape}", name)
        if moving.shape != reference.shape:
            raise InputError(f"moving {tuple(moving.shape)} and reference {tuple(reference.shape)} differ", "MMIF-AMIN")
