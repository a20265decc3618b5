"""The workbench's Methods tab: two methods on one pair, both sets of layers side by side."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from qtpy import sip

from napari_unifuse._qt.analysis import UNTRAINED
from napari_unifuse._qt.annotation_panel import ANNOTATION_LAYER
from napari_unifuse._qt.outputs import FLICKER_INTERVAL_MS
from napari_unifuse._qt.run_panel import FROM_FILE, RunPanel
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


def test_a_finished_comparison_leaves_its_inputs_to_the_one_on_screen(make_napari_viewer, qtbot, tmp_path, notifications,
                                                               monkeypatch):
    """napari keeps every worker until the viewer closes: a finished one must not hold the pair."""
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    form_selection = RunPanel.selection
    compared_inputs = []

    def selection_recorded(form):
        selection = form_selection(form)
        compared_inputs.append(weakref.ref(selection.request.moving))
        return selection

    monkeypatch.setattr(RunPanel, "selection", selection_recorded)
    compare_and_wait(qtbot, workbench.method_compare)
    assert len(workbench.method_compare.runs) == 2, notifications
    compare_and_wait(qtbot, workbench.method_compare)  # the comparison on screen keeps its own pair
    gc.collect()
    assert compared_inputs[0]() is None


def test_a_2d_only_method_is_not_offered_for_a_3d_pair(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)  # 3D
    workbench = UniFuseWorkbench(viewer)
    choices = workbench.method_compare.first.choices
    assert "unifuse" in choices and "sitk+max" in choices
    assert not any(name.startswith(("mmif-amin", "bsafusion")) for name in choices)


def test_a_one_slice_volume_is_compared_as_the_2d_image_it_is(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                             notifications):
    """As the main run and the command line fuse it (engine.input_checks.model_dimensions)."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(1, 48, 48), geometry=Geometry.identity(3))  # a 2D slice stored as a 3D volume
    workbench = UniFuseWorkbench(viewer)
    workbench.run_panel.output_root.value = str(tmp_path / "runs")
    workbench.run_panel.device.value = "cpu"
    workbench.run_panel.checkpoint.value = FROM_FILE
    workbench.run_panel.checkpoint_file.value = str(checkpoint_files[2])
    compare = workbench.method_compare
    assert {"bsafusion", "mmif-amin", "mmif-amin:none"} <= set(compare.first.choices)  # the 2D-only methods
    compare.first.value, compare.second.value = "unifuse", "identity+max"
    compare_and_wait(qtbot, compare)
    assert [run.method for run in compare.runs] == ["unifuse", "identity+max"], notifications
    assert compare.runs[0].result.provenance["checkpoint"]["path"] == str(checkpoint_files[2].resolve())
    assert compare.runs[0].result.fused.array.shape == (1, 48, 48)  # on the reference's own grid
    assert not any(level == "error" for level, _ in notifications), notifications


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


def test_closing_the_viewer_during_a_comparison_leaves_its_deleted_widgets_alone(make_napari_viewer, qtbot, tmp_path,
                                                                                notifications, held_loading):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    viewer.window.add_dock_widget(workbench, name="UniFuse workbench")  # as napari docks it: closing deletes it
    compare = workbench.method_compare
    compare.run_button.clicked()
    viewer.close()
    held_loading.go.set()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)  # its end came after the window's
    assert sip.isdeleted(compare.run_button.native) and sip.isdeleted(compare.status.native)
    compare._relay.progressed.emit("fuse", 1, 2)  # a progress report still on its way from the worker
    assert METHODS[1] not in held_loading.loaded
    assert notifications == []  # and no traceback: pytest-qt fails a test whose Qt slot raised


def test_leaving_side_by_side_gives_grid_mode_back(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare_and_wait(qtbot, compare)
    compare_and_wait(qtbot, compare)  # the second comparison finds grid mode on: it was the first's doing
    assert viewer.canvas.grid.enabled, notifications
    compare.leave_side_by_side("unifuse")
    assert not viewer.canvas.grid.enabled

    viewer.canvas.grid.enabled = True  # the reviewer's own choice, with no comparison side by side
    compare.leave_side_by_side("unifuse")
    assert viewer.canvas.grid.enabled
    compare_and_wait(qtbot, compare)
    compare.leave_side_by_side("unifuse")
    assert viewer.canvas.grid.enabled  # it was on before this comparison


PAIR_A, PAIR_B = ("T1", "T2"), ("B1", "B2")


def two_pair_workbench(viewer, tmp_path) -> UniFuseWorkbench:
    """make_workbench's pair A (T2 → T1) and a second 2D pair B (B2 → B1), the form on A."""
    workbench = make_workbench(viewer, tmp_path)
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=PAIR_B)
    for name in PAIR_B:  # other images than pair A's: a run folder is the images', whatever their names
        viewer.layers[name].data = viewer.layers[name].data + 0.05
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = PAIR_A
    return workbench


