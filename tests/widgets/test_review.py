"""Where not to trust a run, in the workbench: quality layers, suspicious-slice navigation that
pre-fills the annotation, the per-slice plot, the collapsed Advanced settings, and a workbench
that leaves nothing behind when it is closed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from napari_unifuse._qt.analysis import engine_key
from napari_unifuse._qt.outputs import OutputNames
from napari_unifuse._qt.workbench import PLOT_DOCK_NAME, UniFuseWorkbench
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE
from napari_unifuse.engine.quality import INVENTED, LOST, MAP_LABELS, RESTORATION_CHANGE, QualityMaps
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping

from .conftest import GEOMETRY_3D, add_pair
from .test_workbench import make_workbench, run_and_wait

pytestmark = pytest.mark.gui
PLUGIN, WORKBENCH = "napari-unifuse", "UniFuse workbench"
SHAPE = (16, 48, 48)
UNIT_MAPPING = IntensityMapping("percentile", "mr", 0.0, 1.0)
INVENTED_SLICE, LOST_SLICE = 4, 11  # where the constructed defects sit


class KnownResultEngine:
    """Stands in for FusionEngine: returns a fixed result whose quality maps flag known slices."""

    def __init__(self, result: FusionResult) -> None:
        self.result = result

    def run_fusion(self, reference, moving, **_options) -> FusionResult:
        return self.result


def result_with_defects(reference: np.ndarray, moving: np.ndarray) -> FusionResult:
    """A 3D result whose invented-structure map has a blob on slice 4 and lost-structure map one on
    slice 11; every other voxel is below its threshold."""
    maps = {name: np.zeros(SHAPE, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    maps[INVENTED][INVENTED_SLICE, 20:26, 20:26] = 1.0
    maps[LOST][LOST_SLICE, 10:14, 30:40] = 1.0
    maps[LOST][INVENTED_SLICE, 5, 5] = 1.0  # one stray voxel: slice 4 is still mostly invented structure
    quality = QualityMaps.from_maps(maps, dict.fromkeys(maps, 0.5))
    probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (SHAPE[0], 1))
    return FusionResult(
        fused=ImageVolume(0.5 * (reference + moving), GEOMETRY_3D), aligned=ImageVolume(moving, GEOMETRY_3D),
        displacement=np.zeros((3, *SHAPE), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs=dict(zip(DEGRADATION_CLASSES, probabilities[0])), slice_class_probs=probabilities,
        output_extension="nii.gz", quality=quality,
        # Inputs already in the model's [0, 1] units: the mappings the engine records leave them as they are.
        provenance={"method": {"name": "unifuse"},
                    "intensity_mappings": dict.fromkeys(("reference", "moving"), UNIT_MAPPING.to_dict())},
    )


def review(viewer, qtbot, tmp_path, checkpoint, notifications, result_for=result_with_defects):
    """A workbench on ``viewer`` that has 'run' on the phantom pair and got ``result_for(reference, moving)``."""
    reference, moving, _ = add_pair(viewer, shape=SHAPE)
    workbench = make_workbench(viewer, tmp_path, checkpoint)
    request = workbench.run_panel.selection().request
    key = engine_key(request)
    workbench._engines[key] = KnownResultEngine(result_for(reference, moving))
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    return workbench


@pytest.fixture
def reviewed(make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """A workbench that has 'run' on the phantom pair and got the constructed result."""
    viewer = make_napari_viewer()
    return viewer, review(viewer, qtbot, tmp_path, checkpoint_files[3], notifications)


def test_next_suspicious_slice_goes_to_the_defects_and_prefills_the_flag(reviewed):
    viewer, workbench = reviewed
    names = OutputNames.for_inputs("T1", "T2")
    for map_name in (INVENTED, LOST, RESTORATION_CHANGE):
        layer = viewer.layers[names.quality_map(map_name)]
        assert not layer.visible and layer.name.startswith(MAP_LABELS[map_name])
    assert workbench.plot_dock.isVisibleTo(viewer.window._qt_window)
    assert workbench.qc_panel.suspicion.value == "2 of 16 slices flagged"

    viewer.dims.set_current_step(0, 0)
    assert workbench.go_to_suspicious(+1) == INVENTED_SLICE
    assert viewer.dims.current_step[0] == INVENTED_SLICE and workbench.plot.marker_position == INVENTED_SLICE
    assert workbench.annotation_panel.category.value == "hallucinated structure"
    workbench.qc_panel.next_suspicious.clicked()
    assert viewer.dims.current_step[0] == LOST_SLICE
    assert workbench.annotation_panel.category.value == "lost structure"
    workbench.qc_panel.next_suspicious.clicked()  # wraps round to the first
    assert viewer.dims.current_step[0] == INVENTED_SLICE
    workbench.qc_panel.previous_suspicious.clicked()
    assert viewer.dims.current_step[0] == LOST_SLICE

    panel = workbench.annotation_panel
    panel.reviewer.value = "dr. test"
    panel.flag_slice.clicked()
    record = json.loads((workbench.selection.folder / ANNOTATIONS_FILE).read_text(encoding="utf-8"))
    assert (record["slice_index"], record["category"], record["method"]) == (LOST_SLICE, "lost structure", "unifuse")


def test_the_qc_report_button_writes_the_run_page_and_names_it(reviewed, qtbot, notifications):
    _, workbench = reviewed
    workbench.annotation_panel.reviewer.value = "dr. test"
    workbench.annotation_panel.flag_slice.clicked()
    workbench.report_button.clicked()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=60_000)
    page = workbench.last_report
    assert page is not None and page.parent == workbench.selection.folder and page.is_file()
    text = page.read_text(encoding="utf-8")
    assert workbench.selection.folder.name in text and "dr. test" in text
    assert any(str(page) in message for _, message in notifications)


def test_the_plot_adds_a_quality_panel_marking_the_viewed_slice(reviewed):
    viewer, workbench = reviewed
    plot = workbench.plot
    probability_axes, quality_axes = plot.figure.axes
    lines = {line.get_label(): line for line in quality_axes.get_lines()}
    np.testing.assert_allclose(lines[MAP_LABELS[INVENTED]].get_ydata()[INVENTED_SLICE], 100 * 36 / 48**2, rtol=1e-5)
    viewer.dims.set_current_step(0, LOST_SLICE)
    assert plot.marker_position == LOST_SLICE
    assert "lost structure 1.7 %" in plot.values_label.text()


def test_the_review_tab_and_the_plot_name_the_slices_outside_the_moving_image(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """A moving image reaching only part of the reference: the report said so, the workbench did not."""
    def partial_coverage(reference, moving):
        result = result_with_defects(reference, moving)
        outside = np.zeros(SHAPE[0])
        outside[:3] = 1.0  # slices 0-2 beyond the moving image's field of view
        return dataclasses.replace(result, quality=dataclasses.replace(result.quality, outside_moving=outside))

    viewer = make_napari_viewer()
    workbench = review(viewer, qtbot, tmp_path, checkpoint_files[3], notifications, partial_coverage)
    assert workbench.qc_panel.suspicion.value == (
        "2 of 16 slices flagged\n3 of 16 slices (0-2) lie more than half outside the moving image's field of view: "
        "not evidence of alignment, no moving data there.")
    quality_axes = workbench.plot.figure.axes[1]
    assert [patch.get_x() for patch in quality_axes.patches] == [-0.5, 0.5, 1.5]
    assert "grey: outside the moving image" in quality_axes.get_title()
    viewer.dims.set_current_step(0, 1)
    assert "mostly outside the moving image" in workbench.plot.values_label.text()
    viewer.dims.set_current_step(0, 5)
    assert "outside" not in workbench.plot.values_label.text()


def test_a_moving_image_reaching_every_slice_adds_no_coverage_note(reviewed):
    _, workbench = reviewed
    assert "outside" not in workbench.qc_panel.suspicion.value
    assert not workbench.plot.figure.axes[1].patches
    assert "grey" not in workbench.plot.figure.axes[1].get_title()


def test_changing_the_theme_restyles_the_plot(make_napari_viewer):
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer()
    workbench = UniFuseWorkbench(viewer)
    workbench.plot.show_probabilities(np.array([[0.1, 0.2, 0.3, 0.4]]), DEGRADATION_CLASSES)
    for theme in ("light", "dark"):
        viewer.theme = theme
        colours = get_theme(theme)
        axes = workbench.plot.figure.axes[0]
        assert workbench.plot.figure.get_facecolor()[:3] == pytest.approx(_rgb(colours.background.as_hex()))
        assert axes.yaxis.label.get_color() == colours.text.as_hex()


def test_advanced_settings_start_collapsed_and_tile_size_reads_auto(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)
    form = UniFuseWorkbench(viewer).run_panel
    assert not form.advanced.isExpanded()
    assert form.advanced.content().maximumHeight() == 0  # collapsed: the settings take no room
    assert form.tile_size.native.currentText() == "auto"
    assert form.selection().request.tile_size is None
    form.tile_size.value = 64
    assert form.selection().request.tile_size == 64


def test_closing_the_workbench_releases_the_viewer_and_reopening_adds_nothing(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)

    def connections() -> dict[str, int]:
        emitters = {"dims.current_step": viewer.dims.events.current_step, "dims.order": viewer.dims.events.order,
                    "layers.inserted": viewer.layers.events.inserted, "layers.removed": viewer.layers.events.removed,
                    "layers.moved": viewer.layers.events.moved, "theme": viewer.events.theme}
        return {name: len(emitter.callbacks) for name, emitter in emitters.items()}

    def docks() -> list[str]:
        return sorted(viewer.window._wrapped_dock_widgets)

    before, docks_before = connections(), docks()
    for _ in range(2):
        dock, workbench = viewer.window.add_plugin_dock_widget(PLUGIN, WORKBENCH)
        assert PLOT_DOCK_NAME in docks()
        assert connections() != before
        workbench.results.start_flicker()  # a running timer must be stopped too
        viewer.window.remove_dock_widget(dock)  # what the dock's close button does
        assert connections() == before
        assert docks() == docks_before
        assert not workbench.results.flickering

    workbench = UniFuseWorkbench(viewer)  # closed as a window rather than removed as a dock
    workbench.close()
    assert connections() == before and docks() == docks_before


def test_a_2d_run_draws_bars_and_reports_in_the_activity_panel(make_napari_viewer, qtbot, tmp_path,
                                                               checkpoint_files, notifications):
    from napari.utils import progress

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    workbench.run_panel.run_button.clicked()
    assert [bar.desc for bar in progress._all_instances if bar.desc.startswith("UniFuse")]
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=120_000)
    assert workbench.outcome is not None, notifications
    assert not [bar for bar in progress._all_instances if bar.desc.startswith("UniFuse")]
    probability_axes = workbench.plot.figure.axes[0]
    heights = [patch.get_height() for patch in probability_axes.patches]
    np.testing.assert_allclose(heights, workbench.outcome.result.slice_class_probs[0])
    assert [tick.get_text() for tick in probability_axes.get_xticklabels()] == list(DEGRADATION_CLASSES)


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(hex_colour)


def test_a_run_slows_napari_s_in_progress_animation_and_gives_its_speed_back(make_napari_viewer, qtbot, tmp_path,
                                                                              checkpoint_files):
    """napari's animated indicator repaints the window around the OpenGL canvas 33 times a second
    (workbench.ACTIVITY_SPINNER_SPEED_PERCENT): a run slows it and restores it."""
    from qtpy.QtWidgets import QLabel

    from napari_unifuse._qt.workbench import ACTIVITY_SPINNER_SPEED_PERCENT

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    viewer.window.add_dock_widget(workbench)
    movies = [label.movie() for label in workbench.window().findChildren(QLabel) if label.movie() is not None]
    assert movies, "napari's in-progress indicator is no longer an animated label: see ACTIVITY_SPINNER_SPEED_PERCENT"
    speeds = [movie.speed() for movie in movies]
    workbench.run_panel.run_button.clicked()
    assert [movie.speed() for movie in movies] == [ACTIVITY_SPINNER_SPEED_PERCENT] * len(movies)
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=120_000)
    assert workbench.outcome is not None
    assert [movie.speed() for movie in movies] == speeds


def test_save_report_and_flags_stay_with_the_run_on_screen_when_the_form_changes(reviewed, notifications):
    viewer, workbench = reviewed
    run_folder = workbench.selection.folder
    viewer.add_image(np.zeros(SHAPE, np.float32), name="next moving")
    workbench.run_panel.moving.value = "next moving"  # preparing the next pair while reviewing this one
    assert workbench.run_panel.folder_label.value != str(run_folder)  # where the next run will go
    assert workbench.selection.folder == run_folder
    workbench.annotation_panel.flag_slice.clicked()
    assert len(workbench.annotation_panel.annotations) == 1
    assert (run_folder / ANNOTATIONS_FILE).is_file()
    written = workbench.save_outputs()
    assert written and {path.parent for path in written.values()} == {run_folder}, notifications


def test_suspicious_navigation_slices_along_the_first_array_axis_and_says_so(reviewed, notifications):
    viewer, workbench = reviewed
    viewer.dims.roll()  # napari's "roll dimensions" button: order (2, 0, 1), axis 0 on screen, axis 2 on the slider
    viewer.dims.set_current_step(0, 0)
    assert workbench.go_to_suspicious(+1) == INVENTED_SLICE
    assert viewer.dims.current_step[0] == INVENTED_SLICE
    assert viewer.dims.order == (0, 1, 2)  # axes 1 and 2 down and across, as first shown: not transposed
    # The quality maps score slices along the outputs' axis 0: world z, as every run fuses a volume in world axis order.
    switched = [message for _, message in notifications if message.startswith("Switched to")]
    assert len(switched) == 1 and "first array axis" in switched[0] and "world z" in switched[0], notifications


def test_a_new_run_clears_the_last_run_s_slice_suggestion(reviewed, qtbot):
    viewer, workbench = reviewed
    viewer.dims.set_current_step(0, 0)
    workbench.go_to_suspicious(+1)
    assert workbench.annotation_panel.suggestion.value.startswith(f"slice {INVENTED_SLICE}:")
    run_and_wait(qtbot, workbench)
    assert workbench.annotation_panel.suggestion.value == ""


def test_a_deleted_fused_layer_leaves_scrolling_and_navigation_working(reviewed, notifications):
    viewer, workbench = reviewed
    viewer.layers.remove(OutputNames.for_inputs("T1", "T2").fused)
    viewer.dims.set_current_step(0, 6)  # the quivers and the plot follow the slice: no error
    assert workbench.go_to_suspicious(+1) is None
    assert any("the fused layer was deleted" in message for _, message in notifications)
    assert not any("unexpectedly" in message for _, message in notifications)


def test_a_ground_truth_and_degradation_belong_to_the_pair_they_were_chosen_for(make_napari_viewer):
    viewer = make_napari_viewer()
    add_pair(viewer)  # tagged like sample data: its ground truth is picked with it
    form = UniFuseWorkbench(viewer).run_panel
    form.task.value = "motion"
    assert form.ground_truth.value == "T2 ground truth"
    viewer.add_image(np.zeros((16, 48, 48), np.float32), name="another scan")
    form.moving.value = "another scan"
    assert (form.ground_truth.value, form.task.value) == ("none", "auto")
    form.ground_truth.value, form.task.value = "T2 ground truth", "metal"  # chosen for this pair: kept
    form.reference.value = form.reference.value
    assert (form.ground_truth.value, form.task.value) == ("T2 ground truth", "metal")


def test_review_actions_before_a_run_say_so_once_and_a_folder_without_images_is_explained(
        make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = UniFuseWorkbench(viewer)
    workbench.save_button.enabled = True  # as if clicked: the handler itself must refuse
    workbench.save_outputs()
    workbench.write_qc_report()
    assert ("Save outputs: run UniFuse first; there is nothing to save yet" in
            [message for _, message in notifications])
    assert "QC report: run UniFuse first; the report describes a run" in [message for _, message in notifications]
    empty = tmp_path / "not a DICOM series"
    empty.mkdir()
    workbench.run_panel.open_moving.value = str(empty)
    assert any("no DICOM series found in this folder" in message for _, message in notifications)
    assert not any("unexpectedly" in message for _, message in notifications)


def test_fade_and_flicker_keep_a_renamed_reference_under_the_aligned_image(reviewed, qtbot):
    viewer, workbench = reviewed
    names = OutputNames.for_inputs("T1", "T2")
    viewer.layers["T1"].name = "T1 patient42"
    viewer.layers["T1 patient42"].visible = False  # fade and flicker show it again: it is what they compare with
    workbench.qc_panel.fade.value = 0.5
    assert viewer.layers["T1 patient42"].visible and viewer.layers[names.aligned].visible
    assert not viewer.layers[names.fused].visible
    workbench.qc_panel.flicker.value = True
    qtbot.waitUntil(lambda: not viewer.layers[names.aligned].visible, timeout=5_000)
    assert viewer.layers["T1 patient42"].visible
    workbench.qc_panel.flicker.value = False
    assert viewer.layers[names.fused].visible and not viewer.layers["T1 patient42"].visible


def test_the_flicker_overlays_the_pair_in_one_view_and_gives_back_the_view_and_grid_it_found(reviewed, qtbot):
    viewer, workbench = reviewed
    names = OutputNames.for_inputs("T1", "T2")
    viewer.canvas.grid.enabled = True  # as a comparison leaves it: side by side, one cell per layer
    review_view = {layer.name for layer in viewer.layers if layer.visible}
    assert names.aligned not in review_view
    workbench.qc_panel.flicker.value = True
    assert not viewer.canvas.grid.enabled  # in a grid the reference and the aligned image would sit in two cells
    qtbot.waitUntil(lambda: viewer.layers[names.aligned].visible, timeout=5_000)  # an odd number of flips
    workbench.qc_panel.flicker.value = False
    assert {layer.name for layer in viewer.layers if layer.visible} == review_view
    assert viewer.canvas.grid.enabled


def test_the_flicker_box_is_unticked_when_a_new_run_stops_the_flicker(reviewed, qtbot):
    _, workbench = reviewed
    workbench.qc_panel.flicker.value = True
    assert workbench.results.flickering
    run_and_wait(qtbot, workbench)
    assert not workbench.results.flickering and not workbench.qc_panel.flicker.value


def test_deleting_the_aligned_layer_stops_the_flicker_and_shows_the_hidden_layers_again(reviewed):
    viewer, workbench = reviewed
    names = OutputNames.for_inputs("T1", "T2")
    workbench.qc_panel.flicker.value = True
    assert not viewer.layers[names.fused].visible
    viewer.layers.remove(names.aligned)
    assert not workbench.results.flickering and not workbench.qc_panel.flicker.value
    assert viewer.layers[names.fused].visible and viewer.layers["T2"].visible
    workbench.qc_panel.flicker.value = True  # nothing left to flicker: the box says so
    assert not workbench.results.flickering and not workbench.qc_panel.flicker.value


def test_the_annotate_tab_follows_a_reference_renamed_after_the_run(reviewed):
    viewer, workbench = reviewed
    assert "T2 → T1:" in workbench.annotation_panel.subject.value
    viewer.layers["T1"].name = "T1 renamed"
    assert "T2 → T1 renamed:" in workbench.annotation_panel.subject.value
    assert workbench.results.reference_name == "T1 renamed"  # as the result layers do


def test_a_reference_renamed_while_the_run_computes_names_its_results(make_napari_viewer, qtbot, tmp_path,
                                                                      checkpoint_files, notifications):
    """The run's layers, the Annotate tab and the next image opened follow the name the layer has now."""
    import threading

    viewer = make_napari_viewer()
    reference, moving, _ = add_pair(viewer, shape=SHAPE)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    renamed = threading.Event()

    class RenamedDuringRunEngine(KnownResultEngine):
        def run_fusion(self, reference, moving, **_options) -> FusionResult:
            renamed.wait(timeout=60)
            return self.result

    request = workbench.run_panel.selection().request
    key = engine_key(request)
    workbench._engines[key] = RenamedDuringRunEngine(result_with_defects(reference, moving))
    workbench.run_panel.run_button.clicked()
    viewer.layers["T1"].name = "T1 renamed"
    renamed.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=120_000)
    assert workbench.outcome is not None, notifications

    assert OutputNames.for_inputs("T1 renamed", "T2").fused in viewer.layers
    assert workbench.results.reference_name == "T1 renamed"
    assert workbench.run_panel.last_run_pair == ("T1 renamed", "T2")
    assert (workbench.selection.reference_name, workbench.selection.moving_name) == ("T1 renamed", "T2")
    assert "T2 → T1 renamed" in workbench.annotation_panel.subject.value
    viewer.add_image(np.zeros(SHAPE, np.float32), name="next patient MRI")  # the next pair starts, as after any run
    assert (workbench.run_panel.reference.value, workbench.run_panel.moving.value) == ("next patient MRI",) * 2


