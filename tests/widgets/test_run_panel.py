"""The run form: the bundled checkpoint it offers, and the extras (ground truth, degradation) of each pair."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_unifuse._qt.run_panel import FROM_FILE, NO_LABEL, OUTPUT_ROLE, PLUGIN
from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry
from napari_unifuse.io.normalize import intensity_mapping
from napari_unifuse.model.checkpoint import list_checkpoints, read_config

from .conftest import add_pair, ellipsoid_pair
from .test_workbench import make_workbench, run_and_wait


def test_folders_named_like_the_bundled_checkpoints_in_the_working_directory_leave_the_form_working(
        make_napari_viewer, tmp_path, monkeypatch):
    """Started where an earlier `--out` left such a folder, the workbench failed to open with
    "unifuse-2d-harvard is a folder, not a checkpoint file"."""
    bundled = list_checkpoints(method="unifuse")
    for name in bundled:
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    viewer = make_napari_viewer()
    form = UniFuseWorkbench(viewer).run_panel
    add_pair(viewer, shape=(16, 48, 48))
    assert read_config(form.checkpoint.value).spatial_dims == 3
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    assert read_config(form.checkpoint.value).spatial_dims == 2
    assert form.checkpoint.value in bundled


def test_going_back_to_a_pair_brings_back_its_ground_truth_and_degradation(make_napari_viewer, tmp_path):
    """Looking at another pair and coming back dropped them: the re-run's error map silently changed
    from the true error to an estimate, and its run folder changed."""
    viewer = make_napari_viewer()
    add_pair(viewer)  # tagged like sample data: its ground truth is picked with it
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    form.output_root.value = str(tmp_path / "runs")
    form.task.value = "motion"
    folder = workbench.selection.folder
    viewer.add_image(np.zeros((16, 48, 48), np.float32), name="another scan")
    form.moving.value = "another scan"
    assert (form.ground_truth.value, form.task.value) == (NO_LABEL, "auto")
    form.task.value = "metal"  # chosen for this pair only
    form.moving.value = "T2"
    assert (form.ground_truth.value, form.task.value) == ("T2 ground truth", "motion")
    assert workbench.selection.folder == folder
    form.moving.value = "another scan"
    assert (form.ground_truth.value, form.task.value) == (NO_LABEL, "metal")

    viewer.layers["T2 ground truth"].name = "clean T2"  # renamed while another pair is chosen
    form.moving.value = "T2"
    assert (form.ground_truth.value, form.task.value) == ("clean T2", "motion")

    form.moving.value = "another scan"
    viewer.layers.remove("clean T2")
    form.moving.value = "T2"  # its ground truth is gone: none, and the degradation still comes back
    assert (form.ground_truth.value, form.task.value) == (NO_LABEL, "motion")


def test_a_run_s_outputs_are_never_offered_as_inputs_but_a_saved_result_reopened_is(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """Once the inputs of a run were deleted, its checkerboard became the reference of the next pair,
    silently fused with the next patient's MR (whose CT was never used)."""
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    form = workbench.run_panel
    reference, moving, _ = ellipsoid_pair((48, 48))
    viewer.add_image(reference, name="patient1 MR")
    viewer.add_image(moving, name="patient1 CT")
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    outputs = {layer.name for layer in viewer.layers if layer.metadata.get("unifuse", {}).get("role") == OUTPUT_ROLE}
    assert outputs
    for combo in (form.reference, form.moving, form.ground_truth):
        assert not outputs & set(combo.choices)

    viewer.layers.remove("patient1 MR")
    viewer.layers.remove("patient1 CT")
    viewer.add_image(reference[::-1].copy(), name="patient2 MR")
    viewer.add_image(moving[::-1].copy(), name="patient2 CT")
    assert (form.reference.value, form.moving.value) == ("patient2 MR", "patient2 CT")

    # Fusing a result again is still possible, from its file: a file opened is an input like any other.
    workbench.save_outputs()
    [fused] = viewer.open(str(workbench.selection.folder / "fused.nii.gz"), plugin=PLUGIN)
    form.moving.value = fused.name
    assert form.selection().moving_name == fused.name


def test_a_run_refuses_a_chosen_layer_that_is_a_run_s_output(make_napari_viewer):
    """The last guard, whatever way a run's output came to be chosen: named, and how to fuse it anyway."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    form = UniFuseWorkbench(viewer).run_panel
    viewer.layers["CT"].metadata["unifuse"]["role"] = OUTPUT_ROLE
    with pytest.raises(InputError, match="CT.*output of a run.*open the file"):
        form.selection()


def test_a_sample_pair_s_moving_image_deleted_leaves_its_ground_truth_out_of_the_pair(make_napari_viewer):
    """The box that lost its layer takes the default pair, which is never the hidden ground truth:
    the next image opened is the moving image."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = UniFuseWorkbench(viewer)  # referenced: its Qt widgets are deleted with it
    form = workbench.run_panel
    viewer.layers.remove("CT")
    assert "CT ground truth" not in (form.reference.value, form.moving.value)
    viewer.add_image(np.zeros((48, 48), np.float32), name="CT again")
    assert (form.reference.value, form.moving.value) == ("MR", "CT again")