def choose_pair(workbench, pair) -> Path:
    """Put the form on ``pair``; the run folder the workbench derives for it."""
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = pair
    return workbench.run_panel.selection().folder


def visible_layers(viewer) -> set[str]:
    return {layer.name for layer in viewer.layers if layer.visible}


def test_flags_about_a_compared_method_go_to_the_compared_pairs_run_folder(make_napari_viewer, qtbot, tmp_path,
                                                                          checkpoint_files, notifications):
    viewer = make_napari_viewer()
    workbench = two_pair_workbench(viewer, tmp_path)
    compare, panel = workbench.method_compare, workbench.annotation_panel
    workbench.run_panel.checkpoint.value = FROM_FILE
    workbench.run_panel.checkpoint_file.value = str(checkpoint_files[2])
    folder_b = choose_pair(workbench, PAIR_B)
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is not None, notifications

    folder_a = choose_pair(workbench, PAIR_A)
    compare_and_wait(qtbot, compare)
    compare.about.value = METHODS[1]
    panel.add_slice_flag()
    assert panel.store.run_dir == folder_a, notifications
    assert [annotation.method for annotation in panel.annotations] == [METHODS[1]]
    assert panel.reference_layer.name == f"fused [T2 → T1] · {METHODS[1]}"
    assert "T2 → T1" in panel.subject.value and "comparison" in panel.subject.value
    assert workbench.selection.folder == folder_b  # Save and the QC report stay with the main run

    # The main run takes the screen back: its folder, its method, and no comparison under it.
    choose_pair(workbench, PAIR_B)
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert panel.store.run_dir == folder_b
    assert compare.about.choices == ("unifuse",) and compare.about.value == panel.method.value == "unifuse"
    assert not any(name.endswith(METHODS) for name in visible_layers(viewer))
    assert not viewer.canvas.grid.enabled


def test_flags_about_a_method_run_with_its_bundled_weights_go_to_the_run_folder_of_those_weights(
        make_napari_viewer, qtbot, tmp_path, notifications):
    """The untrained model in the form: the compared UniFuse runs the bundled weights, and its flags
    went to the untrained run's folder, whose run then listed them as its own."""
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    run_panel, compare, panel = workbench.run_panel, workbench.method_compare, workbench.annotation_panel
    run_panel.checkpoint.value = UNTRAINED
    untrained_folder = run_panel.selection().folder
    compare.first.value, compare.second.value = "unifuse", METHODS[0]
    compare_and_wait(qtbot, compare)
    bundled = compare.runs[0].checkpoint
    assert bundled == compare.runs[0].result.provenance["checkpoint"]["name"] != UNTRAINED, notifications

    compare.about.value = "unifuse"
    panel.add_slice_flag()
    run_panel.checkpoint.value = bundled
    assert panel.store.run_dir == run_panel.selection().folder != untrained_folder  # where a run of those weights looks
    compare.about.value = METHODS[0]  # a method without weights: the compared pair's folder
    assert panel.store.run_dir == untrained_folder and panel.annotations == [], notifications


def test_an_input_renamed_while_the_comparison_runs_is_shown_and_annotated_under_its_new_name(
        make_napari_viewer, qtbot, tmp_path, notifications, held_loading):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare.run_button.clicked()
    viewer.layers["T2"].name = "T2 (PET)"
    held_loading.go.set()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=RUN_TIMEOUT_MS)
    assert visible_layers(viewer) == {"T1", "T2 (PET)", *(f"fused [T2 (PET) → T1] · {method}" for method in METHODS)}, \
        notifications
    assert "T2 (PET) → T1" in workbench.annotation_panel.subject.value


