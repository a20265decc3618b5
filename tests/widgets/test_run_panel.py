"""The run form: the bundled checkpoint it offers, and the extras (ground truth, degradation) of each pair."""

from __future__ import annotations

import numpy as np

from napari_unifuse._qt.run_panel import NO_LABEL
from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.io import Geometry
from napari_unifuse.model.checkpoint import list_checkpoints, read_config

from .conftest import add_pair


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
