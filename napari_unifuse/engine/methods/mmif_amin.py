"""MMIF-AMIN as an engine method: an alignment you choose, then the fusion network over tiles.

``alignment``: ``matching`` (UniFuse's parameter-free structural matching, the default),
``sitk`` (SimpleITK rigid + B-spline) or ``none`` (the pair is taken as aligned); each is
``engine.classical``'s registration of that name, run once on the whole input. The engine's
alignment guard then keeps the identity unless that field reliably improves the pair, as for
UniFuse: unguarded, the matching moved co-registered Harvard pairs by 2.5–6.6 px on average.
MMIF-AMIN neither restores nor estimates the degradation (reported as unknown), and is 2D only,
like its paper.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_unifuse.engine.methods import MATCHING, SIMPLEITK, MethodOutput, NetworkMethod
from napari_unifuse.engine.methods.pipelines import registration_field
from napari_unifuse.errors import InputError
from napari_unifuse.model.mi_refinement import never_cancelled
from napari_unifuse.model.networks import network_available

DEFAULT_CHECKPOINTS = {2: "mmif-amin-2d-harvard"}
SUPPORTED_DIMS = (2,)
# Option name -> engine.classical registration.
ALIGNMENTS = {"matching": "matching", "sitk": "sitk", "none": "identity"}
DEFAULT_ALIGNMENT = "matching"
# Option name -> the estimate's name in the alignment guard's decision and the provenance
# (``none`` is not guarded).
GUARD_NAMES = {"matching": MATCHING, "sitk": SIMPLEITK}


class Method(NetworkMethod):
    supported_dims = SUPPORTED_DIMS

    def __init__(self, network: nn.Module, checkpoint: Path | None = None, checkpoint_name: str | None = None,
                 checkpoint_metadata: dict[str, Any] | None = None, alignment: str = DEFAULT_ALIGNMENT) -> None:
        if alignment not in ALIGNMENTS:
            raise InputError(f"unknown alignment {alignment!r} for mmif-amin; choose from {', '.join(ALIGNMENTS)}",
                             "--alignment")
        super().__init__(network, checkpoint, checkpoint_name, checkpoint_metadata)
        self.alignment = alignment
        self.guarded = alignment in GUARD_NAMES
        self.initial_alignment_name = GUARD_NAMES.get(alignment, self.initial_alignment_name)
        self.name = "mmif-amin" if alignment == DEFAULT_ALIGNMENT else f"mmif-amin:{alignment}"

    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor:
        # engine.classical's registrations run to their end: a Cancel takes effect after this one.
        return registration_field(ALIGNMENTS[self.alignment], moving, reference, spacing)

    def predict_tile(self, moving: torch.Tensor, reference: torch.Tensor, field: torch.Tensor, *,
                     fixed_field: bool,
                     class_probs: torch.Tensor | None = None) -> MethodOutput:
        return MethodOutput(self.network(moving, reference), moving, field)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "alignment": self.alignment,
                "registration": ALIGNMENTS[self.alignment]}


def available() -> bool:
    return network_available("mmif-amin")


def load(*, checkpoint: str | Path | None, spatial_dims: int, alignment: str = DEFAULT_ALIGNMENT) -> Method:
    return Method.from_checkpoint("mmif-amin", checkpoint, DEFAULT_CHECKPOINTS, spatial_dims, alignment=alignment)
