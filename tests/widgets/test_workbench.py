"""The workbench driven like a user would: real model (random weights, real checkpoint file), xvfb."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from dataclasses import replace
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import pytest

from napari_unifuse._napari_io import layer_to_volume
from napari_unifuse._qt.annotation_panel import ANNOTATION_LAYER
from napari_unifuse._qt.outputs import OutputNames
from napari_unifuse._qt.run_panel import FROM_FILE
from napari_unifuse._qt.workbench import RUN_DONE_WITHOUT_METRICS, UniFuseWorkbench, metrics_file_contents
from napari_unifuse.cli.evaluate import METRIC_COLUMNS
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE, Annotation, AnnotationStore
from napari_unifuse.engine.labels import label_metrics
from napari_unifuse.engine.outputs import METRICS_FILE
from napari_unifuse.engine.overlays import grid_fingerprint, path_keyed_input_fingerprint, run_folder
from napari_unifuse.engine.provenance import sha256_of_array
from napari_unifuse.io import Geometry, ImageVolume, read_image, write_image
from napari_unifuse.model.checkpoint import read_config

from .conftest import GEOMETRY_3D, add_pair, ellipsoid_pair

pytestmark = pytest.mark.gui
RUN_TIMEOUT_MS = 120_000


def make_workbench(viewer, tmp_path, checkpoint) -> UniFuseWorkbench:
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    form.output_root.value = str(tmp_path / "runs")
    form.checkpoint.value = FROM_FILE
    form.checkpoint_file.value = str(checkpoint)
    form.device.value = "cpu"
    return workbench


def run_and_wait(qtbot, workbench) -> None:
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)


def world_of(layer, index) -> np.ndarray:
    return np.asarray(layer.data_to_world(np.asarray(index, dtype=float)))


def expected_world(geometry: Geometry, index) -> np.ndarray:
    return (geometry.index_to_world @ np.append(np.asarray(index, dtype=float), 1.0))[:-1]


def test_3d_run_adds_placed_layers_that_follow_the_slice_and_saves(make_napari_viewer, qtbot, tmp_path,
                                                                   checkpoint_files, notifications):
    viewer = make_napari_viewer()
    _, _, label = add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications

    names = OutputNames.for_inputs("T1", "T2")
    for name in names.all():
        assert name in viewer.layers
    probe = (3, 10, 41)
    for name in (names.fused, names.aligned, names.error, names.jacobian, names.folding, names.quivers):
        layer = viewer.layers[name]
        np.testing.assert_allclose(world_of(layer, probe), expected_world(GEOMETRY_3D, probe), atol=1e-9)
    assert viewer.layers[names.fused].data.shape == label.shape

    # Known label: the error map is |aligned − label| in the moving image's units.
    aligned = workbench.outcome.result.aligned.array
    np.testing.assert_allclose(viewer.layers[names.error].data, np.abs(aligned - label), atol=1e-6)

    # Quivers, plot marker and slice metrics follow the viewed slice.
    quivers = viewer.layers[names.quivers]
    viewer.dims.set_current_step(0, 11)
    assert set(quivers.data[:, 0, 0]) == {11.0}
    assert np.all(quivers.data[:, 1, 0] == 0)  # in-slice components only
    assert workbench.plot.marker_position == 11
    assert workbench.plot.values_label.text().startswith("slice 11:")
    viewer.dims.set_current_step(0, 4)
    assert set(quivers.data[:, 0, 0]) == {4.0}
    assert workbench.plot.marker_position == 4
    viewer.dims.ndisplay = 3  # the whole volume's arrows, through-plane components included
    assert len(set(quivers.data[:, 0, 0])) > 1
    viewer.dims.ndisplay = 2
    assert set(quivers.data[:, 0, 0]) == {4.0}
    outcome = workbench.outcome
    expected_ncc = np.corrcoef(outcome.aligned_units[4].ravel(), outcome.label_units[4].ravel())[0, 1]
    assert float(workbench.metrics_panel.value("NCC to label", "slice")) == pytest.approx(expected_ncc, rel=1e-3)
    assert workbench.metrics_panel.value("NCC to label", "volume") not in ("", "n/a")

    # Density changes without a re-run: a stride of 2 gives four times the arrows of a stride of 4.
    count_at_4 = len(quivers.data)
    workbench.qc_panel.quiver_stride.value = 2
    assert len(quivers.data) == 4 * count_at_4
    assert workbench.worker is None

    board = viewer.layers[names.checkerboard].data
    np.testing.assert_array_equal(board[:, 0, 0], workbench.outcome.reference_grey[:, 0, 0])
    workbench.qc_panel.checker_tile.value = 4
    np.testing.assert_array_equal(viewer.layers[names.checkerboard].data[:, 0, 5], workbench.outcome.aligned_grey[:, 0, 5])

    # Fade / flicker compare the aligned image with the reference: outputs drawn above step aside.
    workbench.qc_panel.fade.value = 0.3
    aligned_layer = viewer.layers[names.aligned]
    assert aligned_layer.visible and aligned_layer.opacity == pytest.approx(0.3)
    # The reference under it, nothing else: not the fused image, not the unaligned moving input.
    assert not viewer.layers[names.fused].visible and not viewer.layers["T2"].visible
    assert viewer.layers["T1"].visible
    workbench.qc_panel.flicker.value = True
    qtbot.waitUntil(lambda: not aligned_layer.visible, timeout=5_000)
    workbench.qc_panel.flicker.value = False
    assert viewer.layers[names.fused].visible and viewer.layers["T2"].visible  # restored when flicker stops

    workbench.save_button.clicked()
    folder = workbench.selection.folder
    assert folder.parent == tmp_path / "runs"
    fused = read_image(folder / "fused.nii.gz")
    assert fused.geometry.allclose(GEOMETRY_3D)
    assert (folder / "provenance.json").is_file() and (folder / "jacobian_determinant.nii.gz").is_file()
    provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["checkpoint"]["path"] == str(checkpoint_files[3].resolve())
    # In-memory layers are tied to their data by hash, the ground truth the error map used included.
    inputs = provenance["inputs"]
    assert inputs["label"]["path"] == "T2 ground truth"
    for role, layer_name in (("reference", "T1"), ("moving", "T2"), ("label", "T2 ground truth")):
        assert inputs[role]["array_sha256"] == sha256_of_array(viewer.layers[layer_name].data)
    assert "ground truth recorded as inputs.label" in provenance["review_maps"]["alignment_error"]
    assert set(provenance["review_maps"]) == {"alignment_error", "jacobian_determinant", "folding"}
    # The volume metrics the Metrics tab shows are saved with the outputs, the label metrics under the
    # keys `unifuse fuse --label` writes for the same numbers (engine.labels.label_metrics).
    saved_metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    cli_metrics = label_metrics(workbench.outcome.result, workbench.outcome.label_units)
    assert set(cli_metrics) == {"mse", "ncc", "ssim"} and not any(key.endswith("to label") for key in saved_metrics)
    assert {key: saved_metrics[key] for key in cli_metrics} == pytest.approx(cli_metrics, nan_ok=True)
    assert saved_metrics["ncc"] == pytest.approx(workbench.outcome.volume_metrics["NCC to label"])
    assert float(workbench.metrics_panel.value("NCC to label", "volume")) == pytest.approx(
        saved_metrics["ncc"], abs=1e-3)
    # Every key is a column `unifuse evaluate` writes the same quantity under, so scripts can join them.
    assert set(saved_metrics) <= set(METRIC_COLUMNS), set(saved_metrics) - set(METRIC_COLUMNS)
    assert saved_metrics["folding_pct"] == pytest.approx(workbench.outcome.volume_metrics["folding %"], nan_ok=True)


def test_2d_run_shows_one_probability_row_and_all_vectors(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                          notifications):
    viewer = make_napari_viewer()
    geometry = Geometry(np.array([0.8, 0.6]), np.array([3.0, -7.0]), np.eye(2))
    add_pair(viewer, shape=(48, 48), geometry=geometry, names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    names = OutputNames.for_inputs("MR", "CT")
    fused = viewer.layers[names.fused]
    np.testing.assert_allclose(world_of(fused, (5, 40)), expected_world(geometry, (5, 40)), atol=1e-9)
    assert workbench.plot.probabilities.shape == (1, 4)
    assert len(viewer.layers[names.quivers].data) == (48 // 4) ** 2


def test_a_one_slice_volume_runs_as_the_2d_image_it_is(make_napari_viewer, qtbot, tmp_path, notifications):
    """A 48×48×1 NIfTI slice: the bundled 2D checkpoint is chosen for it, and the maps and volume
    metrics are its slice's (a 3D determinant or window cannot fit one slice)."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(1, 48, 48), geometry=Geometry.identity(3), names=("MR slice", "CT slice"))
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    assert read_config(form.checkpoint.value).spatial_dims == 2
    form.output_root.value, form.device.value = str(tmp_path / "runs"), "cpu"
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    names = OutputNames.for_inputs("MR slice", "CT slice")
    assert viewer.layers[names.jacobian].data.shape == viewer.layers[names.error].data.shape == (1, 48, 48)
    qtbot.waitUntil(lambda: workbench.outcome.volume_metrics is not None, timeout=RUN_TIMEOUT_MS)
    for metric in ("Q_abf", "folding %", "NCC to label"):
        assert np.isfinite(workbench.outcome.volume_metrics[metric]), metric



