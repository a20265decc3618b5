"""The classical registrations of the engine's methods (``sitk+*``, ``ants+*``, ``mmif-amin:sitk``)
register in mm on the reference's voxel grid, as ``unifuse evaluate``'s classical rows and
UniFuse's own SimpleITK estimate do, not on unit spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, shift

from napari_unifuse.engine import classical
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.methods.mmif_amin import Method as MMIFAMIN
from napari_unifuse.engine.methods.pipelines import Pipeline
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model.networks import build_network

# Thick rows: 1 mm across the columns, 3 mm between the rows.
ANISOTROPIC = (3.0, 1.0)


def _pair(shape=(48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image in [0, 1] and a copy of it moved by a few voxels."""
    image = gaussian_filter(np.random.default_rng(3).random(shape), 3)
    image = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    return image, shift(image, (1.5, -2.0), order=1, mode="nearest").astype(np.float32)


def _as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image)[None, None]


def _sitk_field(reference: np.ndarray, moving: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    geometry = None if spacing is None else Geometry(np.asarray(spacing), np.zeros(2), np.eye(2))
    return classical.register("sitk", reference, moving, geometry).displacement


@pytest.fixture(scope="module")
def sitk_fields() -> dict[str, np.ndarray]:
    reference, moving = _pair()
    fields = {"mm": _sitk_field(reference, moving, ANISOTROPIC), "unit": _sitk_field(reference, moving, None)}
    # The test means something only where the spacing changes SimpleITK's answer.
    assert np.abs(fields["mm"] - fields["unit"]).max() > 0.05
    return fields


@pytest.mark.parametrize("method", [Pipeline("sitk", "max", 2),
                                    MMIFAMIN(build_network("mmif-amin", "small", 2), alignment="sitk")],
                         ids=["sitk+max", "mmif-amin:sitk"])
def test_the_methods_sitk_alignment_registers_on_the_given_spacing(method, sitk_fields):
    reference, moving = _pair()
    field = method.initial_alignment(_as_batch(moving), _as_batch(reference), spacing=ANISOTROPIC)
    np.testing.assert_array_equal(field[0].numpy(), sitk_fields["mm"])
    unit = method.initial_alignment(_as_batch(moving), _as_batch(reference))
    np.testing.assert_array_equal(unit[0].numpy(), sitk_fields["unit"])


def test_the_engine_gives_a_pipeline_the_reference_spacing():
    reference, moving = _pair()
    on_grid = lambda image, spacing: ImageVolume(image, Geometry(np.asarray(spacing), np.zeros(2), np.eye(2)))  # noqa: E731
    fields = {spacing: FusionEngine(load_method("sitk+max"), device="cpu").run_fusion(
        on_grid(reference, spacing), on_grid(moving, spacing), quality=False).displacement
        for spacing in (ANISOTROPIC, (1.0, 1.0))}
    assert np.abs(fields[ANISOTROPIC] - fields[(1.0, 1.0)]).max() > 0.05