def test_an_eight_bit_layer_made_in_memory_keeps_the_picture_rule(make_napari_viewer):
    """The workbench names a layer without a file by its name: that name is no scanner file, so its
    8 bits stay a picture's (/255), as they were before 8-bit NIfTI volumes took their modality's rule."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    for name in ("console MR", "console PET"):
        viewer.add_image(rng.integers(2, 39, (32, 32)).astype(np.uint8), name=name)
    form = UniFuseWorkbench(viewer).run_panel
    form.reference.value, form.moving.value = "console MR", "console PET"
    for volume in (form.selection().request.reference, form.selection().request.moving):
        assert volume.source in ("console MR", "console PET")
        assert intensity_mapping(volume).method == "scale8bit"


def test_a_path_typed_into_the_open_box_is_opened_when_typing_ends_and_a_missing_one_is_named_as_not_found(
        make_napari_viewer, qtbot, tmp_path, notifications):
    """A typo in the path did nothing: no layer, no message, an empty status line. Each partial path
    was tried as it was typed ("/" opened as a DICOM folder)."""
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    workbench = UniFuseWorkbench(viewer)  # kept: the form's widgets live as long as it
    form = workbench.run_panel
    line = form.open_reference.line_edit.native
    typo = tmp_path / "t1_typo.nii.gz"
    qtbot.keyClicks(line, str(typo))
    assert notifications == [] and len(viewer.layers) == 0
    qtbot.keyClick(line, Qt.Key.Key_Return)
    assert len(viewer.layers) == 0
    assert notifications == [("error", f"Open image: {typo}: file not found")]

    notifications.clear()
    image = tmp_path / "t1.png"
    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48).astype(np.uint8)).save(image)
    line.clear()
    qtbot.keyClicks(line, str(image))
    qtbot.keyClick(line, Qt.Key.Key_Return)
    line.editingFinished.emit()  # leaving the box after Return: the image is not opened twice
    assert [layer.name for layer in viewer.layers] == [form.reference.value] and notifications == []


def test_clearing_the_open_box_opens_nothing_and_says_nothing(make_napari_viewer, qtbot, tmp_path, notifications,
                                                              monkeypatch):
    """An emptied box read as the working directory, and was opened as a DICOM folder."""
    from qtpy.QtCore import Qt

    monkeypatch.chdir(tmp_path)
    viewer = make_napari_viewer()
    workbench = UniFuseWorkbench(viewer)  # kept: the form's widgets live as long as it
    form = workbench.run_panel
    line = form.open_moving.line_edit.native
    qtbot.keyClicks(line, "x")
    qtbot.keyClick(line, Qt.Key.Key_Backspace)
    qtbot.keyClick(line, Qt.Key.Key_Return)
    form.open_moving.value = None
    assert len(viewer.layers) == 0 and notifications == []


def test_a_checkpoint_file_deleted_after_it_was_chosen_is_named_as_not_found(make_napari_viewer, tmp_path,
                                                                              notifications):
    """The form still showed the path, but the run said only "choose a .safetensors checkpoint file"."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2))
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    chosen = tmp_path / "mine.safetensors"
    chosen.write_bytes(b"weights")
    form.output_root.value, form.device.value = str(tmp_path / "runs"), "cpu"
    form.checkpoint.value, form.checkpoint_file.value = FROM_FILE, str(chosen)
    chosen.unlink()
    form.run_button.clicked()
    errors = [message for severity, message in notifications if severity == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"Run UniFuse: checkpoint {str(chosen)!r} not found (")
    assert workbench.worker is None and not (tmp_path / "runs").exists()


def test_the_moving_modality_chosen_for_a_pair_reaches_the_run_its_folder_and_comes_back_with_the_pair(
        make_napari_viewer, tmp_path):
    """A colour PET or SPECT does not say which it is; the class evidence asked for a modality the
    workbench had no setting for."""
    from napari_unifuse._qt.analysis import run_and_analyse
    from napari_unifuse.engine.progress import CancelToken
    from napari_unifuse.errors import UniFuseError

    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    form.output_root.value = str(tmp_path / "runs")
    assert form.moving_modality.value == "auto"
    on_defaults = workbench.selection.folder
    form.moving_modality.value = "spect"
    chosen = workbench.selection
    assert chosen.request.moving_modality == "spect"
    assert chosen.folder != on_defaults  # another normalisation: another run
    viewer.add_image(np.zeros((16, 48, 48), np.float32), name="another scan")
    form.moving.value = "another scan"
    assert form.moving_modality.value == "auto"  # a pair never chosen starts at auto
    form.moving.value = chosen.moving_name
    assert form.moving_modality.value == "spect"
    form.moving_modality.value = "auto"
    assert workbench.selection.folder == on_defaults  # auto is not hashed: the folder of earlier runs stays

    given = []

    class RecordingEngine:  # what run_and_analyse hands the engine, and nothing after
        def run_fusion(self, reference, moving, **options):
            given.append(options["moving_modality"])
            raise UniFuseError("stop here")

    form.moving_modality.value = "pet"
    with pytest.raises(UniFuseError, match="stop here"):
        run_and_analyse(workbench.selection.request, RecordingEngine(), lambda *args: None, CancelToken())
    assert given == ["pet"]