def test_a_one_slice_volume_stored_sagittally_is_reviewed_as_one_image(make_napari_viewer, qtbot, tmp_path,
                                                                       notifications):
    """Its quality maps score it as one image: the plot indexed their one score by the stored first
    axis's slice (an IndexError), and suspicious navigation sliced the image into a 48×1 line. Its
    deformed grid crosses in its own plane (it was one solid sheet: every voxel of the 1-voxel axis
    lay on a line)."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48, 1), geometry=Geometry.identity(3), names=("MR slice", "CT slice"))
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    form.output_root.value, form.device.value = str(tmp_path / "runs"), "cpu"
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    assert workbench.outcome.result.quality.slice_axis is None and workbench.plot.is_single_slice
    assert 0.0 < viewer.layers[OutputNames.for_inputs("MR slice", "CT slice").grid].data.mean() < 0.6
    order = viewer.dims.order
    viewer.dims.set_current_step(0, 30)  # the stored first axis: one image whatever the slider says
    assert workbench.plot.values_label.text().startswith("slice 0:")
    workbench.go_to_suspicious(1)
    assert viewer.dims.order == order and workbench.qc_panel.suspicion.value.endswith("of 1 image flagged")

def test_a_coronal_nifti_pair_opened_through_the_reader_runs_and_saves_where_its_header_puts_it(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """Opening a coronal NIfTI raised vispy's "Singular matrix" (its axis permutation was in the
    layer's affine): its layer holds the array in world-axis order, and the run draws and saves on it."""
    import nibabel as nib

    # nibabel voxel (i, j, k) runs along R, S, A: io's array (k, j, i) is (y, z, x) in the world.
    coronal = np.array([[1.2, 0, 0, -20], [0, 0, 1.5, 16], [0, 2.0, 0, -12], [0, 0, 0, 1]])
    reference, moving, _ = ellipsoid_pair((16, 32, 32))  # (z, y, x) as napari shows them
    paths = {}
    for name, array in (("coronal T1", reference), ("coronal T2", moving)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.Nifti1Image(array.transpose(2, 0, 1), coronal).to_filename(paths[name])  # (x, z, y) = (i, j, k)
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    for path in paths.values():
        viewer.open(str(path), plugin="napari-unifuse")
    assert (workbench.run_panel.reference.value, workbench.run_panel.moving.value) == ("coronal T1", "coronal T2")

    run_and_wait(qtbot, workbench)

    assert workbench.outcome is not None, notifications
    file_geometry = read_image(paths["coronal T1"]).geometry  # its array axes are (y, z, x)
    probe, file_probe = (3, 10, 25), (10, 3, 25)
    names = OutputNames.for_inputs("coronal T1", "coronal T2")
    for name in (names.fused, names.error, names.quivers):
        np.testing.assert_allclose(world_of(viewer.layers[name], probe), expected_world(file_geometry, file_probe),
                                   atol=1e-9)
    written = workbench.save_outputs()
    np.testing.assert_allclose(expected_world(read_image(written["fused.nii.gz"]).geometry, probe),
                               expected_world(file_geometry, file_probe), atol=1e-4)


@pytest.fixture
def held_volume_metrics(monkeypatch):
    """The workbench's volume metrics wait for the returned event before computing the real ones."""
    import threading

    import napari_unifuse._qt.workbench as workbench_module

    release = threading.Event()
    real_volume_metrics = workbench_module.volume_metrics

    def held(outcome):
        release.wait(timeout=60)
        return real_volume_metrics(outcome)

    monkeypatch.setattr(workbench_module, "volume_metrics", held)
    return release


@pytest.fixture
def shown_before_metrics(make_napari_viewer, qtbot, tmp_path, checkpoint_files, held_volume_metrics):
    """(viewer, workbench): a run of the T1/T2 pair whose layers are shown and whose volume metrics
    wait for ``held_volume_metrics``."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.outcome is not None, timeout=RUN_TIMEOUT_MS)
    return viewer, workbench


def test_layers_come_before_the_volume_metrics_and_the_report_waits_for_them(qtbot, notifications,
                                                                            held_volume_metrics, shown_before_metrics):
    """The whole-volume metrics take seconds on a clinical volume: the layers are drawn first."""
    from napari_unifuse._qt.analysis import volume_metrics

    viewer, workbench = shown_before_metrics
    names = OutputNames.for_inputs("T1", "T2")
    assert all(name in viewer.layers for name in names.all())
    assert workbench.last_run_seconds is not None
    assert workbench.worker is not None and workbench.outcome.volume_metrics is None
    assert workbench.metrics_panel.value("NCC to label", "volume") == ""
    assert workbench.metrics_panel.value("NCC to label", "slice") not in ("", "n/a")
    assert workbench.save_button.enabled and not workbench.report_button.enabled
    assert not workbench.run_panel.cancel_button.enabled and not workbench.run_panel.run_button.enabled
    workbench.write_qc_report()
    assert any("still being computed" in message for _, message in notifications)
    assert workbench.report_worker is None

    held_volume_metrics.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome.volume_metrics == pytest.approx(volume_metrics(workbench.outcome), nan_ok=True)
    assert workbench.metrics_panel.value("NCC to label", "volume") not in ("", "n/a")
    assert workbench.report_button.enabled
    assert workbench.run_panel.status.value == "done"
    assert workbench.run_panel.progress.value == workbench.run_panel.progress.max


def test_a_save_before_the_volume_metrics_adds_metrics_json_when_they_arrive(
        qtbot, notifications, held_volume_metrics, shown_before_metrics):
    """The notification says to press Save as soon as the layers are in: the metrics come later."""
    _, workbench = shown_before_metrics
    folder = workbench.selection.folder
    workbench.save_outputs()
    assert (folder / "provenance.json").is_file() and not (folder / "metrics.json").exists()
    saved = [message for level, message in notifications if message.startswith("Saved")]
    assert saved and "metrics.json will be written when the volume metrics finish" in saved[-1], notifications

    held_volume_metrics.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    written = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert written == pytest.approx(metrics_file_contents(workbench.outcome.volume_metrics), nan_ok=True)
    assert any(message == f"Saved the volume metrics to {folder / 'metrics.json'}" for _, message in notifications)
    assert not any(level == "error" for level, _ in notifications), notifications


def test_metrics_that_arrive_after_a_save_go_only_into_the_folder_of_the_run_they_are_of(
        qtbot, tmp_path, held_volume_metrics, shown_before_metrics):
    """Saved before its metrics, then the form moved on to another runs folder: the metrics are the
    saved run's, and go where it was saved."""
    _, workbench = shown_before_metrics
    workbench.save_outputs()
    folder = workbench.selection.folder
    workbench.run_panel.output_root.value = str(tmp_path / "other runs")
    held_volume_metrics.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    written = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert written == pytest.approx(metrics_file_contents(workbench.outcome.volume_metrics), nan_ok=True)
    assert not (tmp_path / "other runs").exists()


def test_closing_the_workbench_while_the_metrics_are_computed_leaves_the_viewer_alone(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, held_volume_metrics):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: workbench.outcome is not None, timeout=RUN_TIMEOUT_MS)
    layers = [layer.name for layer in viewer.layers]
    workbench.release_viewer()
    held_volume_metrics.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == layers
    assert workbench.outcome.volume_metrics is None  # the closed workbench took nothing more
    assert not any(level == "error" for level, _ in notifications)


