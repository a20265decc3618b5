"""BSAFusion as an engine method: one stage, the network aligns and fuses each tile itself.

No initial alignment (the paper's method is one-stage: its bidirectional stepwise feature
alignment predicts the whole field); the network's field is used as it comes (no alignment guard).
It restores nothing and estimates no degradation (its modality heads classify the role of each
image, not a degradation), and it is 2D only, like its paper.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from napari_unifuse.engine.methods import MethodOutput, NetworkMethod
from napari_unifuse.model.mi_refinement import never_cancelled
from napari_unifuse.model.networks import network_available
from napari_unifuse.model.warp import compose

DEFAULT_CHECKPOINTS = {2: "bsafusion-2d-harvard"}
SUPPORTED_DIMS = (2,)


class Method(NetworkMethod):
    name = "bsafusion"
    supported_dims = SUPPORTED_DIMS

    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
        return moving.new_zeros(moving.shape[0], 2, *moving.shape[2:])

    def predict_tile(self, moving: torch.Tensor, reference: torch.Tensor, field: torch.Tensor, *,
                     fixed_field: bool,
                     class_probs: torch.Tensor | None = None) -> MethodOutput:
        output = self.network(moving, reference)
        # The tile arrives moved by `field` (zero unless a caller gives one): the whole field is both.
        return MethodOutput(output.fused, output.aligned, compose(field, output.displacement))


def available() -> bool:
    return network_available("bsafusion")


def load(*, checkpoint: str | Path | None, spatial_dims: int) -> Method:
    return Method.from_checkpoint("bsafusion", checkpoint, DEFAULT_CHECKPOINTS, spatial_dims)
