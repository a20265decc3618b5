"""The trainable networks by method name, for checkpoints and training (pure torch, no engine).

A network class names its method and its config class::

    class MyNet(nn.Module):
        method = "my-method"          # the name checkpoints record and the registries use
        config_class = MyNetConfig    # frozen dataclass: small(spatial_dims), paper(spatial_dims),
                                      # from_dict, to_dict, spatial_dims, size_multiple
        def __init__(self, config: MyNetConfig): ...

Entries are "module:Class" strings, imported only when asked for, so that a method whose module
is missing (or broken) does not stop the others from loading.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from napari_unifuse.errors import CheckpointError

NETWORKS: dict[str, str] = {
    "unifuse": "napari_unifuse.model.unifuse:UniFuse",
    "bsafusion": "napari_unifuse.model.bsafusion:BSAFusion",
    "mmif-amin": "napari_unifuse.model.mmif_amin:MMIFAMIN",
}
PRESETS = ("small", "paper")


def network_class(method: str) -> type[nn.Module]:
    """The network class of ``method``; a ``CheckpointError`` names the known ones otherwise."""
    if method not in NETWORKS:
        raise CheckpointError(f"unknown network {method!r}; known: {', '.join(NETWORKS)}")
    module_name, class_name = NETWORKS[method].split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"the {method} network ({NETWORKS[method]}) is not available: {error}") from error


def network_available(method: str) -> bool:
    """Whether ``method``'s network class imports here."""
    try:
        network_class(method)
    except CheckpointError:
        return False
    return True


def network_method(network: nn.Module) -> str:
    """The method name a network instance belongs to (UniFuse when it does not say)."""
    return str(getattr(network, "method", "unifuse"))


def config_from_dict(method: str, values: dict[str, Any]):
    return network_class(method).config_class.from_dict(values)


def build_network(method: str, preset: str, spatial_dims: int, overrides: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised ``method`` network from a preset and field overrides."""
    cls = network_class(method)
    base = getattr(cls.config_class, preset)(spatial_dims=spatial_dims)
    config = cls.config_class.from_dict({**base.to_dict(), **(overrides or {})})
    return cls(config)