@pytest.mark.parametrize("closed", ["workbench", "viewer"])
def test_a_save_before_the_volume_metrics_still_gets_metrics_json_after_closing(
        qtbot, notifications, held_volume_metrics, shown_before_metrics, closed):
    """The Save notification promised the file; closing the dock or the viewer must not lose it."""
    from napari_unifuse._qt.analysis import volume_metrics

    viewer, workbench = shown_before_metrics
    workbench.save_outputs()
    folder, worker = workbench.selection.folder, workbench.worker
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    if closed == "workbench":
        workbench.release_viewer()
    else:
        viewer.close()
    held_volume_metrics.set()
    qtbot.waitUntil(lambda: bool(finished), timeout=RUN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: (folder / "metrics.json").is_file(), timeout=5_000)
    written = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert written == pytest.approx(metrics_file_contents(volume_metrics(workbench.outcome)), nan_ok=True)
    saved = f"Saved the volume metrics to {folder / 'metrics.json'}"
    # Closing the viewer stops the run's worker (napari): only the file comes, no word from a closed window.
    assert any(message == saved for _, message in notifications) == (closed == "workbench")


@pytest.mark.parametrize(("error", "expected", "missing"), [
    (RuntimeError("metrics exploded"), "failed unexpectedly (RuntimeError: metrics exploded)",
     "computing them failed (RuntimeError: metrics exploded)"),
    (MemoryError("Unable to allocate 9.00 GiB"), "ran out of memory (Unable to allocate 9.00 GiB)",
     "the computer ran out of memory"),
], ids=["bug", "out-of-memory"])
def test_a_failure_of_the_volume_metrics_is_named_and_keeps_the_layers_save_and_report(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch, error, expected, missing):
    import napari_unifuse._qt.workbench as workbench_module

    def failing_volume_metrics(outcome):
        raise error

    monkeypatch.setattr(workbench_module, "volume_metrics", failing_volume_metrics)
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    run_and_wait(qtbot, workbench)
    assert all(name in viewer.layers for name in OutputNames.for_inputs("T1", "T2").all())
    errors = [message for level, message in notifications if level == "error"]
    assert len(errors) == 1 and errors[0].startswith("Volume metrics (the layers are complete)")
    assert expected in errors[0], errors
    assert workbench.run_panel.run_button.enabled
    # The run produced its layers: the status says so, and Save and the report work without the metrics.
    assert workbench.run_panel.status.value == RUN_DONE_WITHOUT_METRICS
    assert workbench.metrics_panel.value("NCC to label", "volume") == ""
    written = workbench.save_outputs()
    assert "fused.nii.gz" in written and not (workbench.selection.folder / "metrics.json").exists()
    assert any(message.endswith("no metrics.json: the volume metrics failed") for _, message in notifications)
    assert workbench.report_button.enabled
    workbench.report_button.clicked()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=RUN_TIMEOUT_MS)
    page = workbench.last_report.read_text(encoding="utf-8")
    assert "No metrics were given for this run." in page
    assert f"The volume metrics are missing: {missing}" in page
    assert [level for level, _ in notifications].count("error") == 1, notifications


