"""What input shapes a model can take, read off its config, so that the engine can refuse the rest
with a message that names the limit instead of failing deep inside the network.

One function per limit, so that whoever changes the architecture (a thinner first cost volume, a
matching that works in-plane on thin axes) updates the limit here, next to the reason, and the
tests that probe the engine at the limit (``tests/engine/test_input_checks.py``) follow.
"""

from __future__ import annotations

from typing import Any

from napari_unifuse.io import ImageVolume
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.costs import minimum_size


def minimum_padded_side(config: Any) -> int:
    """The smallest side, after padding to ``config.size_multiple``, that a forward pass accepts.

    UniFuse's limit is its first RegBLK's cost volume (``model.costs.minimum_size``, the one place
    that knows it, also behind ``unifuse info``); it bounds the tile size too.
    """
    if not isinstance(config, UniFuseConfig):
        # The other methods' networks (engine.methods) pool only within their size multiple.
        return config.size_multiple
    return minimum_size(config)


def minimum_input_side(config: Any) -> int:
    """The smallest number of voxels along any axis of the reference grid the engine can fuse.

    The engine zero-pads every side up to the next multiple of ``config.size_multiple`` before the
    network sees it, so the smallest input is the one that pads up to :func:`minimum_padded_side`.
    The structural matching (``model/matching.py``) needs no minimum: on axes shorter than its
    blocks it keeps the candidates it can compare (no motion at the least).
    """
    return minimum_padded_side(config) - config.size_multiple + 1


def model_dimensions(reference: ImageVolume) -> int:
    """The dimensionality of the model that fuses onto ``reference``: a one-slice volume (64×64×1,
    a 2D image stored as 3D) is a 2D image; pooling a 3D network over one slice cannot work."""
    return 2 if reference.single_slice_axis is not None else reference.ndim