def test_suspicious_navigation_in_the_3d_view_steps_from_the_slider_s_slice(reviewed):
    viewer, workbench = reviewed
    between = (INVENTED_SLICE + LOST_SLICE) // 2
    for step, expected in ((+1, LOST_SLICE), (-1, INVENTED_SLICE)):
        viewer.dims.ndisplay = 2
        viewer.dims.set_current_step(0, between)
        viewer.dims.ndisplay = 3
        assert workbench.go_to_suspicious(step) == expected


def test_the_fade_slider_back_at_its_default_gives_back_the_review_view(reviewed):
    viewer, workbench = reviewed
    names = OutputNames.for_inputs("T1", "T2")
    review_view = {layer.name for layer in viewer.layers if layer.visible}
    assert {names.fused, names.error, names.folding, "T2"} <= review_view and names.aligned not in review_view
    workbench.qc_panel.fade.value = 0.5
    assert {layer.name for layer in viewer.layers if layer.visible} == {"T1", names.aligned, names.quivers}
    workbench.qc_panel.fade.value = 1.0
    assert {layer.name for layer in viewer.layers if layer.visible} == review_view
    assert viewer.layers[names.aligned].opacity == 1.0


def test_ending_the_flicker_puts_the_fade_slider_back_at_no_fade(reviewed):
    """Stopping the flicker ends a fade too, but the slider kept showing 0.5 over the review view."""
    viewer, workbench = reviewed
    workbench.qc_panel.fade.value = 0.5
    workbench.qc_panel.flicker.value = True
    workbench.qc_panel.flicker.value = False
    assert workbench.qc_panel.fade.value == 1.0
    assert viewer.layers[OutputNames.for_inputs("T1", "T2").fused].visible


