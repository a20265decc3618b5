"""The workbench's review maps and metrics of a layer not in world axis order (a script's layer with its
slices head to foot, or its axes permuted): the run's outputs lie on the reference's grid in world axis
order, and the reference, the label and the maps must be compared with them there."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.analysis import RunRequest, run_and_analyse, volume_metrics
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.io import Geometry, ImageVolume

SHAPE = (14, 22, 18)
GEOMETRY = Geometry(np.array([1.5, 1.2, 1.1]), np.array([2.0, 5.0, -10.0]), np.eye(3))


def _blob(height: float, peak: float, base: float) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, side) for side in SHAPE), indexing="ij")
    return (base + peak * np.exp(-3 * ((z - height) ** 2 + y**2 + x**2))).astype(np.float32)


def _stored(array: np.ndarray, storage: str, source: str) -> ImageVolume:
    if storage == "head_to_foot":
        return ImageVolume(np.ascontiguousarray(array[::-1]), GEOMETRY.reversed_along(0, SHAPE[0]), source=source)
    if storage == "coronal":
        return ImageVolume(np.ascontiguousarray(array.transpose(1, 0, 2)), GEOMETRY.transposed([1, 0, 2]), source=source)
    return ImageVolume(array, GEOMETRY, source=source)


def _analysed(storage: str, engine: FusionEngine):
    reference, moving = _blob(0.5, 1000, 100), _blob(0.45, 400, 50)
    request = RunRequest(_stored(reference, storage, "ref"), _stored(moving, storage, "mov"), "untrained",
                         device="cpu", label=_stored(moving, storage, "label"))
    outcome = run_and_analyse(request, engine, lambda *_: None, CancelToken())
    return outcome, volume_metrics(outcome)


@pytest.mark.parametrize("storage", ["head_to_foot", "coronal"])
def test_a_layer_not_in_world_axis_order_is_reviewed_as_the_same_voxels_stored_axially(storage, smallest_unifuse):
    """Head to foot: the error map differed by up to 363 and Q_cc fell from 0.999 to 0.485, the
    reference's slices compared reversed; coronal: "aligned and label are not on one grid"."""
    engine = FusionEngine(smallest_unifuse(3), device="cpu")
    axial, axial_metrics = _analysed("axial", engine)
    other, other_metrics = _analysed(storage, engine)
    np.testing.assert_array_equal(other.result.fused.array, axial.result.fused.array)
    for name in ("error_map", "reference_units", "reference_grey", "label_units"):
        np.testing.assert_allclose(getattr(other, name), getattr(axial, name), atol=1e-6, err_msg=name)
    assert other_metrics == pytest.approx(axial_metrics, nan_ok=True)
