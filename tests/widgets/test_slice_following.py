"""The quivers, the plot, the slice metrics, suspicious navigation and 'Flag slice' follow the slice
napari draws: on a tilted volume too, and through renamed output layers."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.analysis import engine_key
from napari_unifuse._qt.outputs import ARROW_WIDTH_VOXELS, OutputNames, show_data_position, viewed_slice
from napari_unifuse.io import Geometry

from .conftest import add_pair
from .test_review import LOST_SLICE, SHAPE, KnownResultEngine, result_with_defects
from .test_workbench import make_workbench, run_and_wait

pytestmark = pytest.mark.gui


def tilted_geometry(degrees: float) -> Geometry:
    """Slices tilted by ``degrees`` between the stored z and y axes, with sub-millimetre pixels."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(3)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return Geometry(np.array([3.0, 0.5, 0.5]), np.array([-20.0, 12.0, 5.0]), rotation)


def drawn_slice_values(layer) -> np.ndarray:
    return np.asarray(layer._slice.image.raw)


@pytest.mark.parametrize("degrees", [15.0, 5.0])
def test_viewed_slice_is_the_slice_napari_draws_of_a_tilted_volume(make_napari_viewer, degrees):
    """napari cuts a tilted volume with the sliders' block of its world → data transform alone: the
    full inverse named slice 6 where napari drew slice 2 (15°). A napari that slices otherwise fails here."""
    viewer = make_napari_viewer()
    index_volume = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 40, 40)).copy()
    layer = viewer.add_image(index_volume, **tilted_geometry(degrees).napari_kwargs())
    for centre_of in (3, 6, 8):
        viewer.dims.set_point(range(3), layer.data_to_world([centre_of, 19.5, 19.5]))
        axis, index = viewed_slice(viewer, layer)
        assert axis == 0 and np.unique(drawn_slice_values(layer)).tolist() == [index]
    for index in (1, 5, 8):
        show_data_position(viewer, layer, [index, 19.5, 19.5])
        assert np.unique(drawn_slice_values(layer)).tolist() == [index]
        assert viewed_slice(viewer, layer) == (0, index)


def test_the_workbench_reviews_the_slice_napari_draws_of_a_tilted_run(make_napari_viewer, qtbot, tmp_path,
                                                                      checkpoint_files, notifications):
    """Quivers, plot marker, slice metrics and 'Flag slice' were of another slice than the one on
    screen, and napari filtered every arrow out."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(12, 40, 40), geometry=tilted_geometry(15.0))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    names = OutputNames.for_inputs("T1", "T2")
    fused, quivers = viewer.layers[names.fused], viewer.layers[names.quivers]
    # In voxels: 0.3 × the 0.5 mm pixels made arrows 0.15 voxel wide.
    assert quivers.edge_width == pytest.approx(ARROW_WIDTH_VOXELS)
    for index in (3, 6, 8):
        workbench._show_stored_slice(fused, index)
        np.testing.assert_array_equal(drawn_slice_values(fused), fused.data[index])
        assert set(quivers.data[:, 0, 0].tolist()) == {index} and len(quivers._view_data) > 0
        assert workbench.plot.marker_position == index
        assert workbench.annotation_panel._viewed_slice() == (0, index)
    # The sliders' range is the tilted box's: the last slices lie beyond it in napari's slicing.
    notifications.clear()
    workbench._show_stored_slice(fused, 11)
    shown = viewed_slice(viewer, fused)[1]
    assert shown < 11 and np.array_equal(drawn_slice_values(fused), fused.data[shown])
    assert any(f"cannot reach stored slice 11 of this tilted volume; it shows slice {shown}" in text
               for _, text in notifications), notifications


@pytest.fixture
def reviewed_with_known_defects(make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """A workbench that 'ran' on the phantom pair and got a result whose maps flag slices 4 and 11."""
    viewer = make_napari_viewer()
    reference, moving, _ = add_pair(viewer, shape=SHAPE)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    workbench._engines[engine_key(workbench.run_panel.selection().request)] = KnownResultEngine(
        result_with_defects(reference, moving))
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    return viewer, workbench


def test_renamed_output_layers_still_follow_the_slider(reviewed_with_known_defects, notifications):
    """Looked up by their first names, a renamed fused or quiver layer stopped the quivers and the
    plot following the slider, and suspicious navigation said the fused layer was deleted."""
    viewer, workbench = reviewed_with_known_defects
    names = OutputNames.for_inputs("T1", "T2")
    fused, quivers = viewer.layers[names.fused], viewer.layers[names.quivers]
    fused.name, quivers.name = "fused run A", "my arrows"
    viewer.dims.set_current_step(0, 9)
    assert set(quivers.data[:, 0, 0].tolist()) == {9} and workbench.plot.marker_position == 9
    assert workbench.go_to_suspicious(+1) == LOST_SLICE
    assert set(quivers.data[:, 0, 0].tolist()) == {LOST_SLICE}

    viewer.layers.remove(fused)
    notifications.clear()
    assert workbench.go_to_suspicious(+1) is None
    assert any("the fused layer was deleted" in text for _, text in notifications), notifications
