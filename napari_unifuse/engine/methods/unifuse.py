"""UniFuse as an engine method: its structural matching once, then the network over tiles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from napari_unifuse.engine.methods import MethodOutput, NetworkMethod
from napari_unifuse.model.mi_refinement import never_cancelled
from napari_unifuse.model.networks import network_available

DEFAULT_CHECKPOINTS = {2: "unifuse-2d-harvard", 3: "unifuse-3d-phantom"}
SUPPORTED_DIMS = (2, 3)


class Method(NetworkMethod):
    name = "unifuse"
    guarded = True
    refines_alignment = True
    channels_last_on_cpu = True
    restores = True
    estimates_degradation = True

    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
        return self.network.initial_alignment(moving, reference, spacing=spacing, check_cancelled=check_cancelled)

    def predict_tile(self, moving: torch.Tensor, reference: torch.Tensor, field: torch.Tensor, *,
                     fixed_field: bool,
                     class_probs: torch.Tensor | None = None) -> MethodOutput:
        output = self.network.refine(moving, reference, field, fixed_field=fixed_field, class_probs=class_probs)
        return MethodOutput(output.fused, output.restored, output.displacement, output.class_probs,
                            output.slice_class_probs, output.fusion_weight)

    def classify_tile(self, moving: torch.Tensor,
                      reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.network.classify(moving, reference)

    def use_training_crop(self, crop: int | None) -> None:
        # DAPL's GroupNorm sees the whole input: it reads windows of the crop, whatever the tile size.
        self.network.dapl.readout_window = crop

    def check_dimensions(self, ndim: int, source: str) -> None:
        """UniFuse is 2D and 3D; a checkpoint of the other dimensionality is ``FusionEngine.validate``'s message."""


def available() -> bool:
    return network_available("unifuse")


def load(*, checkpoint: str | Path | None, spatial_dims: int) -> Method:
    return Method.from_checkpoint("unifuse", checkpoint, DEFAULT_CHECKPOINTS, spatial_dims)
