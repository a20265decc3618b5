"""Hyper-parameters of the UniFuse network, one frozen dataclass shared by every sub-module.

The paper (ICCV 2025, §3-4) fixes only a few sizes: J = 4 RegBLKs, Ñ degradation classes, 3-D
inputs of 160³, and UFR&F with ALSN ≈ 0.95 M parameters (2.99 M with multi-experts). The other
sizes of :meth:`UniFuseConfig.paper` are our choices, picked so that UFR&F lands on that count
(see ``bench/bench_model.py`` and ``unifuse info``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Self

from napari_unifuse.errors import InputError

_SOURCE = "UniFuseConfig"


class DictConfig:
    """The JSON round trip of a frozen network config (checkpoint headers and sidecars are JSON):
    tuples are written as lists and read back as tuples; a field the config does not have is
    refused. Shared by every network of ``model.networks``."""

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        # The ignores: mypy cannot see that every subclass is a dataclass.
        known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config fields {unknown}", cls.__name__)
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


@dataclass(frozen=True)
class UniFuseConfig(DictConfig):
    spatial_dims: int = 2
    in_channels: int = 1
    # C: channels of the shared encoder's feature maps F'_D, F_R (§3.2).
    feature_channels: int = 8
    # Q: side length of a patch; tokens live on a grid of spatial / Q (§3.3, §3.4).
    patch_size: int = 4
    # M: token length of DAPL / OUFR (§3.2).
    embed_dim: int = 64
    # Mamba-1 internals: SSM state size N, causal conv width, inner expansion factor.
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    # L: prompts per degradation class; P, G, P̂ are (Ñ, L, M) (§3.2, Eq. 2).
    prompt_length: int = 8
    # Ñ: degradation classes, in the order of classes.DEGRADATION_CLASSES.
    num_classes: int = 4
    # J RegBLKs in FA (Table 5: 4 is best); regblock_channels[i] is block i's output width. The
    # last log2(Q) blocks each upsample ×2 so that the field comes out at full resolution.
    num_regblocks: int = 4
    regblock_channels: tuple[int, ...] = (64, 32, 16, 8)
    # The first RegBLK's cost volume: radius (tokens) and pyramid levels; later blocks refine with
    # radius 1 at their own resolution. Radius 3 at Q = 4 over 2 levels searches ±12 voxels in
    # 4-voxel steps and ±24 in 8-voxel steps: synthetic misalignments reach ~20 voxels.
    correlation_radius: int = 3
    correlation_levels: int = 2
    # Voxels per unit of FA's output conv. Misalignments reach ~20 voxels, while the conv starts
    # near zero and Adam moves weights by ~lr per step: unscaled, the field needed thousands of
    # steps just to reach the right magnitude (measured: fitting 4 pairs, end-point error 16.1 ->
    # 15.3 voxels in 60 steps unscaled, -> 11.8 with 10).
    displacement_scale: float = 10.0
    # Structural matching (model/matching.py), the parameter-free first estimate FA refines: grid
    # step and search range in voxels (0 switches it off). Synthetic misalignments reach ~25 voxels.
    matching_step: int = 8
    matching_range: int = 32
    # Refine the matching by maximising mutual information (model/mi_refinement.py): rigid, then on
    # a control grid of 32 voxels. PET/SPECT have too few edges for the descriptors
    # alone (Harvard validation end-point error, px: PET 16.8 -> 5.0, SPECT 17.4 -> 9.9).
    matching_mutual_information: bool = True
    # UFR&F U-Net widths, one per scale (finest first); ALSN sits on every scale's skip.
    unet_channels: tuple[int, ...] = (16, 32, 48, 112)
    # Rank r of each LoRA branch A_ij B_ij (Eq. 8).
    lora_rank: int = 4
    # Channels per head of the channel (transposed) attention in RegBLK and BaseNet (Eq. 9).
    head_dim: int = 16
    # Per-slice degradation classification in 3-D: one prediction per slab of this many z voxels
    # (a multiple of Q, since the classifier sees tokens).
    slab_size: int = 16
    # Pool the degradation classifier's token read-outs by their standard deviation beside their
    # mean (statistics pooling). Noise, ghosts and streaks change how much the read-outs vary over
    # an image, not their average: on mean pooling alone the 3-D classifier stayed at the class prior
    # (docs/speed_3d.md). False for checkpoints saved before the field existed.
    pool_readout_std: bool = False
    # Give the degradation classifier, beside the read-outs, parameter-free statistics of each
    # patch's high frequencies (model.dapl.patch_statistics). The read-outs lose the amplitude of
    # what is smaller than a patch, which is where noise, ghosts and streaks are: the 3-D head
    # fitted on them named a clean volume's class as often as a degraded one's (likelihood ratio 1.0).
    readout_patch_statistics: bool = False
    # The classifier reads those statistics alone, not the read-outs (needs
    # readout_patch_statistics): at CPU scale the read-outs tell the task, not the artefact, and a
    # head given both overfits them (model.dapl). The read-outs still give h1..h3 and the prompts.
    classifier_statistics_only: bool = False
    # Take the moving image's patch statistics on the image as it was acquired, before the initial
    # alignment moves it (needs readout_patch_statistics). The move interpolates, and interpolation
    # smooths noise, ghosts and streaks by more than a degradation adds (a half-voxel linear shift
    # lowers the spectral slope by 0.9, low dose moves it by 0.14-0.21;
    # bench/results/probe_statistics_resampling.md). The reference's statistic and the read-outs
    # stay on the moved pair.
    statistics_before_alignment: bool = False
    # Width of UFR&F's image-space restoration path (model.ufrf.ImageRestoration), 0 for none: a
    # few convolutions over the warped moving image, the reference and p, whose output adds to the
    # U-Net's correction Δ_r. The U-Net reads the unified features, built to drop what differs
    # between modalities and with it the noise texture a restoration must subtract: trained on
    # them alone, the CPU checkpoints' restoration of low-dose SPECT tied its input.
    image_restoration_width: int = 0

    def __post_init__(self) -> None:
        def fail(problem: str) -> None:
            raise InputError(problem, _SOURCE)

        if self.spatial_dims not in (2, 3):
            fail(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for name in ("in_channels", "feature_channels", "patch_size", "embed_dim", "d_state",
                     "d_conv", "expand", "prompt_length", "num_classes", "num_regblocks",
                     "correlation_radius", "correlation_levels", "lora_rank", "head_dim", "slab_size",
                     "matching_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.image_restoration_width, int) or self.image_restoration_width < 0:
            fail(f"image_restoration_width must be a non-negative integer, got {self.image_restoration_width!r}")
        if not isinstance(self.matching_range, int) or self.matching_range < 0:
            fail(f"matching_range must be a non-negative integer, got {self.matching_range!r}")
        for name in ("pool_readout_std", "readout_patch_statistics", "classifier_statistics_only",
                     "statistics_before_alignment"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.classifier_statistics_only and not self.readout_patch_statistics:
            fail("classifier_statistics_only needs readout_patch_statistics: true")
        if self.statistics_before_alignment and not self.readout_patch_statistics:
            fail("statistics_before_alignment needs readout_patch_statistics: true")
        if not isinstance(self.matching_mutual_information, bool):
            fail(f"matching_mutual_information must be true or false, got {self.matching_mutual_information!r}")
        if not self.displacement_scale > 0:
            fail(f"displacement_scale must be positive, got {self.displacement_scale!r}")
        object.__setattr__(self, "regblock_channels", tuple(self.regblock_channels))
        object.__setattr__(self, "unet_channels", tuple(self.unet_channels))
        if self.patch_size & (self.patch_size - 1):
            fail(f"patch_size must be a power of two, got {self.patch_size}")
        if self.upsampling_regblocks > self.num_regblocks:
            fail(f"patch_size {self.patch_size} needs {self.upsampling_regblocks} upsampling "
                 f"RegBLKs but num_regblocks is {self.num_regblocks}")
        if len(self.regblock_channels) != self.num_regblocks:
            fail(f"regblock_channels has {len(self.regblock_channels)} entries, "
                 f"expected num_regblocks={self.num_regblocks}")
        if not self.unet_channels:
            fail("unet_channels must list at least one width")
        # Widths that enter a channel attention must split into heads of head_dim channels;
        # the last RegBLK's output only feeds the output convs.
        attended = {"regblock_channels": self.regblock_channels[:-1],
                    "unet_channels": self.unet_channels}
        for name, widths in attended.items():
            for width in widths:
                if width % self.head_dim:
                    fail(f"{name} entries must be multiples of head_dim={self.head_dim}, "
                         f"got {width}")
        if min(self.regblock_channels + self.unet_channels) < 1:
            fail("regblock_channels and unet_channels must be positive")
        if self.embed_dim % self.head_dim:
            fail(f"embed_dim={self.embed_dim} must be a multiple of head_dim={self.head_dim}")
        if self.slab_size % self.patch_size:
            fail(f"slab_size={self.slab_size} must be a multiple of patch_size={self.patch_size}")

    @property
    def upsampling_regblocks(self) -> int:
        """How many RegBLKs (the last ones) double the resolution: log2(Q)."""
        return int(math.log2(self.patch_size))

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be divisible by this (patching and U-Net pooling)."""
        return math.lcm(self.patch_size, 2 ** (len(self.unet_channels) - 1))

    @property
    def inner_dim(self) -> int:
        """Width of the Mamba SSM (and of the hidden states h1..h3)."""
        return self.expand * self.embed_dim

    @property
    def slab_patches(self) -> int:
        """Rows of patches along z per classified slab."""
        return self.slab_size // self.patch_size

    @classmethod
    def paper(cls, spatial_dims: int = 3) -> UniFuseConfig:
        """Full-size network (J = 4 RegBLKs, Ñ = 4, UFR&F ≈ 0.95 M parameters in 3-D)."""
        # 8-voxel cells keep the 3-D cost volume small (9³ offsets for ±32 voxels).
        return cls(spatial_dims=spatial_dims, matching_step=4 if spatial_dims == 2 else 8, pool_readout_std=True)

    @classmethod
    def small(cls, spatial_dims: int = 2) -> UniFuseConfig:
        """A ~50 k-parameter network (2-D; ~100 k in 3-D) for tests and quick CPU training."""
        return cls(
            spatial_dims=spatial_dims, feature_channels=4, patch_size=4, embed_dim=16,
            d_state=4, prompt_length=4, num_regblocks=2, regblock_channels=(16, 8),
            unet_channels=(8, 16), lora_rank=2, head_dim=4, slab_size=8,
            matching_step=4, matching_range=32 if spatial_dims == 2 else 12, pool_readout_std=True,
        )


    def differences(self, other: UniFuseConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's value, other's value)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}
