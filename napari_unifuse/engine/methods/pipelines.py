"""The classical pipelines as engine methods: a registration (``engine.classical``), then a rule.

``<registration>+<rule>``, e.g. ``sitk+wavelet``: the registration runs once on the whole input as
the initial alignment, the rule fuses the reference with the moved moving image tile by tile
(the engine uses one tile unless ``--tile-size`` asks for more). Nothing is restored and no
degradation is estimated. ``registration_field`` is also how MMIF-AMIN aligns before it fuses.
The registration sees the reference's voxel spacing, so it measures in mm as ``unifuse evaluate``'s
classical rows and UniFuse's SimpleITK estimate do (on thick slices unit spacing misled it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_unifuse.engine import classical
from napari_unifuse.engine.methods import FusionMethod, MethodOutput
from napari_unifuse.errors import InputError
from napari_unifuse.model.mi_refinement import never_cancelled

SUPPORTED_DIMS = (2, 3)


@dataclass(frozen=True)
class PipelineConfig:
    registration: str
    rule: str
    spatial_dims: int
    size_multiple: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registration_field(registration: str, moving: torch.Tensor, reference: torch.Tensor,
                       spacing: tuple[float, ...] | None = None) -> torch.Tensor:
    """``engine.classical.register``'s field for a ``(1, 1, *spatial)`` pair, as ``(1, ndim, *spatial)``
    voxels; ``spacing``: mm per array axis (None: 1 mm)."""
    as_array = (lambda image: image[0, 0].detach().cpu().numpy().astype(np.float32))
    reference_array = as_array(reference)
    geometry = classical.grid_geometry(spacing, reference_array.ndim)
    field = classical.register(registration, reference_array, as_array(moving), geometry).displacement
    return torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None].to(moving.device)


class Pipeline(FusionMethod):
    def __init__(self, registration: str, rule: str, spatial_dims: int) -> None:
        if rule not in classical.FUSION_RULES:
            raise InputError(f"unknown fusion rule {rule!r}; choose from {', '.join(classical.FUSION_RULES)}", rule)
        self.config = PipelineConfig(registration, rule, spatial_dims)
        self.name = f"{registration}+{rule}"
        self.checkpoint_metadata = {}

    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
        # engine.classical's registrations run to their end: a Cancel takes effect after this one.
        return registration_field(self.config.registration, moving, reference, spacing)

    def predict_tile(self, moving: torch.Tensor, reference: torch.Tensor, field: torch.Tensor, *,
                     fixed_field: bool,
                     class_probs: torch.Tensor | None = None) -> MethodOutput:
        fused = classical.fuse_classical(self.config.rule, reference[0, 0].cpu().numpy(), moving[0, 0].cpu().numpy())
        return MethodOutput(torch.from_numpy(fused)[None, None].to(moving.device), moving, field)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "registration": self.config.registration, "rule": self.config.rule}


def available(registration: str, rule: str) -> bool:
    return registration in classical.available_registration_methods()


def load(*, checkpoint: str | Path | None, spatial_dims: int, registration: str, rule: str) -> Pipeline:
    if checkpoint is not None:
        raise InputError(f"{registration}+{rule} has no trained weights: give it no checkpoint", "--checkpoint")
    return Pipeline(registration, rule, spatial_dims)