def test_a_suggestion_leaves_with_its_slice_and_a_note_with_its_flag(reviewed):
    """Flagged on slice 11 after "next suspicious", the reviewer scrolls on: slice 3 is not slice 11's case."""
    viewer, workbench = reviewed
    panel = workbench.annotation_panel
    panel.reviewer.value, panel.category.value = "dr. test", "other"
    viewer.dims.set_current_step(0, 0)
    workbench.go_to_suspicious(-1)
    assert panel.category.value == "lost structure" and panel.suggestion.value.startswith(f"slice {LOST_SLICE}:")
    panel.note.value = "cortex edge lost"
    panel.flag_slice.clicked()
    assert panel.note.value == ""  # said of that slice: the next flag starts without it
    assert panel.suggestion.value.startswith(f"slice {LOST_SLICE}:")  # still on the suggested slice

    viewer.dims.set_current_step(0, 3)
    assert panel.suggestion.value == "" and panel.category.value == "other"  # the reviewer's own choice again
    panel.flag_slice.clicked()
    records = [json.loads(line) for line in (workbench.selection.folder / ANNOTATIONS_FILE).read_text().splitlines()]
    assert [(r["slice_index"], r["category"], r["note"]) for r in records] == [
        (LOST_SLICE, "lost structure", "cortex edge lost"), (3, "other", "")]


