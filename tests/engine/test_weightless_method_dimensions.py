"""A method without trained weights (a classical pipeline) loaded for the other dimensionality is
refused with a remedy that fits it: there is no checkpoint to change, only ``spatial_dims``."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume


def _pair(shape: tuple[int, ...]) -> tuple[ImageVolume, ImageVolume]:
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    return ImageVolume(image, Geometry.identity(len(shape))), ImageVolume(image.copy(), Geometry.identity(len(shape)))


@pytest.mark.parametrize(("built_for", "shape"), [(2, (24, 24, 24)), (3, (40, 36))])
def test_a_pipeline_for_the_other_dimensionality_is_told_to_load_it_for_the_images(built_for, shape):
    dims = len(shape)
    engine = FusionEngine(load_method("identity+max", spatial_dims=built_for), device="cpu")
    with pytest.raises(InputError) as refused:
        engine.run_fusion(*_pair(shape), quality=False)
    message = str(refused.value)
    assert "checkpoint" not in message and "in-memory model" not in message
    assert message.startswith(f"identity+max: this method was built for {built_for}D images but the images are {dims}D")
    assert f"load_method('identity+max', spatial_dims={dims})" in message
