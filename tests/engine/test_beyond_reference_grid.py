"""A moving image whose header places it several millimetres off, on a reference grid cropped close to
the anatomy: the alignment finds the offset, but the moving image is taken onto the reference's grid
before it is aligned, so the outputs are blank where the field reads beyond that grid. The run says so."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.inference import FusionEngine, beyond_reference_grid_warnings
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


@pytest.mark.parametrize(("shift_x", "warned"), [(0.0, False), (OFFSET_MM, True)])
def test_a_field_reading_tissue_beyond_the_reference_grid_is_said(shift_x, warned):
    reference = _volume(REFERENCE_SHAPE, 0.0)
    moving = _volume((24, 32, 56), -12.0, shift_x)  # reaches 12 mm past the reference on either side in x
    result = FusionEngine(load_method("matching+average", spatial_dims=3), device="cpu").run_fusion(
        reference, moving, quality=False)
    said = [warning for warning in result.warnings if "beyond the reference's grid" in warning]
    assert bool(said) == warned, result.warnings
    if warned:
        assert result.displacement[2].mean() == pytest.approx(-OFFSET_MM, abs=0.5)
        # The outputs are blank in the band the field reads from beyond the grid, as the warning says.
        assert result.aligned.array[:, :, :4].max() < 0.05 * result.aligned.array.max()


def test_the_share_counts_only_tissue_the_field_reads_beyond_the_grid():
    reference = ImageVolume(np.zeros((4, 10, 10), np.float32), Geometry.identity(3))
    tissue = np.zeros((4, 10, 20), bool)
    tissue[:, :, :5] = True  # the moving image's tissue: x in [-5, 0) mm, beyond the reference's grid
    moving_tissue = ImageVolume(tissue, Geometry(np.ones(3), np.array([0.0, 0.0, -5.0]), np.eye(3)))
    displacement = np.zeros((3, 4, 10, 10), np.float32)
    assert beyond_reference_grid_warnings(moving_tissue, reference, displacement) == []
    displacement[2] = -4.0  # x reads x - 4: x = 0..2 read tissue at -4..-2, beyond the one-voxel margin
    (warning,) = beyond_reference_grid_warnings(moving_tissue, reference, displacement)
    assert "on 30 % of the grid (slices 0-3)" in warning
    displacement[2] = 4.0  # reads inside the grid and past its other edge, where the moving image has no tissue
    assert beyond_reference_grid_warnings(moving_tissue, reference, displacement) == []
