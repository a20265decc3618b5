"""The Annotate tab on its own (no run needed): which slice a flag or a drawn region is recorded on,
the annotation layer following the run's grid, and clear messages for what the reviewer can fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_unifuse._napari_io import volume_to_layer_data
from napari_unifuse._qt.annotation_panel import ANNOTATION_LAYER, AnnotationPanel
from napari_unifuse._qt.notifications import report_error
from napari_unifuse._qt.outputs import viewed_slice
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE, Annotation, AnnotationStore
from napari_unifuse.engine.provenance import sha256_of_array
from napari_unifuse.io import ImageVolume

from .conftest import GEOMETRY_3D, add_pair, ellipsoid_pair

pytestmark = pytest.mark.gui


def panel_on(viewer, tmp_path, reference_name: str) -> AnnotationPanel:
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers[reference_name])
    return panel


def draw(viewer, *shapes) -> None:
    viewer.layers[ANNOTATION_LAYER].add_polygons([np.asarray(shape, dtype=float) for shape in shapes])


def test_flag_slice_in_the_3d_view_is_refused(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    viewer.dims.set_current_step(0, 5)
    viewer.dims.ndisplay = 3
    panel.flag_slice.clicked()
    assert panel.annotations == []
    assert any("switch to the 2D view" in message for severity, message in notifications if severity == "error")


def test_drawing_in_the_3d_view_is_refused(make_napari_viewer, tmp_path, notifications):
    """napari leaves a shapes layer in pan/zoom in the 3D view: "Draw the failure region" could not be done."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    viewer.dims.ndisplay = 3
    panel.draw_region.clicked()
    assert ANNOTATION_LAYER not in viewer.layers
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and "switch to the 2D view to draw a region" in errors[-1]
    assert not any(message.startswith("Draw the failure region") for _, message in notifications)


def test_a_slice_beyond_the_annotated_image_is_refused_not_moved_to_its_edge(make_napari_viewer, tmp_path,
                                                                              notifications):
    """A longer moving image lets the sliders go past the reference: its last slice was recorded instead."""
    viewer = make_napari_viewer()
    reference, _, _ = ellipsoid_pair((16, 48, 48))
    _, longer_moving, _ = ellipsoid_pair((40, 48, 48))
    for array, name in ((reference, "MR"), (longer_moving, "PET")):
        data, kwargs, _ = volume_to_layer_data(ImageVolume(array, GEOMETRY_3D), name)
        viewer.add_image(data, **kwargs)
    panel = panel_on(viewer, tmp_path, "MR")
    viewer.dims.set_current_step(0, 30)
    panel.flag_slice.clicked()
    assert panel.annotations == []
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and "z = 30) lies outside the image, which has slices z = 0 to 15" in errors[-1]
    assert viewed_slice(viewer, viewer.layers["MR"]) == (0, 15)  # what the quivers and markers follow: unchanged
    viewer.dims.set_current_step(0, 15)
    panel.flag_slice.clicked()
    assert [(a.slice_axis, a.slice_index) for a in panel.annotations] == [(0, 15)]