def test_a_category_the_reviewer_chose_on_a_suggested_slice_stays_when_leaving_it(reviewed):
    viewer, workbench = reviewed
    panel = workbench.annotation_panel
    viewer.dims.set_current_step(0, 0)
    workbench.go_to_suspicious(+1)
    panel.category.value = "misalignment"
    viewer.dims.set_current_step(0, 2)
    assert panel.suggestion.value == "" and panel.category.value == "misalignment"


def test_a_flag_made_after_the_qc_report_says_the_report_predates_it(reviewed, qtbot):
    _, workbench = reviewed
    panel = workbench.annotation_panel
    panel.reviewer.value = "dr. test"
    panel.flag_slice.clicked()
    assert panel.report_note.value == ""  # no report yet: nothing to be out of date
    workbench.report_button.clicked()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=60_000)
    assert panel.report_note.value == ""
    panel.flag_slice.clicked()
    panel.flag_slice.clicked()
    assert "predates 2 flags" in panel.report_note.value and "QC report" in panel.report_note.value
    workbench.report_button.clicked()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=60_000)
    assert panel.report_note.value == ""
    panel.listing.value = [panel.annotations[0].id]
    panel.delete.clicked()
    assert "1 withdrawn flag" in panel.report_note.value


def _flag_after_the_report_then_choose_another_pair(viewer, workbench, qtbot) -> Path:
    """Write the QC report, flag a slice after it (the note says so), then put the run form on
    another pair: the run folder of the flag."""
    panel = workbench.annotation_panel
    panel.reviewer.value = "dr. test"
    workbench.report_button.clicked()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=60_000)
    panel.flag_slice.clicked()
    assert "predates 1 flag" in panel.report_note.value
    run = workbench.selection.folder
    add_pair(viewer, shape=(16, 40, 40), names=("B MR", "B CT"))  # other pixels: another run folder
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = "B MR", "B CT"
    return run


