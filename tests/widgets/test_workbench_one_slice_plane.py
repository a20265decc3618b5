"""A one-slice coronal or sagittal volume is shown in its own plane: napari's first view of it is a
line one pixel high per z step, not the image."""

from __future__ import annotations

import pytest

from napari_unifuse._qt.outputs import OutputNames
from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.io import Geometry

from .conftest import add_pair

pytestmark = pytest.mark.gui
RUN_TIMEOUT_MS = 120_000


@pytest.mark.parametrize(("shape", "order"), [((24, 1, 30), (1, 0, 2)), ((24, 30, 1), (2, 0, 1))])
def test_choosing_a_one_slice_pair_shows_the_image_plane(make_napari_viewer, shape, order):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=shape, geometry=Geometry.identity(3))
    assert viewer.dims.order == (0, 1, 2)
    UniFuseWorkbench(viewer)
    assert viewer.dims.order == order


def test_an_ordinary_volume_keeps_the_view_the_reviewer_chose(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = UniFuseWorkbench(viewer)
    assert viewer.dims.order == (0, 1, 2)
    viewer.dims.order = (2, 0, 1)
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = "T2", "T1"
    assert viewer.dims.order == (2, 0, 1)


def test_the_run_of_a_one_slice_pair_is_shown_in_its_plane(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(24, 1, 30), geometry=Geometry.identity(3))
    workbench = UniFuseWorkbench(viewer)
    workbench.run_panel.output_root.value, workbench.run_panel.device.value = str(tmp_path / "runs"), "cpu"
    workbench.run_panel.run_button.clicked()
    viewer.dims.order = (0, 1, 2)  # turned back while the run computes
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is not None, notifications
    assert OutputNames.for_inputs("T1", "T2").fused in viewer.layers
    assert viewer.dims.order == (1, 0, 2)
