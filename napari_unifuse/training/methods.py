"""What training needs per method: its loss section, its training forward, its losses, its validation.

A config's ``model.method`` (``unifuse`` by default, ``bsafusion``, ``mmif-amin``) picks the
network (``model.networks``) and, here, its objective. Each entry is a module exposing
``OBJECTIVE``, imported on demand so that a method's training code loads only when it trains.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from napari_unifuse.errors import InputError

OBJECTIVES: dict[str, str] = {
    "unifuse": "napari_unifuse.training.objective",
    "bsafusion": "napari_unifuse.training.bsafusion_objective",
    "mmif-amin": "napari_unifuse.training.mmif_amin_objective",
}
# The validation score the trainer keeps the best checkpoint by (every method reports it):
# metrics.ssim_gains(...).minimum of the fused image against (reference, label).
BEST_SCORE = "fusion_gain_min"


@dataclass(frozen=True)
class Objective:
    """``loss_section``: the frozen dataclass a config's ``loss`` section is read into.
    ``training_model(network, loss)``: the module the trainer calls with a batch (wrapped in
    DistributedDataParallel when distributed); its output goes to ``losses(output, batch, loss)``,
    which returns each term's unweighted value and ``total``. ``validate(network, loader, device,
    max_batches)`` returns scores including ``BEST_SCORE``."""

    loss_section: type
    training_model: Callable[[nn.Module, Any], nn.Module]
    losses: Callable[[Any, dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    validate: Callable[[nn.Module, DataLoader, torch.device, int | None], dict[str, float]]


def objective_for(method: str, source: str | None = None) -> Objective:
    if method not in OBJECTIVES:
        raise InputError(f"model.method must be one of {', '.join(OBJECTIVES)}, got {method!r}", source)
    try:
        return importlib.import_module(OBJECTIVES[method]).OBJECTIVE
    except ImportError as error:
        raise InputError(f"training the {method} method is not available: {error}", source) from error
