"""The workbench's Methods tab: two methods on one pair, both sets of layers side by side."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.io import Geometry

from .conftest import add_pair

pytestmark = pytest.mark.gui
RUN_TIMEOUT_MS = 120_000
METHODS = ("identity+max", "matching+wavelet")


def test_two_methods_run_one_after_the_other_and_show_side_by_side(make_napari_viewer, qtbot, tmp_path,
                                                                   notifications):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2))
    workbench = UniFuseWorkbench(viewer)
    workbench.run_panel.output_root.value = str(tmp_path / "runs")
    workbench.run_panel.device.value = "cpu"
    compare = workbench.method_compare
    assert "mmif-amin:sitk" in compare.first.choices and "sitk+wavelet" in compare.second.choices
    compare.first.value, compare.second.value = METHODS
    compare.run_button.clicked()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)
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