def test_out_of_memory_is_explained_and_adds_no_layers(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                      notifications, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory (simulated)")

    monkeypatch.setattr("napari_unifuse.engine.inference.quality_maps", exhausted)
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    before = [layer.name for layer in viewer.layers]
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: any(level == "error" for level, _ in notifications) and workbench.worker is None,
                    timeout=RUN_TIMEOUT_MS)
    errors = [message for level, message in notifications if level == "error"]
    assert len(errors) == 1 and "ran out of memory during the 'quality' stage" in errors[0], errors
    assert [layer.name for layer in viewer.layers] == before
    assert workbench.run_panel.run_button.enabled


def test_cancel_stops_the_run_without_layers(make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    before = [layer.name for layer in viewer.layers]
    workbench.run_panel.run_button.clicked()
    workbench.run_panel.cancel_button.clicked()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == before
    assert workbench.outcome is None
    assert any("cancelled" in message for _, message in notifications)
    assert workbench.run_panel.run_button.enabled and not workbench.run_panel.cancel_button.enabled


@pytest.fixture
def held_run(monkeypatch):
    """The workbench's runs wait for the returned event before fusing; the cancel tokens they got are listed."""
    import threading

    import napari_unifuse._qt.workbench as workbench_module

    release, tokens = threading.Event(), []
    real_run_and_analyse = workbench_module.run_and_analyse

    def held(request, engine, progress, cancel):
        tokens.append(cancel)
        release.wait(timeout=60)
        return real_run_and_analyse(request, engine, progress, cancel)

    monkeypatch.setattr(workbench_module, "run_and_analyse", held)
    return release, tokens


def test_closing_the_viewer_during_a_run_cancels_it_and_draws_nothing(make_napari_viewer, qtbot, tmp_path,
                                                                      checkpoint_files, notifications, held_run):
    release, tokens = held_run
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: bool(tokens), timeout=RUN_TIMEOUT_MS)
    viewer.close()
    try:
        assert tokens[0].cancelled
        assert workbench.plot_dock is None  # released with the window
    finally:
        release.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is None and not viewer.layers
    assert not any(level == "error" for level, _ in notifications), notifications


def test_deleting_an_input_layer_leaves_no_run_chosen_until_another_is(make_napari_viewer, tmp_path,
                                                                       checkpoint_files):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    for name in ("T1", "T2"):  # clearing the list: the form names a deleted layer while it catches up
        viewer.layers.remove(name)
    assert workbench.selection is None
    # Both boxes fell back to the one image left: the label says so, not "choose the images".
    assert workbench.run_panel.folder_label.value == ("(T2 ground truth: the reference and the moving image are "
                                                      "the same layer; choose two images)")
    viewer.add_image(np.zeros((16, 48, 48), np.float32), name="next moving")
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = "T2 ground truth", "next moving"
    assert workbench.selection.moving_name == "next moving"


def test_a_renamed_input_layer_stays_chosen_under_its_new_name(make_napari_viewer, tmp_path, checkpoint_files):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    form = workbench.run_panel
    assert (form.reference.value, form.moving.value, form.ground_truth.value) == ("T1", "T2", "T2 ground truth")
    viewer.layers["T1"].name = "MRI"
    viewer.layers["T2 ground truth"].name = "clean"
    assert (form.reference.value, form.moving.value, form.ground_truth.value) == ("MRI", "T2", "clean")
    assert "MRI" in form.reference.choices and "T1" not in form.moving.choices
    assert (workbench.selection.reference_name, workbench.selection.moving_name) == ("MRI", "T2")
    assert form.folder_label.value == str(workbench.selection.folder)
    assert "T2 → MRI" in workbench.annotation_panel.subject.value
    form.moving.value = "MRI"  # a renamed layer can be chosen like any other
    assert form.moving.value == "MRI"


