"""A moving image whose header places it several millimetres off, on a reference grid cropped close to
the anatomy: the alignment finds the offset, and the outputs hold the moving image's anatomy where the
field reads it beyond that grid (the moving image is read on its own grid through the field, not taken
onto the reference's grid first, where it was blank beyond the grid's edge)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.io import Geometry, ImageVolume

REFERENCE_SHAPE = (24, 32, 32)
OFFSET_MM = 6.0


def _anatomy(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Blobs that fill the reference grid and reach past it along x."""
    rng = np.random.default_rng(3)
    out = np.zeros(np.broadcast(z, y, x).shape)
    for _ in range(40):
        centre, radius = rng.uniform([2, 2, -12], [22, 30, 44]), rng.uniform(3, 6)
        out += np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / (2 * radius**2))
    return out.astype(np.float32)


def _volume(shape: tuple[int, int, int], origin_x: float, shift_x: float = 0.0) -> ImageVolume:
    z, y, x = np.indices(shape, dtype=np.float64)
    return ImageVolume(_anatomy(z, y, x + origin_x + shift_x),
                       Geometry(np.ones(3), np.array([0.0, 0.0, origin_x]), np.eye(3)))


def test_a_field_reading_tissue_beyond_the_reference_grid_brings_it_in():
    reference = _volume(REFERENCE_SHAPE, 0.0)
    moving = _volume((24, 32, 56), -12.0, OFFSET_MM)  # reaches 12 mm past the reference on either side in x
    result = FusionEngine(load_method("matching+average", spatial_dims=3), device="cpu").run_fusion(
        reference, moving, quality=False)
    assert result.displacement[2].mean() == pytest.approx(-OFFSET_MM, abs=0.5)
    # The band the field reads from beyond the grid holds the anatomy, as the reference shows it there.
    band = (slice(None), slice(None), slice(0, 4))
    np.testing.assert_allclose(result.aligned.array[band], reference.array[band], rtol=0,
                               atol=0.1 * reference.array.max())
