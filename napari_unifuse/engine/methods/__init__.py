"""Fusion methods the engine runs: UniFuse, BSAFusion, MMIF-AMIN and the classical pipelines.

``engine.inference.FusionEngine`` owns everything around a method (normalisation, resampling onto
the reference grid, padding, tiles with progress, cancel and the out-of-memory fallback, RGB
luma/chroma, the inverse intensity mapping, provenance). A method supplies the two calls that
differ (docs/methods.md):

* ``initial_alignment(moving, reference) -> field``: once, on the whole padded input, ``(1, 1,
  *spatial)`` each; the field is ``(1, ndim, *spatial)`` in the project convention (reference
  voxels, sampling ``moving`` at ``x + u(x)`` aligns it). Zero for a method that does not align.
  ``check_cancelled``: the engine's Cancel, a callable that raises once the user cancelled; a
  method whose alignment loops (UniFuse's structural matching) calls it at every step.
* ``predict_tile(moving, reference, field, fixed_field=..., class_probs=...) -> MethodOutput``: one
  tile of the moving image *already warped by* ``field`` (its part of the initial field), the
  reference, and that field. ``fixed_field``: the engine's alignment guard kept ``field`` as the
  whole field, so a method that refines it must not. ``class_probs`` ``(B, Ñ)``: for a method
  that ``estimates_degradation``, the degradation the engine read with ``classify_tile`` on the
  moving image as given (no interpolation has smoothed what the head reads); the method uses it in
  place of a reading of the moved tile. None for the other methods.
* ``classify_tile(moving, reference) -> (p, per-slab p) | None``: the degradation read-out of one
  tile of the moving image as given and the reference resampled onto its grid; None (the default)
  for a method that estimates no degradation.

The registry maps a name to the module that builds it (``load(...)``), imported on demand so that
a missing optional method (its module, ANTsPy) does not stop the others. Adding a method is one
module with a ``load`` function and one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Self

import torch
from torch import nn

from napari_unifuse.engine.classical import FUSION_RULES, REGISTRATION_METHODS
from napari_unifuse.engine.device import DEVICE_CHOICES, resolve_device
from napari_unifuse.errors import CheckpointError, InputError
from napari_unifuse.model.mi_refinement import never_cancelled

# Names of the initial fields the alignment guard weighs against the identity (its decision and
# the provenance use them): UniFuse's structural matching, SimpleITK's rigid + B-spline, and the
# matching's field refined by a dense MIND optimisation.
MATCHING, SIMPLEITK, DENSE = "matching", "simpleitk", "dense"

_PACKAGE = "napari_unifuse.engine.methods"
# name -> (module, options its load() receives). Classical pipelines: "<registration>+<rule>".
_REGISTRY: dict[str, tuple[str, dict[str, str]]] = {
    "unifuse": (f"{_PACKAGE}.unifuse", {}),
    "bsafusion": (f"{_PACKAGE}.bsafusion", {}),
    "mmif-amin": (f"{_PACKAGE}.mmif_amin", {}),
    **{f"{registration}+{rule}": (f"{_PACKAGE}.pipelines", {"registration": registration, "rule": rule})
       for registration in REGISTRATION_METHODS for rule in FUSION_RULES},
}
# "mmif-amin:sitk" is mmif-amin with alignment="sitk" (methods whose module lists ALIGNMENTS).
OPTION_SEPARATOR = ":"


@dataclass
class MethodOutput:
    """One tile's prediction, batched like the network's input.

    ``fused``, ``restored`` ``(B, 1, *spatial)`` in [0, 1]: ``restored`` is the moving image as the
    method leaves it on the reference (restored, or just moved, for a method that restores nothing).
    ``displacement`` ``(B, ndim, *spatial)``: the whole field, initial alignment included.
    ``class_probs`` ``(B, Ñ)`` and ``slice_class_probs`` ``(B, S, Ñ)`` in
    ``data.degrade.DEGRADATION_CLASSES`` order, or None for a method that estimates no degradation.
    ``fusion_weight`` ``(B, 1, *spatial)``: for a method whose ``fused`` is the blend
    ``w · reference + (1 − w) · restored``, w (what ``engine.fusion_balance`` caps); else None.
    """

    fused: torch.Tensor
    restored: torch.Tensor
    displacement: torch.Tensor
    class_probs: torch.Tensor | None = None
    slice_class_probs: torch.Tensor | None = None
    fusion_weight: torch.Tensor | None = None


class FusionMethod(ABC):
    """What the engine needs from a method; see the module docstring.

    ``config``: has ``spatial_dims``, ``size_multiple`` (inputs are zero-padded to it) and
    ``to_dict()`` (recorded as the provenance's ``model_config``).
    ``guarded``: the engine's alignment guard keeps the identity unless a field reliably improves
    the pair (issue 17's "never worse than doing nothing"); otherwise the field is used as the
    method returns it. The guard weighs the initial alignment, named ``initial_alignment_name``,
    and, for a method that ``refines_alignment`` (UniFuse), the method's own field beside it.
    ``estimates_degradation``: it returns class probabilities and implements ``classify_tile``.
    ``restores``: ``restored`` is a restoration, not just the moved input (evaluate's restoration
    columns). ``supported_dims``: the dimensionalities it can fuse at all (2D-only methods refuse
    3D input with a message saying so).
    """

    name: str
    config: Any
    guarded: bool = False
    refines_alignment: bool = False
    initial_alignment_name: str = MATCHING
    restores: bool = False
    estimates_degradation: bool = False
    supported_dims: tuple[int, ...] = (2, 3)
    checkpoint: Path | None = None  # weights it was loaded from, if any
    checkpoint_name: str | None = None  # as the user gave it
    checkpoint_metadata: dict[str, Any] = {}

    @abstractmethod
    def initial_alignment(self, moving: torch.Tensor, reference: torch.Tensor,
                          spacing: tuple[float, ...] | None = None,
                          check_cancelled: Callable[[], None] = never_cancelled) -> torch.Tensor: ...

    @abstractmethod
    def predict_tile(self, moving: torch.Tensor, reference: torch.Tensor, field: torch.Tensor, *,
                     fixed_field: bool,
                     class_probs: torch.Tensor | None = None) -> MethodOutput: ...

    def classify_tile(self, moving: torch.Tensor,
                      reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(p (B, Ñ), per-slab p (B, S, Ñ))`` of ``moving`` as given (module docstring), or None."""
        return None

    def to(self, device: torch.device | str) -> FusionMethod:
        """Move whatever runs on a device (networks); methods without one ignore it."""
        return self

    def describe(self) -> dict[str, Any]:
        """The method and its options, for provenance and layer names."""
        return {"name": self.name}

    def use_training_crop(self, crop: int | None) -> None:
        """The side of the crops the weights were trained on (``model.checkpoint.training_crop``), for
        methods whose outputs depend on the input's size; the others ignore it."""

    def check_dimensions(self, ndim: int, source: str) -> None:
        if ndim not in self.supported_dims:
            raise InputError(wrong_dimensions_message(self.name, self.supported_dims, ndim), source)


_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


class NetworkMethod(FusionMethod):
    """A method around one trained ``model.networks`` network (``self.network``, eval mode).

    ``channels_last_on_cpu``: on a CPU the network's weights are put in channels-last memory,
    which oneDNN's convolutions run faster (the activations follow the weights); set where it
    was measured to pay and to give the same outputs (UniFuse: bench/results/cpu_layouts.md).
    """

    channels_last_on_cpu: bool = False

    def __init__(self, network: nn.Module, checkpoint: Path | None = None, checkpoint_name: str | None = None,
                 checkpoint_metadata: dict[str, Any] | None = None) -> None:
        # Any: each subclass calls its own network's methods (refine, initial_alignment, ...).
        self.network: Any = network.eval()
        self.config = network.config
        self.checkpoint = checkpoint
        self.checkpoint_name = checkpoint_name
        self.checkpoint_metadata = dict(checkpoint_metadata or {})

    def to(self, device: torch.device | str) -> NetworkMethod:
        device = torch.device(device)
        if self.channels_last_on_cpu and device.type == "cpu":
            self.network.to(device, memory_format=_CHANNELS_LAST[self.config.spatial_dims])
        else:
            self.network.to(device, memory_format=torch.contiguous_format)
        return self

    @classmethod
    def from_checkpoint(cls, network_name: str, checkpoint: str | Path | None, defaults: dict[int, str],
                        spatial_dims: int, **options: Any) -> Self:
        """Load ``checkpoint`` (a path or packaged name; None: ``defaults[spatial_dims]``), refusing
        weights of another method."""
        from napari_unifuse.model.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint

        if checkpoint is None:
            checkpoint = defaults.get(spatial_dims)
            if checkpoint is None or checkpoint not in list_checkpoints():
                available = ", ".join(list_checkpoints()) or "none yet"
                raise CheckpointError(
                    f"no bundled {spatial_dims}D {network_name} checkpoint "
                    f"({checkpoint or 'none exists'}; bundled: {available}); pass one with --checkpoint "
                    f"NAME_OR_FILE.safetensors (train one with `unifuse train`)")
        path = resolve_checkpoint(checkpoint)
        network, metadata = load_checkpoint(path, map_location="cpu", method=network_name)
        return cls(network, path, str(checkpoint), metadata, **options)


def registered_methods() -> tuple[str, ...]:
    """Every registered name, available here or not."""
    return tuple(_REGISTRY)


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_REGISTRY[name][0])
    except ImportError:
        return None


def is_available(name: str) -> bool:
    """Whether ``name`` can run here: its module imports and what it needs is installed."""
    base, _ = split_name(name)
    module = _module(base)
    if module is None:
        return False
    check = getattr(module, "available", None)
    return bool(check(**_REGISTRY[base][1])) if check is not None else True


def available_methods() -> tuple[str, ...]:
    """The registered names that can run in this environment."""
    return tuple(name for name in _REGISTRY if is_available(name))


def methods_for_dimensions(ndim: int) -> tuple[str, ...]:
    """Available methods that accept ``ndim``-D images (from each module's SUPPORTED_DIMS)."""
    return tuple(name for name in available_methods()
                 if ndim in getattr(_module(name), "SUPPORTED_DIMS", (2, 3)))


def wrong_dimensions_message(name: str, supported: tuple[int, ...], ndim: int) -> str:
    only = " or ".join(f"{d}D" for d in supported)
    return (f"{name} fuses {only} images only (as in its paper), not {ndim}D ones; nothing is run slice by "
            f"slice: choose a method for {ndim}D images ({', '.join(methods_for_dimensions(ndim))})")


def split_name(name: str) -> tuple[str, dict[str, str]]:
    """``"mmif-amin:sitk"`` -> ``("mmif-amin", {"alignment": "sitk"})``; unknown names are an InputError."""
    base, separator, option = name.partition(OPTION_SEPARATOR)
    if base not in _REGISTRY:
        raise InputError(f"unknown method {base!r}; choose from {', '.join(registered_methods())}", "--method")
    if not separator:
        return base, {}
    module = _module(base)
    alignments = getattr(module, "ALIGNMENTS", ())
    if option not in alignments:
        raise InputError(f"{base} takes no option {option!r}"
                         + (f"; its alignments: {', '.join(alignments)}" if alignments else ""), "--method")
    return base, {"alignment": option}


def load_method(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                spatial_dims: int = 2, **options: Any) -> FusionMethod:
    """Build the method ``name`` (``available_methods()``, optionally ``NAME:ALIGNMENT``).

    ``checkpoint``: weights for a trained method (path or packaged name; default: the method's
    bundled checkpoint for ``spatial_dims``). ``device``: auto, cuda or cpu, resolved as
    ``FusionEngine`` resolves it (``engine.device.resolve_device``), or a particular device
    (``torch.device("cuda", 1)``, ``"cuda:1"``, a torchrun process's). ``options``: the method's own
    (mmif-amin: alignment).
    """
    base, named_options = split_name(name)
    module = _module(base)
    if module is None or not is_available(base):
        raise InputError(f"the {base} method is not available in this installation "
                         f"(available: {', '.join(available_methods())})", "--method")
    supported = getattr(module, "SUPPORTED_DIMS", (2, 3))
    if spatial_dims not in supported:
        raise InputError(wrong_dimensions_message(base, supported, spatial_dims), "--method")
    placed_on = _method_device(device)  # before the weights load: a wrong device fails at once
    method = module.load(checkpoint=checkpoint, spatial_dims=spatial_dims,
                         **_REGISTRY[base][1], **named_options, **options)
    return method.to(placed_on)


def _method_device(device: str | torch.device) -> torch.device:
    """``load_method``'s device: auto, cuda or cpu resolved as ``FusionEngine`` resolves them; a
    particular device as given, once CUDA is known to be there (else the engine's one line)."""
    if not isinstance(device, torch.device) and str(device).strip().lower() in DEVICE_CHOICES:
        return resolve_device(str(device))
    try:
        particular = torch.device(device)
    except RuntimeError:  # not a device torch knows: the engine's line names the choices
        return resolve_device(str(device))
    if particular.type == "cuda":
        resolve_device("cuda")
    return particular


def method_from_checkpoint(path_or_name: str | Path, device: str | torch.device = "cpu") -> FusionMethod:
    """The method a checkpoint's weights belong to (its header says which), loaded with them."""
    from napari_unifuse.model.checkpoint import checkpoint_method

    return load_method(checkpoint_method(path_or_name), checkpoint=path_or_name, device=device)


def method_for_network(network: nn.Module) -> FusionMethod:
    """A network passed in memory (tests, notebooks) wrapped as its method, without a checkpoint."""
    from napari_unifuse.model.networks import network_method

    module = _module(network_method(network))
    if module is None:
        raise InputError(f"no fusion method for a {type(network).__name__} network", "FusionEngine")
    return module.Method(network)