def test_a_renamed_input_layer_without_a_file_keeps_its_run_folder(make_napari_viewer, tmp_path, checkpoint_files):
    """The folder holds the run's flags and outputs: the same images under other names are that run."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    folder = workbench.selection.folder
    folder.mkdir(parents=True)  # as a Save or a flag leaves it
    viewer.layers["T1"].name = "T1 patient42"
    assert workbench.selection.reference_name == "T1 patient42"
    assert workbench.selection.folder == folder


def test_the_folder_label_names_what_keeps_the_form_from_a_run(make_napari_viewer, tmp_path, checkpoint_files):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    workbench.run_panel.checkpoint_file.value = str(tmp_path)  # a folder, not a checkpoint file
    label = workbench.run_panel.folder_label.value
    assert "is a folder, not a checkpoint file" in label and "reference" not in label


def test_a_pair_of_files_opened_in_the_other_order_finds_its_annotations(make_napari_viewer, tmp_path,
                                                                         checkpoint_files):
    """Files of one name open as 'scan' and 'scan [1]' in the order opened: the run folder's readable
    part differs, its inputs do not."""
    reference, moving, _ = ellipsoid_pair((32, 32))
    paths = {}
    for role, array in (("mri", reference), ("pet", moving)):
        paths[role] = tmp_path / role / "scan.nii.gz"
        paths[role].parent.mkdir()
        write_image(ImageVolume(array, Geometry.identity(2)), paths[role])

    def open_pair(order):
        viewer = make_napari_viewer()
        for role in order:
            viewer.open(str(paths[role]), plugin="napari-unifuse")
        workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
        by_role = {role: layer.name for role in order for layer in viewer.layers
                   if layer.metadata["unifuse"]["source"] == str(paths[role])}
        workbench.run_panel.reference.value, workbench.run_panel.moving.value = by_role["mri"], by_role["pet"]
        return workbench

    first = open_pair(("mri", "pet"))
    first.annotation_panel.flag_slice.clicked()
    flagged = first.annotation_panel.listing.choices
    assert len(flagged) == 1
    second = open_pair(("pet", "mri"))
    assert second.run_panel.reference.value == "scan [1]"  # another name for the same input
    assert second.selection.folder == first.selection.folder
    assert second.annotation_panel.listing.choices == flagged


def test_annotations_are_on_disk_at_once_and_reload_with_the_run(make_napari_viewer, qtbot, tmp_path,
                                                                 checkpoint_files, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    panel = workbench.annotation_panel
    viewer.dims.set_current_step(0, 7)
    panel.category.value = "misalignment"
    panel.note.value = "ventricle edge shifted"
    panel.reviewer.value = "dr. test"
    panel.flag_slice.clicked()
    on_disk = [json.loads(line) for line in (workbench.selection.folder / ANNOTATIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [(r["slice_index"], r["category"], r["note"], r["reviewer"]) for r in on_disk] == [
        (7, "misalignment", "ventricle edge shifted", "dr. test")]

    panel.draw_region.clicked()
    region = viewer.layers[ANNOTATION_LAYER]
    corners = np.array([[7, 5, 5], [7, 5, 20], [7, 20, 20]], dtype=float)
    region.add_polygons([corners])
    panel.category.value = "residual artifact"
    panel.flag_region.clicked()
    saved_region = panel.annotations[-1].region_world[0]
    np.testing.assert_allclose(saved_region, [expected_world(GEOMETRY_3D, c) for c in corners], atol=1e-9)
    folder = workbench.selection.folder
    viewer.close()

    reopened = make_napari_viewer()
    add_pair(reopened)
    again = make_workbench(reopened, tmp_path, checkpoint_files[3])
    assert again.selection.folder == folder
    assert [a.category for a in again.annotation_panel.annotations] == ["misalignment", "residual artifact"]
    assert len(again.annotation_panel.listing.choices) == 2

    csv_path = tmp_path / "cohort.csv"
    again.annotation_panel.cohort_csv.value = str(csv_path)
    again.annotation_panel.export.clicked()
    assert len(csv_path.read_text(encoding="utf-8").splitlines()) == 3  # header + two annotations


def test_a_run_whose_flags_cannot_be_read_can_still_be_saved(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                               notifications):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    (workbench.selection.folder / ANNOTATIONS_FILE).mkdir(parents=True)  # anything open() refuses
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None and workbench.save_button.enabled, notifications
    assert any(message.startswith("UniFuse finished") for _, message in notifications)
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors and all(f"cannot read {ANNOTATIONS_FILE}" in message for message in errors)


def _rgb_reference_and_3d_moving(viewer) -> None:
    viewer.add_image(np.random.default_rng(0).random((32, 32, 3)), rgb=True, name="T1")
    viewer.add_image(np.zeros((16, 32, 32), np.float32), name="T2")


def _volume_and_image(viewer) -> None:
    viewer.add_image(np.zeros((16, 32, 32), np.float32), name="T1")
    viewer.add_image(np.zeros((32, 32), np.float32), name="T2")


def _four_d_moving(viewer) -> None:
    viewer.add_image(np.zeros((16, 32, 32), np.float32), name="T1")
    viewer.add_image(np.zeros((2, 16, 32, 32), np.float32), name="T2")


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_volume_and_image, "both must be 2D or both 3D"),
        (_four_d_moving, "with 2 frames (volumes) of 16x32x32 and a fusion takes one"),
        (_rgb_reference_and_3d_moving, "RGB 2D image"),
        (lambda viewer: None, "open or choose a reference and a moving image"),
    ],
    ids=["2d-vs-3d", "4d", "rgb-vs-3d", "no-layers"],
)
def test_bad_input_is_explained_and_changes_nothing(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                    notifications, build, expected):
    viewer = make_napari_viewer()
    build(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    if len(viewer.layers) == 2:
        workbench.run_panel.reference.value, workbench.run_panel.moving.value = "T1", "T2"
    before = [layer.name for layer in viewer.layers]
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: any(level == "error" for level, _ in notifications) and workbench.worker is None,
                    timeout=RUN_TIMEOUT_MS)
    errors = [message for level, message in notifications if level == "error"]
    assert any(expected in message for message in errors), errors
    assert [layer.name for layer in viewer.layers] == before
    assert not (tmp_path / "runs").exists()


def test_two_images_opened_into_an_empty_viewer_become_the_pair(make_napari_viewer, tmp_path, checkpoint_files):
    from PIL import Image

    for name in ("mri", "ct", "pet"):
        Image.fromarray(np.full((32, 32), len(name) * 20, np.uint8)).save(tmp_path / f"{name}.png")
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    form = workbench.run_panel
    for name in ("mri", "ct"):  # File → Open, one after the other
        viewer.open(str(tmp_path / f"{name}.png"), plugin="napari-unifuse")
    assert (form.reference.value, form.moving.value) == ("mri", "ct")

    viewer.layers.remove("ct")  # back to one image, offered in both boxes
    form.open_reference.value = str(tmp_path / "pet.png")  # the form's own file picker
    assert (form.reference.value, form.moving.value) == ("pet", "mri")


def test_saving_png_outputs_of_scaled_layers_says_the_spacing_is_lost(make_napari_viewer, qtbot, tmp_path,
                                                                     checkpoint_files, notifications):
    from PIL import Image

    viewer = make_napari_viewer()
    yy, xx = np.indices((48, 48))
    for name, shift in (("mri", 0), ("ct", 2)):
        disc = 200.0 * ((yy - 24) ** 2 + (xx - 24 - shift) ** 2 < 14**2)
        Image.fromarray(disc.astype(np.uint8)).save(tmp_path / f"{name}.png")
        viewer.open(str(tmp_path / f"{name}.png"), plugin="napari-unifuse")
        viewer.layers[name].scale = (0.5, 0.5)  # the pixel size the reviewer knows, which PNG cannot hold
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = "mri", "ct"
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    written = workbench.save_outputs()
    assert "fused.png" in written
    assert any("PNG cannot store spacing" in message for _, message in notifications)


def write_report_and_wait(qtbot, workbench) -> None:
    workbench.write_qc_report()
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=RUN_TIMEOUT_MS)


def test_finished_runs_and_reports_leave_no_earlier_run_in_memory(make_napari_viewer, qtbot, tmp_path,
                                                                  checkpoint_files, notifications):
    """napari keeps every worker until the viewer closes: a finished one must hold no run's data."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    dock = viewer.window.add_dock_widget(workbench, name="UniFuse workbench")
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    write_report_and_wait(qtbot, workbench)
    assert workbench.last_report is not None, notifications
    first_outcome = weakref.ref(workbench.outcome)
    first_inputs = weakref.ref(workbench.selection.request.reference)
    run_and_wait(qtbot, workbench)
    gc.collect()
    assert first_outcome() is None and first_inputs() is None

    closed_workbench = weakref.ref(workbench)
    viewer.window.remove_dock_widget(dock)
    del workbench, dock
    gc.collect()
    assert closed_workbench() is None  # with its outcome and loaded model


