"""The run form's inputs from layers our reader opened, whose files changed since, and layers of frames."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.engine.provenance import describe_input, sha256_of_array
from napari_unifuse.errors import InputError


def test_a_moving_file_replaced_after_it_was_opened_is_fused_and_recorded_as_the_pixels_read(
        make_napari_viewer, tmp_path):
    rng = np.random.default_rng(38)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("t1", "t2")}
    for path in paths.values():
        nib.Nifti1Image(rng.normal(size=(24, 24, 8)).astype(np.float32), np.eye(4)).to_filename(path)
    viewer = make_napari_viewer()
    for path in paths.values():
        viewer.open(str(path), plugin="napari-unifuse")
    form = UniFuseWorkbench(viewer).run_panel
    form.reference.value, form.moving.value = "t1", "t2"
    read = np.array(viewer.layers["t2"].data)

    nib.Nifti1Image(rng.normal(size=(24, 24, 8)).astype(np.float32), np.eye(4)).to_filename(paths["t2"])
    os.utime(paths["t2"], ns=(paths["t2"].stat().st_atime_ns, paths["t2"].stat().st_mtime_ns + 10**9))
    moving = form.selection().request.moving

    np.testing.assert_array_equal(moving.array, read)
    assert any(f"{paths['t2']} changed on disk since it was opened" in warning
               for warning in moving.metadata["warnings"])
    described = describe_input(moving)
    assert described["sha256"] is None and described["array_sha256"] == sha256_of_array(read)
    assert describe_input(form.selection().request.reference)["sha256"] is not None  # t1 untouched: still its file


def test_a_dynamic_layer_chosen_is_refused_with_how_to_take_one_frame(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16, 8), np.float32), name="CT")
    viewer.add_image(np.zeros((3, 16, 16, 8), np.float32), name="dynamic PET")
    form = UniFuseWorkbench(viewer).run_panel
    form.reference.value, form.moving.value = "CT", "dynamic PET"
    with pytest.raises(InputError, match=r"dynamic PET: this is a 4D layer .* 3 frames .*Split Stack"):
        form.selection()