def test_the_report_note_leaves_with_the_runs_flags(reviewed, qtbot):
    """The note is about the run's folder: flags of another pair's inputs are no report's."""
    viewer, workbench = reviewed
    panel = workbench.annotation_panel
    run = _flag_after_the_report_then_choose_another_pair(viewer, workbench, qtbot)

    for layer in [layer for layer in viewer.layers if not layer.name.startswith(("T1", "T2", "B "))]:
        viewer.layers.remove(layer)  # the run's outputs: the Annotate tab turns to the form's pair

    assert panel.store.run_dir != run and panel.subject.value.startswith("inputs, B CT")
    assert panel.report_note.value == ""


def test_the_report_note_leaves_while_a_comparison_of_another_pair_is_annotated(reviewed, qtbot, notifications):
    viewer, workbench = reviewed
    panel, compare = workbench.annotation_panel, workbench.method_compare
    run = _flag_after_the_report_then_choose_another_pair(viewer, workbench, qtbot)
    compare.first.value, compare.second.value = "identity+max", "identity+average"

    compare.run_button.clicked()
    qtbot.waitUntil(lambda: compare.worker is None, timeout=120_000)

    assert panel.store.run_dir != run and "comparison" in panel.subject.value, notifications
    assert panel.report_note.value == ""