def test_the_canvas_note_names_its_pair_and_leaves_with_its_layers(make_napari_viewer, qtbot, tmp_path,
                                                                   checkpoint_files, notifications):
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    overlay = viewer.canvas.overlays["text"]
    fused = OutputNames.for_inputs("MR", "CT").fused
    run_and_wait(qtbot, workbench)
    assert overlay.visible and overlay.text.startswith(f"{fused}:\nalignment guard: "), notifications
    viewer.layers.remove(fused)
    assert not overlay.visible and overlay.text == ""

    run_and_wait(qtbot, workbench)
    assert overlay.visible
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR 2", "CT 2"))
    workbench.run_panel.run_button.clicked()  # another pair: the note stays with the last one's layers until its own
    assert overlay.visible and overlay.text.startswith(f"{fused}:")
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert overlay.text.startswith(OutputNames.for_inputs("MR 2", "CT 2").fused)
    # The last pair's arrows go: without their field they could no longer follow the slider.
    assert OutputNames.for_inputs("MR", "CT").quivers not in viewer.layers
    assert OutputNames.for_inputs("MR 2", "CT 2").quivers in viewer.layers
    workbench.release_viewer()
    assert not overlay.visible


def test_images_opened_after_a_run_become_the_next_pair(make_napari_viewer, qtbot, tmp_path, checkpoint_files,
                                                        notifications):
    from PIL import Image

    for index, name in enumerate(("mri1", "ct1", "mri2", "ct2")):
        Image.fromarray(np.full((32, 32), 40 + 30 * index, np.uint8)).save(tmp_path / f"{name}.png")
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    form = workbench.run_panel
    for name in ("mri1", "ct1"):  # File → Open or a drop, one after the other
        viewer.open(str(tmp_path / f"{name}.png"), plugin="napari-unifuse")
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications

    viewer.open(str(tmp_path / "mri2.png"), plugin="napari-unifuse")
    assert (form.reference.value, form.moving.value) == ("mri2", "mri2")
    form.run_button.clicked()  # half a pair: said, not a silent re-run of the last one
    assert workbench.worker is None
    assert any("same layer" in message for level, message in notifications if level == "error")
    viewer.open(str(tmp_path / "ct2.png"), plugin="napari-unifuse")
    assert (form.reference.value, form.moving.value) == ("mri2", "ct2")

    run_and_wait(qtbot, workbench)  # the form's own file picker still swaps one image of the pair
    form.open_reference.value = str(tmp_path / "mri1.png")
    assert (form.reference.value, form.moving.value) == (viewer.layers[-1].name, "ct2")


def test_save_is_refused_while_another_run_writes_into_the_run_folder(make_napari_viewer, qtbot, tmp_path,
                                                                      checkpoint_files, notifications):
    """A `unifuse fuse` into the same folder holds its lock from its "already done?" check to its
    write: a Save meanwhile would mix the two runs' files."""
    from napari_unifuse.engine.outputs import PROVENANCE_FILE, output_folder_lock

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    folder = workbench.selection.folder
    with output_folder_lock(folder):
        assert workbench.save_outputs() is None
        assert not (folder / PROVENANCE_FILE).exists()
    assert any("another unifuse run is writing into this folder" in message for _, message in notifications)

    written = workbench.save_outputs()
    assert PROVENANCE_FILE in written and (folder / PROVENANCE_FILE).is_file()


def test_a_save_cut_short_by_a_review_map_leaves_no_run_that_looks_done(make_napari_viewer, qtbot, tmp_path,
                                                                        checkpoint_files, notifications,
                                                                        monkeypatch):
    """The review maps used to be written after provenance.json had marked the folder done."""
    import napari_unifuse.engine.outputs as outputs
    from napari_unifuse.engine.outputs import PROVENANCE_FILE

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    real_write_image = outputs.write_image

    def disk_full(volume, path):
        if volume.metadata.get("role") == "folding":
            raise OSError(28, "No space left on device")
        return real_write_image(volume, path)

    monkeypatch.setattr(outputs, "write_image", disk_full)
    assert workbench.save_outputs() is None
    assert not (workbench.selection.folder / PROVENANCE_FILE).exists()
    assert any("folding.nii.gz: cannot be written (No space left on device)" in message
               for _, message in notifications)
    monkeypatch.undo()
    assert (workbench.selection.folder / "folding.nii.gz").name in workbench.save_outputs()


def add_second_2d_pair(viewer) -> None:
    """A 2D pair "MR 2" / "CT 2" of other images than add_pair's "MR" / "CT" (another run folder)."""
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR 2", "CT 2"))
    for name in ("MR 2", "CT 2"):
        viewer.layers[name].data = viewer.layers[name].data + 0.05


def test_a_save_while_another_pair_runs_promises_no_metrics_the_run_on_screen_lost(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch, held_run):
    import napari_unifuse._qt.workbench as workbench_module

    release, tokens = held_run
    real_volume_metrics = workbench_module.volume_metrics
    failures = [MemoryError("Unable to allocate 9.00 GiB")]

    def failing_once(outcome):
        if failures:
            raise failures.pop()
        return real_volume_metrics(outcome)

    monkeypatch.setattr(workbench_module, "volume_metrics", failing_once)
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    release.set()
    run_and_wait(qtbot, workbench)
    assert workbench.run_panel.status.value == RUN_DONE_WITHOUT_METRICS, notifications
    folder = workbench.selection.folder
    add_second_2d_pair(viewer)
    release.clear()
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: len(tokens) == 2, timeout=RUN_TIMEOUT_MS)
    workbench.save_outputs()  # MR / CT, still on screen
    release.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.selection.reference_name == "MR 2", notifications
    assert (folder / "provenance.json").is_file() and not (folder / METRICS_FILE).exists()
    saved = [message for _, message in notifications if message.startswith("Saved")]
    assert len(saved) == 1 and saved[0].endswith(f"no {METRICS_FILE}: the volume metrics failed"), notifications


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_flags_on_a_run_record_the_arrays_it_read_whatever_became_of_its_layers(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, held_run, change):
    release, tokens = held_run
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    read = [sha256_of_array(layer_to_volume(viewer.layers[name]).array) for name in ("MR", "CT")]
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: bool(tokens), timeout=RUN_TIMEOUT_MS)
    moving = viewer.layers["CT"]
    viewer.layers.remove(moving)
    if change == "replaced":
        viewer.add_image(np.asarray(moving.data) + 1.0, name="CT")
    release.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.outcome is not None, notifications
    workbench.annotation_panel.add_slice_flag()
    record = json.loads((workbench.selection.folder / ANNOTATIONS_FILE).read_text(encoding="utf-8"))
    assert [record["reference_sha256"], record["moving_sha256"]] == read, notifications


