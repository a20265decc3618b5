"""The workbench's Methods tab: two methods on one pair, both sets of layers side by side."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.io import Geometry

from .conftest import add_pair

pytestmark = pytest.mark.gui
RUN_TIMEOUT_MS = 120_000
METHODS = ("identity+max", "matching+wavelet")


def make_workbench(viewer, tmp_path) -> UniFuseWorkbench:
    """A workbench on a small 2D pair, its Methods tab set to compare METHODS on the CPU. Keep it
    referenced: the tab's Qt widgets are its children and are deleted with it."""
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2))
    workbench = UniFuseWorkbench(viewer)
    workbench.run_panel.output_root.value = str(tmp_path / "runs")
    workbench.run_panel.device.value = "cpu"
    workbench.method_compare.first.value, workbench.method_compare.second.value = METHODS
    return workbench


def compare_and_wait(qtbot, compare) -> None:
    compare.run_button.clicked()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)


@pytest.fixture
def held_loading(monkeypatch):
    """The Methods tab's methods load only once ``go`` is set, so a comparison the test interrupts
    is still running whatever the speed of the machine; ``loaded`` names the methods it loaded."""
    import napari_unifuse._qt.method_compare as method_compare_module

    held = SimpleNamespace(go=threading.Event(), loaded=[])
    real_load_method = method_compare_module.load_method

    def load_when_told(name, **kwargs):
        held.go.wait(timeout=60)
        held.loaded.append(name)
        return real_load_method(name, **kwargs)

    monkeypatch.setattr(method_compare_module, "load_method", load_when_told)
    return held


def test_two_methods_run_one_after_the_other_and_show_side_by_side(make_napari_viewer, qtbot, tmp_path,
                                                                   notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    assert "mmif-amin:sitk" in compare.first.choices and "sitk+wavelet" in compare.second.choices
    compare_and_wait(qtbot, compare)
    assert [run.method for run in compare.runs] == list(METHODS), notifications

    for run in compare.runs:
        fused = viewer.layers[f"fused [T2 → T1] · {run.method}"]
        aligned = viewer.layers[f"aligned [T2 → T1] · {run.method}"]
        np.testing.assert_array_equal(fused.data, run.result.fused.array)
        assert fused.metadata["unifuse"]["method"] == run.method
        assert aligned.metadata["unifuse"]["role"] == "output"  # never offered back as an input
    first, second = (run.result for run in compare.runs)
    assert not np.allclose(first.fused.array, second.fused.array)  # max and wavelet fusions differ
    np.testing.assert_array_equal(first.displacement, 0)  # identity registration
    assert viewer.canvas.grid.enabled  # side by side, one grid cell per layer

    # Flags made while comparing record the method they are about.
    compare.about.value = METHODS[1]
    workbench.annotation_panel.add_slice_flag()
    (annotation,) = workbench.annotation_panel.annotations
    assert annotation.method == METHODS[1]


def test_a_2d_only_method_is_not_offered_for_a_3d_pair(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)  # 3D
    workbench = UniFuseWorkbench(viewer)
    choices = workbench.method_compare.first.choices
    assert "unifuse" in choices and "sitk+max" in choices
    assert not any(name.startswith(("mmif-amin", "bsafusion")) for name in choices)


def test_a_cancelled_comparison_ends_in_one_notification_and_adds_nothing(make_napari_viewer, qtbot, tmp_path,
                                                                          notifications, held_loading):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    before = [layer.name for layer in viewer.layers]
    compare.run_button.clicked()
    compare.cancel_button.clicked()
    held_loading.go.set()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == before
    assert METHODS[1] not in held_loading.loaded  # stopped before the second method
    assert notifications == [("info", "Compare methods was cancelled; no layers were added and nothing was "
                                      "written.")]
    assert compare.status.value == "stopped"
    assert compare.run_button.enabled and not compare.cancel_button.enabled
    assert not viewer.canvas.grid.enabled


def test_a_pair_the_engine_refuses_is_named_in_one_line(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    viewer.layers["T2"].translate = np.asarray(viewer.layers["T2"].translate) + 500  # 500 mm from the reference
    before = [layer.name for layer in viewer.layers]
    compare_and_wait(qtbot, compare)
    assert [layer.name for layer in viewer.layers] == before
    assert len(notifications) == 1, notifications
    level, message = notifications[0]
    assert level == "error" and message.startswith("Compare methods: ") and "does not overlap" in message
    assert "\n" not in message  # a sentence, not a traceback
    assert compare.status.value == "stopped"
    assert compare.run_button.enabled and not compare.cancel_button.enabled


def test_a_comparison_running_when_the_workbench_is_released_adds_nothing(make_napari_viewer, qtbot, tmp_path,
                                                                          notifications, held_loading):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    before = [layer.name for layer in viewer.layers]
    compare.run_button.clicked()
    compare.release()
    held_loading.go.set()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == before
    assert METHODS[1] not in held_loading.loaded  # cancelled, not left to run on
    assert not viewer.canvas.grid.enabled
    assert notifications == []  # the closed workbench says nothing, not even "cancelled"


def test_leaving_side_by_side_gives_grid_mode_back(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare_and_wait(qtbot, compare)
    compare_and_wait(qtbot, compare)  # the second comparison finds grid mode on: it was the first's doing
    assert viewer.canvas.grid.enabled, notifications
    compare.leave_side_by_side()
    assert not viewer.canvas.grid.enabled

    viewer.canvas.grid.enabled = True  # the reviewer's own choice, with no comparison side by side
    compare.leave_side_by_side()
    assert viewer.canvas.grid.enabled
    compare_and_wait(qtbot, compare)
    compare.leave_side_by_side()
    assert viewer.canvas.grid.enabled  # it was on before this comparison