def test_annotations_follow_the_method_chosen_after_its_layers_were_deleted_or_say_why_not(
        make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare, panel = workbench.method_compare, workbench.annotation_panel
    compare_and_wait(qtbot, compare)
    viewer.layers.remove(f"fused [T2 → T1] · {METHODS[1]}")
    viewer.layers.remove("T1")
    compare.about.value = METHODS[1]  # drawn on another image of the comparison, on the same grid
    panel.add_slice_flag()
    assert [annotation.method for annotation in panel.annotations] == [METHODS[1]], notifications

    for role, method in (("fused", METHODS[0]), ("aligned", METHODS[0]), ("aligned", METHODS[1])):
        viewer.layers.remove(f"{role} [T2 → T1] · {method}")
    notifications.clear()
    compare.about.value = METHODS[0]  # nothing left to draw on: said, not silently ignored
    assert panel.method.value == METHODS[1]
    assert len(notifications) == 1 and f"flags still record {METHODS[1]}" in notifications[0][1], notifications


def test_changing_the_form_keeps_flags_on_the_comparison_on_screen(make_napari_viewer, qtbot, tmp_path,
                                                                   notifications):
    viewer = make_napari_viewer()
    workbench = two_pair_workbench(viewer, tmp_path)
    folder_a = choose_pair(workbench, PAIR_A)
    compare_and_wait(qtbot, workbench.method_compare)
    choose_pair(workbench, PAIR_B)  # the next comparison's pair; A's layers are still the ones on screen
    workbench.annotation_panel.add_slice_flag()
    assert workbench.annotation_panel.store.run_dir == folder_a, notifications
    assert workbench.annotation_panel.method.value == METHODS[0]


def test_a_region_is_drawn_over_the_flagged_method_and_the_grid_comes_back(make_napari_viewer, qtbot, tmp_path,
                                                                           notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare, panel = workbench.method_compare, workbench.annotation_panel
    compare_and_wait(qtbot, compare)
    compare.about.value = METHODS[0]
    flagged = f"fused [T2 → T1] · {METHODS[0]}"

    panel.draw_region.clicked()
    # One view (napari's grid gives every visible layer a cell of its own), the region layer on the flagged image.
    assert not viewer.canvas.grid.enabled, notifications
    assert [layer.name for layer in viewer.layers][-2:] == [flagged, ANNOTATION_LAYER]
    viewer.layers[ANNOTATION_LAYER].add_polygons([np.array([[10.0, 10.0], [10.0, 20.0], [20.0, 20.0]])])
    panel.flag_region.clicked()
    assert [annotation.method for annotation in panel.annotations] == [METHODS[0]], notifications
    assert viewer.canvas.grid.enabled
    assert not viewer.layers[ANNOTATION_LAYER].visible  # empty now: it would be a cell of its own


def test_a_comparison_shows_only_its_own_pair_and_outputs(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = two_pair_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare_and_wait(qtbot, compare)
    choose_pair(workbench, PAIR_B)
    compare_and_wait(qtbot, compare)
    assert visible_layers(viewer) == {*PAIR_B, *(f"fused [B2 → B1] · {method}" for method in METHODS)}, notifications
    assert f"fused [T2 → T1] · {METHODS[0]}" in viewer.layers  # hidden, not deleted: a reviewer may go back

    compare.leave_side_by_side("unifuse")  # what the main run does before showing its layers
    assert visible_layers(viewer) == {*PAIR_A, *PAIR_B}


def test_versus_stays_another_method_when_the_dimensions_change(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare.first.value, compare.second.value = "unifuse", "mmif-amin"
    add_pair(viewer, names=("3D T1", "3D T2"))
    for pair in (("3D T1", "3D T2"), PAIR_A):
        choose_pair(workbench, pair)
        assert compare.first.value == "unifuse" and compare.second.value not in (None, "unifuse")


def test_a_4d_layer_neither_stops_the_workbench_opening_nor_empties_the_methods(make_napari_viewer, tmp_path):
    """A DWI or fMRI series loaded first, or chosen as the reference, left no method to offer: the
    workbench did not open, or the combo boxes raised; the run refuses the 4-D layer instead."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 8, 32, 32), np.float32), name="dwi")  # the first layer: the default reference
    workbench = UniFuseWorkbench(viewer)
    compare = workbench.method_compare
    assert compare.first.value == "unifuse" and compare.second.value not in (None, "unifuse")
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2))
    workbench.run_panel.reference.value = "dwi"
    assert compare.first.value == "unifuse" and compare.second.value not in (None, "unifuse")


def test_the_same_method_twice_is_refused(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    compare = workbench.method_compare
    compare.second.value = compare.first.value
    compare.run_button.clicked()
    assert compare.worker is None
    assert len(notifications) == 1 and "two different methods" in notifications[0][1], notifications


def test_the_method_of_the_forms_checkpoint_is_compared_with_those_weights(make_napari_viewer, qtbot, tmp_path,
                                                                            checkpoint_files):
    """A researcher's own UniFuse picked in the run form was compared as the bundled one."""
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    workbench.run_panel.checkpoint.value = FROM_FILE
    workbench.run_panel.checkpoint_file.value = str(checkpoint_files[2])
    compare = workbench.method_compare
    compare.first.value, compare.second.value = "unifuse", "bsafusion"
    compare_and_wait(qtbot, compare)
    used = {run.method: run.result.provenance["checkpoint"]["path"] for run in compare.runs}
    assert used["unifuse"] == str(checkpoint_files[2].resolve())
    assert Path(used["bsafusion"]).name == "bsafusion-2d-harvard.safetensors"  # another method: its bundled weights


def test_a_comparison_stops_the_flicker_and_unticking_it_leaves_the_grid_alone(make_napari_viewer, qtbot, tmp_path,
                                                                               checkpoint_files, notifications):
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    workbench.run_panel.checkpoint.value = FROM_FILE
    workbench.run_panel.checkpoint_file.value = str(checkpoint_files[2])
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is not None, notifications
    workbench.qc_panel.flicker.value = True
    assert workbench.results.flickering

    compare = workbench.method_compare
    compare_and_wait(qtbot, compare)
    compared = {*PAIR_A, *(f"fused [T2 → T1] · {method}" for method in METHODS)}
    assert not workbench.results.flickering and not workbench.qc_panel.flicker.value, notifications
    qtbot.wait(2 * FLICKER_INTERVAL_MS)  # a flicker left running would hide the comparison's layers
    assert visible_layers(viewer) == compared
    workbench.qc_panel.flicker.value = False  # unticked again: the main run's layers stay out of the grid
    assert visible_layers(viewer) == compared

    workbench.qc_panel.flicker.value = True  # over a comparison: the pair overlaid in one view, not in two grid cells
    assert workbench.results.flickering and not viewer.canvas.grid.enabled
    compare.leave_side_by_side("unifuse")  # what a main run does: the flicker must not bring the grid back after it
    assert not workbench.results.flickering and not viewer.canvas.grid.enabled


def test_the_forms_checkpoint_for_other_dimensions_is_refused_before_any_method_runs(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """A researcher's own 3D UniFuse picked in the run form was swapped, silently, for the bundled
    2D one on a 2D pair; the main run refuses that checkpoint, and so must the comparison."""
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path)
    workbench.run_panel.checkpoint.value = FROM_FILE
    workbench.run_panel.checkpoint_file.value = str(checkpoint_files[3])
    compare = workbench.method_compare
    compare.first.value, compare.second.value = "identity+max", "unifuse"  # the refused one second
    before = [layer.name for layer in viewer.layers]
    compare_and_wait(qtbot, compare)
    assert compare.runs == [] and [layer.name for layer in viewer.layers] == before
    assert len(notifications) == 1, notifications
    level, message = notifications[0]
    assert level == "error" and message.startswith(f"Compare methods: {checkpoint_files[3]}: "), message
    assert "this checkpoint is a 3D model but the images are 2D" in message
    assert compare.status.value == "stopped"


def test_the_methods_compared_take_the_moving_image_as_the_form_s_modality(monkeypatch):
    from napari_unifuse._qt.method_compare import run_methods
    from napari_unifuse.engine.inference import FusionEngine
    from napari_unifuse.engine.progress import CancelToken
    from napari_unifuse.errors import UniFuseError
    from napari_unifuse.io import ImageVolume

    given = []

    def recording(self, reference, moving, **options):
        given.append(options["moving_modality"])
        raise UniFuseError("stop here")

    monkeypatch.setattr(FusionEngine, "run_fusion", recording)
    image = ImageVolume(np.zeros((32, 32), np.float32), Geometry.identity(2))
    with pytest.raises(UniFuseError, match="stop here"):
        run_methods(["identity+max"], image, image, "cpu", None, lambda *args: None, CancelToken(), {},
                    moving_modality="spect")
    assert given == ["spect"]