def test_a_cancelled_run_of_another_pair_leaves_the_canvas_note_of_the_run_on_screen(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, held_run):
    release, tokens = held_run
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    overlay = viewer.canvas.overlays["text"]
    release.set()
    run_and_wait(qtbot, workbench)
    note = overlay.text
    assert overlay.visible and note.startswith(OutputNames.for_inputs("MR", "CT").fused), notifications
    add_second_2d_pair(viewer)
    release.clear()
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: len(tokens) == 2, timeout=RUN_TIMEOUT_MS)
    workbench.run_panel.cancel_button.clicked()
    release.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert workbench.selection.reference_name == "MR" and workbench.run_panel.status.value == "stopped"
    assert overlay.visible and overlay.text == note


def test_the_open_box_opens_a_siemens_ima_file_and_explains_a_dicom_name_napari_has_no_reader_for(
        make_napari_viewer, tmp_path, notifications):
    import SimpleITK as sitk

    written = tmp_path / "slice.dcm"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(12, 10)), str(written))
    viewer = make_napari_viewer()
    workbench = UniFuseWorkbench(viewer)
    form = workbench.run_panel
    ima = written.rename(tmp_path / "PHANTOM.MR.HEAD.0002.0001.2026.12.06.IMA")
    form.open_reference.value = str(ima)
    assert form.reference.value in viewer.layers and viewer.layers[form.reference.value].data.shape[-2:] == (12, 10)

    unusual = ima.rename(tmp_path / "SCAN_A")  # DICOM by content, but no name napari's patterns offer us for
    viewer.layers.clear()
    form.open_moving.value = str(unusual)
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors == [f"Open image: {unusual}: napari has no compatible UniFuse reader for this file name; if it is "
                      "a DICOM file, rename it to end in .dcm and open it again"]


def test_a_run_folder_holds_one_result_and_only_that_results_report(make_napari_viewer, qtbot, tmp_path,
                                                                     checkpoint_files, notifications):
    """Settings that change the result name another folder; runs sharing one (another ground truth)
    never leave a report.html beside outputs saved from another run."""
    from napari_unifuse.engine.outputs import REPORT_FILE

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    form = workbench.run_panel
    folder = workbench.selection.folder
    form.tile_size.value = 32
    assert form.folder_label.value != str(folder)
    form.tile_size.value = None
    form.task.value = form.task.choices[1]
    assert form.folder_label.value != str(folder)
    form.task.value = "auto"
    assert form.ground_truth.value == "CT ground truth"
    run_and_wait(qtbot, workbench)
    write_report_and_wait(qtbot, workbench)
    assert (folder / REPORT_FILE).is_file(), notifications

    form.ground_truth.value = "none"  # the same fused image: the same folder, other metrics
    run_and_wait(qtbot, workbench)
    assert workbench.selection.folder == folder
    workbench.save_outputs()
    assert not (folder / REPORT_FILE).exists()  # the labelled run's page is not this run's
    assert "ncc" not in json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))

    form.ground_truth.value = "CT ground truth"
    run_and_wait(qtbot, workbench)
    workbench.write_qc_report()
    assert workbench.report_worker is None and not (folder / REPORT_FILE).exists()
    assert any("outputs saved from another run" in message for level, message in notifications if level == "error")
    workbench.save_outputs()
    write_report_and_wait(qtbot, workbench)
    workbench.save_outputs()  # this run's own page stays
    assert (folder / REPORT_FILE).is_file()


def test_save_while_the_qc_report_is_written_says_to_wait_for_it(make_napari_viewer, qtbot, tmp_path,
                                                                 checkpoint_files, notifications):
    from napari_unifuse._qt.workbench import REPORT_BEING_WRITTEN

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, workbench)
    workbench.write_qc_report()
    assert workbench.save_outputs() is None
    assert ("error", f"Save outputs: {REPORT_BEING_WRITTEN}") in notifications
    qtbot.waitUntil(lambda: workbench.report_worker is None, timeout=RUN_TIMEOUT_MS)
    assert "provenance.json" in workbench.save_outputs()


