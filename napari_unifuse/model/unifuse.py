"""UniFuse (ICCV 2025): DAPL → OUFR → FA → warp → UFR&F in one network.

Ours before it: structural matching (model/matching.py) moves the moving image by a parameter-free
first estimate, and FA predicts the correction of what is left (docs/architecture.md, deviations).

``UniFuse(config)(moving, reference)`` takes the degraded, misaligned moving image I'_D and the
high-quality reference I_R, (B, in_channels, *spatial) in [0, 1], and returns a
:class:`UniFuseOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from napari_unifuse.errors import InputError
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.dapl import DegradationAwarePromptLearning
from napari_unifuse.model.fa import FeatureAlignment
from napari_unifuse.model.matching import structural_matching
from napari_unifuse.model.mi_refinement import never_cancelled
from napari_unifuse.model.oufr import OmniUnifiedFeatureRepresentation
from napari_unifuse.model.scan import scan_backend
from napari_unifuse.model.ufrf import RestorationFusion
from napari_unifuse.model.warp import compose, warp


@dataclass
class UniFuseOutput:
    fused: torch.Tensor              # I_fuse (B, 1, *spatial) in [0, 1]
    restored: torch.Tensor           # restored moving image aligned to the reference, [0, 1]
    displacement: torch.Tensor       # φ (B, ndim, *spatial): voxels, array-axis order; sampling
                                     # the moving image at x + φ(x) aligns it to the reference
    initial_displacement: torch.Tensor  # structural matching's part of φ, which the network's
                                        # input was moved by (zero when matching is off)
    class_logits: torch.Tensor | None  # (B, Ñ), classes in DEGRADATION_CLASSES order; None when routed by a given p
    class_probs: torch.Tensor        # p = softmax(class_logits), or the p refine() was given
    slice_class_probs: torch.Tensor  # (B, S, Ñ): per z-slab of cfg.slab_size voxels; 2-D: S = 1
    prompts: torch.Tensor            # P̂ (B, Ñ, L, M)
    moving_features: torch.Tensor    # F̄'_D tokens (B, N, M), for L_moda
    reference_features: torch.Tensor  # F̄_R tokens (B, N, M), for L_moda
    fusion_weight: torch.Tensor      # w (B, 1, *spatial): the reference's share of I_fuse's blend


class UniFuse(nn.Module):
    method = "unifuse"  # model.networks: the name checkpoints record
    config_class = UniFuseConfig

    def __init__(self, config: UniFuseConfig) -> None:
        super().__init__()
        self.config = config
        self.dapl = DegradationAwarePromptLearning(config)
        self.oufr = OmniUnifiedFeatureRepresentation(config)
        self.fa = FeatureAlignment(config)
        self.ufrf = RestorationFusion(config)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> UniFuseOutput:
        self._check_inputs(moving, reference)
        initial = self.initial_alignment(moving, reference)
        return self.refine(self.moved_by(moving, initial), reference, initial, acquired=moving)

    @staticmethod
    def moved_by(moving: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """``moving`` moved by an initial field for training's :meth:`refine` (and DAPL's read-out), the
        border replicated; the engine fills beyond the image with zeros instead (docs/architecture.md)."""
        return warp(moving, initial, padding_mode="border")

    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
        """Structural matching's field (B, ndim, *spatial) for the pair (zero when
        ``config.matching_range`` is 0). Not trained; the engine computes it once for a whole
        volume, so that tiles share one estimate, and passes the voxel ``spacing`` (mm, array
        axes) so that the matching's image pyramid pools towards isotropic voxels, and its
        ``check_cancelled``, which the matching calls at every step and which stops it by raising."""
        cfg = self.config
        if cfg.matching_range == 0:
            return moving.new_zeros(moving.shape[0], cfg.spatial_dims, *moving.shape[2:])
        return structural_matching(moving, reference, cfg.matching_step, cfg.matching_range,
                                   mutual_information_refinement=cfg.matching_mutual_information,
                                   spacing=spacing, check_cancelled=check_cancelled)

    def refine(self, moving: torch.Tensor, reference: torch.Tensor,
               initial: torch.Tensor, *, fixed_field: bool = False,
               acquired: torch.Tensor | None = None,
               class_probs: torch.Tensor | None = None) -> UniFuseOutput:
        """The network on ``moving`` already warped by ``initial`` (:meth:`initial_alignment` of
        the unwarped pair): FA predicts the correction, and the output field is both composed.

        ``fixed_field``: skip FA, so that ``initial`` is the whole field; the engine uses it to
        restore and fuse with the estimate its alignment guard kept (identity or the matching's).
        ``acquired``: ``moving`` before the warp, which DAPL's statistics read when the config's
        ``statistics_before_alignment`` is set (required then, unless ``class_probs`` is given).
        ``class_probs`` (B, Ñ): p read elsewhere (the engine reads it with :meth:`classify` on the
        moving image as given); it routes FA and UFR&F and is returned as the output's p, in place
        of what DAPL reads on this input.
        """
        self._check_inputs(moving, reference)
        if class_probs is None:
            dapl = self.dapl(moving, reference, self.statistics_input(acquired, moving))
            class_probs = torch.softmax(dapl.class_logits, dim=-1)
            slice_class_probs = torch.softmax(dapl.slice_class_logits, dim=-1)
        else:  # routed: DAPL's own class read-out would be computed for nothing
            dapl = self.dapl(moving, reference, read_class=False)
            slice_class_probs = class_probs[:, None].expand(-1, self.slab_count(moving.shape[2:]), -1)
        # p weights the prompt guidance and ALSN's LoRA experts, but only L_ce trains it: p is
        # shown to the user as the degradation estimate, so it must stay a classifier's answer,
        # not whatever gate suits the fusion losses (their gradients would outweigh L_ce's).
        routing = class_probs.detach()
        unified = self.oufr(dapl.moving_features, dapl.reference_features, dapl.hidden_states)
        if fixed_field:
            correction = initial.new_zeros(initial.shape)
        else:
            correction = self.fa(unified.moving_map, unified.reference_map, dapl.prompts, routing)
        fused, restored, fusion_weight = self.ufrf(warp(unified.moving_full, correction), unified.reference_full,
                                    warp(moving, correction, padding_mode="border"), reference, dapl.prompts, routing)
        return UniFuseOutput(
            fused=fused, restored=restored, displacement=compose(initial, correction),
            initial_displacement=initial,
            class_logits=dapl.class_logits, class_probs=class_probs, slice_class_probs=slice_class_probs,
            prompts=dapl.prompts, moving_features=unified.moving_tokens,
            reference_features=unified.reference_tokens, fusion_weight=fusion_weight,
        )

    def classify(self, moving: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p (B, Ñ), per-slab p (B, S, Ñ)) of ``moving`` as given, against ``reference`` on its
        grid: DAPL's class read-out alone, no matching, so the read-out sees the image as it was acquired."""
        self._check_inputs(moving, reference)
        class_logits, slice_class_logits = self.dapl.classify(moving, reference, self.statistics_input(moving, moving))
        return torch.softmax(class_logits, dim=-1), torch.softmax(slice_class_logits, dim=-1)

    def slab_count(self, spatial: tuple[int, ...] | torch.Size) -> int:
        """S of the per-slab read-out for an input of this spatial shape: slabs of
        ``slab_patches`` patch rows along z, the last one thinner (3-D); 1 in 2-D."""
        if self.config.spatial_dims == 2:
            return 1
        return math.ceil((spatial[0] // self.config.patch_size) / self.config.slab_patches)

    def statistics_input(self, acquired: torch.Tensor | None, moving: torch.Tensor) -> torch.Tensor | None:
        """What DAPL takes the moving image's patch statistics on: ``acquired`` when the config
        asks for it, else ``None`` (the moved image)."""
        if not self.config.statistics_before_alignment:
            return None
        if acquired is None or acquired.shape != moving.shape:
            raise ValueError("this network's degradation head reads the moving image before the initial alignment: "
                             f"pass it as acquired= with the moving image's shape {tuple(moving.shape)}")
        return acquired

    def unified_features(self, moving: torch.Tensor,
                         reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OUFR tokens (F̄ of ``moving``, F̄ of ``reference``), each (B, N, M), of the pair as
        given (no matching), without FA/UFR&F; the second pass of L_moda (Eq. 4).
        """
        self._check_inputs(moving, reference)
        dapl = self.dapl(moving, reference)
        unified = self.oufr(dapl.moving_features, dapl.reference_features, dapl.hidden_states)
        return unified.moving_tokens, unified.reference_tokens

    def _check_inputs(self, moving: torch.Tensor, reference: torch.Tensor) -> None:
        cfg = self.config
        expected = (f"(batch, {cfg.in_channels}, " + ", ".join(["size"] * cfg.spatial_dims)
                    + f") with every size a multiple of {cfg.size_multiple}")
        for name, image in (("moving", moving), ("reference", reference)):
            shape = tuple(image.shape)
            if (image.dim() != cfg.spatial_dims + 2 or shape[1] != cfg.in_channels
                    or any(size % cfg.size_multiple or size == 0 for size in shape[2:])):
                raise InputError(f"expected a tensor of shape {expected}, got {shape}", name)
        if moving.shape != reference.shape:
            raise InputError(f"moving {tuple(moving.shape)} and reference "
                             f"{tuple(reference.shape)} must have the same shape", "UniFuse")

    def extra_repr(self) -> str:
        device = next(self.parameters()).device
        return (f"spatial_dims={self.config.spatial_dims}, "
                f"size_multiple={self.config.size_multiple}, scan={scan_backend(device)}")