def test_deleting_flags_another_reviewer_withdrew_deletes_the_rest_and_says_so(make_napari_viewer, tmp_path,
                                                                              notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    for index in range(3):
        viewer.dims.set_current_step(0, index)
        panel.note.value = f"flag {index}"
        panel.flag_slice.clicked()
    withdrawn_elsewhere, selected_too, _ = (a.id for a in panel.annotations)
    AnnotationStore(tmp_path / "run").delete(withdrawn_elsewhere, "dr. other")  # another workbench on the folder
    panel.listing.value = [withdrawn_elsewhere, selected_too]
    panel.delete.clicked()
    assert [a.note for a in panel.annotations] == ["flag 2"]
    assert len(panel.listing.choices) == 1
    assert not [message for severity, message in notifications if severity == "error"]
    assert any(message.startswith("1 flag was already withdrawn") for _, message in notifications)


def test_a_sagittal_flag_is_listed_with_its_axis(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    viewer.dims.order = (2, 0, 1)  # x is the slider
    viewer.dims.set_current_step(2, 23)
    panel.flag_slice.clicked()
    (flag,) = panel.annotations
    assert (flag.slice_axis, flag.slice_index) == (2, 23)
    assert panel.listing.native.item(0).text().startswith("slice x = 23")


def test_a_region_is_recorded_on_the_slice_it_was_drawn_on(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    panel.draw_region.clicked()
    draw(viewer, [[5, 10, 10], [5, 10, 20], [5, 20, 20]])
    viewer.dims.set_current_step(0, 9)  # scrolled on before flagging
    panel.flag_region.clicked()
    draw(viewer, [[2, 10, 10], [2, 10, 20], [2, 20, 20]], [[12, 10, 10], [12, 10, 20], [12, 20, 20]])
    panel.flag_region.clicked()
    assert [(a.slice_axis, a.slice_index, len(a.region_world)) for a in panel.annotations] == [
        (0, 5, 1), (0, 2, 1), (0, 12, 1)]
    assert panel.listing.native.item(0).text().startswith("region on z = 5")


def test_a_drawn_ellipse_is_recorded_as_its_outline(make_napari_viewer, tmp_path):
    """Its four bounding-box corners would read as a rectangle in the exported regions."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    panel.draw_region.clicked()
    viewer.layers[ANNOTATION_LAYER].add_ellipses(np.array([[5, 10, 10], [5, 10, 30], [5, 20, 30], [5, 20, 10]]))
    panel.flag_region.clicked()
    (flag,) = panel.annotations
    (outline,) = np.asarray(flag.region_world)
    layer = viewer.layers[ANNOTATION_LAYER]
    voxels = np.asarray([layer.world_to_data(point) for point in outline])
    assert len(voxels) > 4 and (flag.slice_axis, flag.slice_index) == (0, 5)
    np.testing.assert_allclose(((voxels[:, 1] - 15) / 5) ** 2 + ((voxels[:, 2] - 20) / 10) ** 2, 1.0, atol=1e-6)


def test_the_annotation_layer_follows_the_run_from_2d_to_3d(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((48, 48), np.float32), name="image", scale=(1.68, 1.68))
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "image")
    panel.draw_region.clicked()
    draw(viewer, [[10, 10], [10, 20], [20, 20]])
    panel.flag_region.clicked()

    panel.set_run(tmp_path / "run3d", tmp_path, viewer.layers["T1"])
    layer = viewer.layers[ANNOTATION_LAYER]
    assert layer.ndim == 3
    np.testing.assert_allclose(layer.scale, GEOMETRY_3D.spacing)
    draw(viewer, [[5, 10, 10], [5, 10, 20], [5, 20, 20]])
    panel.flag_region.clicked()
    (region,) = panel.annotations
    assert region.slice_index == 5
    np.testing.assert_allclose(region.region_world[0][0], viewer.layers["T1"].data_to_world([5, 10, 10]))


def test_unflagged_shapes_keep_their_place_on_a_run_of_other_spacing(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((48, 48), np.float32), name="fine", scale=(1.0, 1.0))
    viewer.add_image(np.zeros((24, 24), np.float32), name="coarse", scale=(2.0, 2.0))
    panel = panel_on(viewer, tmp_path, "fine")
    panel.draw_region.clicked()
    draw(viewer, [[10, 10], [10, 20], [20, 20]])
    panel.set_run(tmp_path / "coarse", tmp_path, viewer.layers["coarse"])
    layer = viewer.layers[ANNOTATION_LAYER]
    np.testing.assert_allclose(layer.scale, (2.0, 2.0))
    np.testing.assert_allclose(layer.data[0], [[5, 5], [5, 10], [10, 10]])


def test_a_labels_layer_under_the_annotation_name_gets_a_clear_message(make_napari_viewer, tmp_path,
                                                                         notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    viewer.add_labels(np.zeros((16, 48, 48), np.uint8), name=ANNOTATION_LAYER)
    panel.flag_region.clicked()
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and "drawn as shapes" in errors[-1] and "unexpectedly" not in errors[-1]


def test_a_permission_error_is_one_clear_line(notifications):
    report_error(PermissionError(13, "Permission denied", "/runs/case/report.html"), "QC report")
    (message,) = [message for severity, message in notifications if severity == "error"]
    assert "permission denied on /runs/case/report.html" in message and "unexpectedly" not in message


def test_unflagged_regions_of_one_pair_are_dropped_when_another_pair_is_annotated(make_napari_viewer, tmp_path,
                                                                                   notifications):
    viewer = make_napari_viewer()
    for value, name in enumerate(("MR", "CT", "MR 2", "CT 2")):  # two pairs on one grid: nothing else tells
        viewer.add_image(np.full((48, 48), value, np.float32), name=name)  # their regions apart
    panel = AnnotationPanel(viewer)
    panel.set_run(tmp_path / "inputs", tmp_path, viewer.layers["MR"], subject="inputs", pair=("MR", "CT"))
    panel.draw_region.clicked()
    draw(viewer, [[10, 10], [10, 20], [20, 20]], [[30, 30], [30, 40], [40, 40]])
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["MR"], subject="run", pair=("MR", "CT"))
    assert len(viewer.layers[ANNOTATION_LAYER].data) == 2  # the same pair, now run: still to be flagged

    panel.set_run(tmp_path / "run 2", tmp_path, viewer.layers["MR 2"], subject="run", pair=("MR 2", "CT 2"))
    assert panel.subject.value == "run, CT 2 → MR 2: run 2"
    assert len(viewer.layers[ANNOTATION_LAYER].data) == 0
    assert any("2 unflagged regions of CT → MR were dropped" in message for _, message in notifications)
    draw(viewer, [[5, 5], [5, 15], [15, 15]])
    panel.flag_region.clicked()
    (flag,) = panel.annotations
    assert len(flag.region_world) == 1


def test_a_flag_before_any_run_is_about_the_inputs_and_records_their_hashes(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = AnnotationPanel(viewer)
    panel.reviewer.value = "dr. test"
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["T1"], subject="inputs", pair=("T1", "T2"))
    assert not panel.method.enabled
    panel.flag_slice.clicked()
    (on_inputs,) = panel.annotations
    assert (on_inputs.subject, on_inputs.method) == ("inputs", None)
    assert (on_inputs.reference_sha256, on_inputs.moving_sha256) == (
        sha256_of_array(viewer.layers["T1"].data), sha256_of_array(viewer.layers["T2"].data))
    assert "[inputs]" in panel.listing.native.item(0).text()

    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["T1"], subject="run", pair=("T1", "T2"))
    panel.method.value = "bsafusion"
    panel.flag_slice.clicked()
    assert [(a.subject, a.method) for a in panel.annotations] == [("inputs", None), ("output", "bsafusion")]


def test_a_bad_line_hides_no_flag_and_blocks_none(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    store = AnnotationStore(tmp_path / "run")
    store.add(Annotation(category="other", reviewer="a", slice_index=1))
    with store.path.open("a", encoding="utf-8") as handle:  # a record from a newer version
        handle.write('{"action": "add", "category": "new future category", "reviewer": "x", "slice_index": 0, '
                     '"id": "b1", "created": "2025-01-01"}\n')
    panel = panel_on(viewer, tmp_path, "T1")
    assert len(panel.listing.choices) == 1
    warnings = [message for severity, message in notifications if severity == "warning"]
    assert len(warnings) == 1 and f"{store.path}: line 2 is unreadable" in warnings[0]
    panel.flag_slice.clicked()
    assert len(panel.listing.choices) == 2


def test_flags_that_cannot_be_read_are_one_notification_and_no_listing(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    panel.flag_slice.clicked()
    unreadable = tmp_path / "other run"
    (unreadable / ANNOTATIONS_FILE).mkdir(parents=True)
    panel.set_run(unreadable, tmp_path, viewer.layers["T1"])
    assert panel.listing.choices == ()
    errors = [message for severity, message in notifications if severity == "error"]
    assert len(errors) == 1 and f"cannot read {ANNOTATIONS_FILE} in {unreadable}" in errors[0]
    assert "unexpectedly" not in errors[0]


def test_unflagged_regions_stay_when_the_pair_is_only_renamed(make_napari_viewer, tmp_path, notifications):
    """A rename made the pair look like another one and dropped the regions drawn on it."""
    viewer = make_napari_viewer()
    for name, value in (("MR", 0.2), ("CT", 0.7)):
        viewer.add_image(np.full((48, 48), value, np.float32), name=name)
    panel = AnnotationPanel(viewer)
    panel.set_run(tmp_path / "inputs", tmp_path, viewer.layers["MR"], subject="inputs", pair=("MR", "CT"))
    panel.draw_region.clicked()
    draw(viewer, [[10, 10], [10, 20], [20, 20]])
    viewer.layers["CT"].name = "CT head"
    panel.set_run(tmp_path / "inputs", tmp_path, viewer.layers["MR"], subject="inputs", pair=("MR", "CT head"))
    assert len(viewer.layers[ANNOTATION_LAYER].data) == 1
    assert not any("dropped" in message for _, message in notifications)


def test_the_subject_follows_its_layers_through_renames(make_napari_viewer, tmp_path, notifications):
    """Renaming the reference after a run left the tab naming the old layer, and regions dropped later
    were said to be of a pair no longer on screen."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = AnnotationPanel(viewer)
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["T1"], subject="run", pair=("T1", "T2"))
    panel.draw_region.clicked()
    draw(viewer, [[5, 10, 10], [5, 10, 20], [5, 20, 20]])
    viewer.layers["T1"].name = "T1 axial"
    assert panel.subject.value == "run, T2 → T1 axial: run"
    viewer.add_image(np.ones_like(viewer.layers["T2"].data), name="other moving")
    panel.set_run(tmp_path / "other", tmp_path, viewer.layers["T1 axial"], subject="run",
                  pair=("T1 axial", "other moving"))
    dropped = [message for _, message in notifications if "dropped" in message]
    assert dropped == ["1 unflagged region of T2 → T1 axial was dropped: flags belong to the pair they were "
                       "drawn on."], notifications
    panel.disconnect_viewer()
    viewer.layers["T1 axial"].name = "T1 again"
    assert panel.subject.value == "run, other moving → T1 axial: other"  # a closed tab follows nothing


def test_a_flag_made_on_other_inputs_than_the_pair_on_screen_is_listed_as_such(make_napari_viewer, tmp_path):
    """A folder overwritten by a run of a replaced input keeps the old run's flags."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    store = AnnotationStore(tmp_path / "run")
    store.add(Annotation("misalignment", "dr-a", slice_index=1, note="old pair",
                         reference_sha256=sha256_of_array(viewer.layers["T1"].data), moving_sha256="0" * 64))
    store.add(Annotation("other", "dr-a", slice_index=2, note="this pair",
                         reference_sha256=sha256_of_array(viewer.layers["T1"].data),
                         moving_sha256=sha256_of_array(viewer.layers["T2"].data)))
    panel = AnnotationPanel(viewer)
    panel.set_run(tmp_path / "run", tmp_path, viewer.layers["T1"], subject="run", pair=("T1", "T2"))
    listed = [panel.listing.native.item(row).text() for row in range(panel.listing.native.count())]
    assert [text.startswith("(made on other inputs)") for text in listed] == [True, False]
    assert "old pair" in listed[0] and "this pair" in listed[1]


def test_the_cohort_export_message_says_what_was_skipped_and_where(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    run = tmp_path / "runs" / "case1"
    run.mkdir(parents=True)
    (run / "provenance.json").write_text(json.dumps({"inputs": {
        role: {"path": None, "sha256": None, "array_sha256": sha256_of_array(viewer.layers[name].data)}
        for role, name in (("reference", "T1"), ("moving", "T2"))}}), encoding="utf-8")
    store = AnnotationStore(run)
    store.add(Annotation("misalignment", "dr-a", slice_index=1, moving_sha256="0" * 64))
    with store.path.open("a", encoding="utf-8") as handle:  # a record torn by a crash
        handle.write('{"action": "add", "cat\n')
    panel = AnnotationPanel(viewer)
    panel.set_run(run, tmp_path / "runs", viewer.layers["T1"])
    panel.cohort_csv.value = str(tmp_path / "cohort.csv")
    panel.export.clicked()
    (message,) = [text for severity, text in notifications if text.startswith("Exported")]
    assert message == (f"Exported 1 annotations from 1 runs under {tmp_path / 'runs'} to {tmp_path / 'cohort.csv'}; "
                       "1 made on other inputs than "
                       f"their run's (about_other_inputs yes); 1 unusable line skipped, in {store.path} line 2")


def test_delete_with_nothing_selected_says_what_to_select(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    panel = panel_on(viewer, tmp_path, "T1")
    panel.flag_slice.clicked()
    panel.delete.clicked()
    assert len(panel.annotations) == 1
    assert any("select the flags to withdraw" in message for _, message in notifications)


def test_a_suggestion_for_a_2d_image_names_the_image_not_a_slice(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="CT")
    panel = panel_on(viewer, tmp_path, "CT")
    panel.suggest("misalignment", None, "misalignment, 27.6 % flagged")
    assert panel.suggestion.value == "image: misalignment, 27.6 % flagged"
    assert panel.category.value == "misalignment"