def test_once_every_layer_of_the_run_is_deleted_flags_are_about_the_pair_the_form_names(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    """Flags made on pair B went into the folder of run A, whose outputs were all gone (its inputs
    stay loaded, as a reviewer who clears a run's outputs leaves them)."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("A MR", "A CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    panel = workbench.annotation_panel
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    run_a = workbench.selection.folder
    add_pair(viewer, shape=(40, 40), geometry=Geometry.identity(2), names=("B MR", "B CT"))
    workbench.run_panel.reference.value, workbench.run_panel.moving.value = "B MR", "B CT"
    assert panel.store.run_dir == run_a  # run A is on screen: its flags stay with it

    for layer in [layer for layer in viewer.layers if not layer.name.startswith(("A MR", "A CT", "B "))]:
        viewer.layers.remove(layer)
    pair_b = workbench.run_panel.selection().folder
    assert panel.store.run_dir == pair_b and panel.subject.value.startswith("inputs, B CT → B MR")
    panel.reviewer.value = "dr. test"
    panel.flag_slice.clicked()
    assert (pair_b / ANNOTATIONS_FILE).is_file() and not (run_a / ANNOTATIONS_FILE).exists()


def test_the_cohort_export_searches_the_runs_folder_the_form_shows_after_a_run(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    from napari_unifuse.engine.annotations import Annotation, AnnotationStore

    cohort = tmp_path / "cohort runs"
    AnnotationStore(cohort / "case").add(Annotation("other", "dr. x", slice_index=0, note="cohort case"))
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    panel = workbench.annotation_panel
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    workbench.run_panel.output_root.value = str(cohort)
    panel.cohort_csv.value = str(tmp_path / "cohort.csv")
    panel.export.clicked()
    assert "cohort case" in (tmp_path / "cohort.csv").read_text(encoding="utf-8")
    assert any(message.startswith(f"Exported 1 annotations from 1 runs under {cohort} to")
               for _, message in notifications)


def test_the_workbench_docked_as_a_plugin_flags_and_draws_on_the_run_it_shows(make_napari_viewer, qtbot, tmp_path,
                                                                              checkpoint_files, notifications):
    """napari docks a plugin's widget with a PublicOnlyProxy of the viewer, which hands out a new
    proxy of a layer at each lookup: the weak references the workbench kept to the run's layers died
    at once, and Flag slice / Draw region failed after every run ('NoneType' has no attribute 'ndim')."""
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(8, 32, 32))
    _, workbench = viewer.window.add_plugin_dock_widget("napari-unifuse", "UniFuse workbench")
    form = workbench.run_panel
    form.reference.value, form.moving.value = "T1", "T2"
    form.output_root.value = str(tmp_path / "runs")
    form.checkpoint.value = FROM_FILE
    form.checkpoint_file.value = str(checkpoint_files[3])
    form.device.value = "cpu"
    workbench.annotation_panel.reviewer.value = "dr test"
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    assert workbench.results.layer("fused") is not None
    viewer.dims.set_current_step(0, 5)
    workbench.annotation_panel.flag_slice.clicked()
    workbench.annotation_panel.draw_region.clicked()
    assert not [text for severity, text in notifications if severity == "error"], notifications
    flags = [json.loads(line) for line in (workbench.annotation_panel.store.run_dir / ANNOTATIONS_FILE)
             .read_text(encoding="utf-8").splitlines()]
    assert [(flag["subject"], flag["slice_index"]) for flag in flags] == [("output", 5)]


def test_flags_of_an_earlier_version_that_knew_runs_by_paths_are_pointed_at_once(make_napari_viewer, tmp_path,
                                                                                  checkpoint_files, notifications):
    """Upgrading must not hide a reviewer's flags: the folder an earlier version gave the same pair is named."""
    viewer = make_napari_viewer()
    add_pair(viewer)
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    form, folder = workbench.run_panel, workbench.selection.folder
    request = workbench.selection.request
    fingerprints = (path_keyed_input_fingerprint(request.reference, "T1"),
                    path_keyed_input_fingerprint(request.moving, "T2"))
    stem = Path(form.checkpoint_choice()).stem  # those versions hashed the checkpoint's name alone
    digest = hashlib.sha256("\n".join((*fingerprints, stem)).encode()).hexdigest()[:10]
    earlier = folder.parent / f"T1+T2__{stem}__{digest}"
    AnnotationStore(earlier).add(Annotation("other", "dr", slice_index=3, created="2026-12-05T09:00:00+00:00"))

    form.selection()
    form.selection()  # every change of the form asks again: said once
    told = [text for _, text in notifications if str(earlier / ANNOTATIONS_FILE) in text]
    assert len(told) == 1 and "earlier version" in told[0] and str(folder) in told[0]


def test_a_pair_napari_own_reader_opened_keeps_the_run_folder_and_flags_of_our_readers(make_napari_viewer, tmp_path,
                                                                                        checkpoint_files):
    """napari asks which reader opens a PNG: the other choice next session must still list the flags."""
    for name, seed in (("ct", 1), ("mr", 2)):
        imageio.imwrite(tmp_path / f"{name}.png",
                        np.random.default_rng(seed).integers(0, 255, size=(32, 32), dtype=np.uint8))

    def folder_when_opened_by(plugin: str) -> Path:
        viewer = make_napari_viewer()
        for name in ("ct", "mr"):
            viewer.open(str(tmp_path / f"{name}.png"), plugin=plugin)
        workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
        workbench.run_panel.reference.value, workbench.run_panel.moving.value = "ct", "mr"
        return workbench.run_panel.selection().folder

    ours = folder_when_opened_by("napari-unifuse")
    assert folder_when_opened_by("napari") == ours

    # Flags made when a pair opened by napari's reader was keyed by its grid (up to 2026-12-07) are still listed.
    viewer = make_napari_viewer()
    for name in ("ct", "mr"):
        viewer.open(str(tmp_path / f"{name}.png"), plugin="napari")
    request = make_workbench(viewer, tmp_path, checkpoint_files[2]).run_panel.selection().request
    grid_keyed = run_folder(ours.parent, "ct", "mr", str(checkpoint_files[2]),
                            (grid_fingerprint(request.reference), grid_fingerprint(request.moving)))
    AnnotationStore(grid_keyed).add(Annotation("misalignment", "dr", slice_index=0))
    assert grid_keyed != ours and folder_when_opened_by("napari") == grid_keyed


def test_flags_an_earlier_version_keyed_by_layer_name_are_pointed_at_for_files_napari_own_reader_opened(
        make_napari_viewer, tmp_path, checkpoint_files, notifications):
    """Up to 2026-12-06 a layer napari's own reader opened had no file for the workbench: its run
    folder was keyed by the layer's name, shape and pixels, not by the file it now finds."""
    for name, seed in (("ct", 1), ("mr", 2)):
        imageio.imwrite(tmp_path / f"{name}.png",
                        np.random.default_rng(seed).integers(0, 255, size=(32, 32), dtype=np.uint8))
    viewer = make_napari_viewer()
    for name in ("ct", "mr"):
        viewer.open(str(tmp_path / f"{name}.png"), plugin="napari")
    form = make_workbench(viewer, tmp_path, checkpoint_files[2]).run_panel
    form.reference.value, form.moving.value = "ct", "mr"
    selection = form.selection()
    assert selection.request.reference.source == str(tmp_path / "ct.png")  # the file is found now
    without_files = (replace(selection.request.reference, source=None), replace(selection.request.moving, source=None))
    fingerprints = tuple(path_keyed_input_fingerprint(volume, name) for volume, name in zip(without_files, ("ct", "mr")))
    stem = Path(form.checkpoint_choice()).stem  # those versions hashed the checkpoint's name alone
    digest = hashlib.sha256("\n".join((*fingerprints, stem)).encode()).hexdigest()[:10]
    earlier = selection.folder.parent / f"ct+mr__{stem}__{digest}"
    AnnotationStore(earlier).add(Annotation("other", "dr", slice_index=0, created="2026-12-05T09:00:00+00:00"))

    form.selection()

    told = [text for _, text in notifications if str(earlier / ANNOTATIONS_FILE) in text]
    assert len(told) == 1 and "earlier version" in told[0]
