"""The numpy behind the review views (engine.overlays), checked against hand-built expectations."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from napari_unifuse.engine.overlays import (
    checkerboard,
    deformed_grid,
    display_grey,
    grid_fingerprint,
    input_fingerprint,
    joined_run_folder,
    other_folders_of_run,
    path_keyed_input_fingerprint,
    path_keyed_run_folder,
    run_folder,
    slice_quivers,
)
from napari_unifuse.io import Geometry, ImageVolume, read_image, write_image


def test_checkerboard_alternates_in_plane_on_every_slice():
    board = checkerboard(np.zeros((3, 8, 8)), np.ones((3, 8, 8)), tile=4)
    expected_slice = np.kron([[0, 1], [1, 0]], np.ones((4, 4)))
    for z in range(3):
        np.testing.assert_array_equal(board[z], expected_slice)


def test_slice_quivers_keep_in_slice_components_and_full_length_in_mm():
    u = np.zeros((3, 4, 6, 6), np.float32)
    u[0], u[1], u[2] = 2.0, 3.0, 4.0  # through-plane 2 voxels, in-plane (3, 4)
    quivers = slice_quivers(u, np.array([2.0, 1.0, 1.0]), stride=3, slice_axis=0, slice_index=2)
    assert quivers.vectors.shape == (4, 2, 3)  # 2 × 2 grid points on one slice
    assert set(quivers.vectors[:, 0, 0]) == {2.0}
    np.testing.assert_array_equal(quivers.vectors[:, 1], np.tile([0.0, 3.0, 4.0], (4, 1)))
    np.testing.assert_allclose(quivers.magnitude_mm, np.hypot(5.0, 4.0))  # sqrt((2·2)² + 3² + 4²)


def test_deformed_grid_moves_against_a_uniform_displacement():
    still = deformed_grid(np.zeros((2, 12, 12), np.float32), spacing=4)
    assert np.all(still[0] == 1)  # row 0 is a horizontal line
    assert set(np.flatnonzero(still[1] == 1)) == {0, 4, 8}  # other rows cross the vertical lines
    shifted = np.zeros((2, 12, 12), np.float32)
    shifted[1] = 1.0  # sample one column to the right: lines appear one column to the left
    moved = deformed_grid(shifted, spacing=4)
    np.testing.assert_array_equal(moved[5, 3:11:4], 1.0)
    assert moved[5, 4] == 0.0


def test_display_grey_maps_a_shared_window_to_unit_range():
    volume = ImageVolume(np.linspace(0, 100, 1000, dtype=np.float32).reshape(10, 10, 10), Geometry.identity(3))
    assert display_grey(volume, (0.0, 50.0)).max() == 1.0
    np.testing.assert_allclose(display_grey(volume, (0.0, 200.0)), volume.array / 200.0, atol=1e-6)


def test_run_folder_is_stable_for_the_same_inputs_and_differs_by_checkpoint(tmp_path):
    first = run_folder(tmp_path, "T1", "T2 moving", "ckpt-a", ("a", "b"))
    assert first == run_folder(tmp_path, "T1", "T2 moving", "ckpt-a", ("a", "b"))
    assert first != run_folder(tmp_path, "T1", "T2 moving", "ckpt-b", ("a", "b"))
    assert first != run_folder(tmp_path, "T1", "T2 moving", "ckpt-a", ("a", "c"))
    assert first.parent == tmp_path and " " not in first.name


def test_two_checkpoint_files_of_one_name_or_one_retrained_get_different_run_folders(tmp_path):
    """Training writes every run's weights as last.safetensors; they are different models."""
    first, second = tmp_path / "runA" / "last.safetensors", tmp_path / "runB" / "last.safetensors"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"weights")
    folder = run_folder(tmp_path, "T1", "T2", str(first), ("a", "b"))

    assert folder.name.startswith("T1+T2__last__")
    assert folder != run_folder(tmp_path, "T1", "T2", str(second), ("a", "b"))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # retrained in place
    assert folder != run_folder(tmp_path, "T1", "T2", str(first), ("a", "b"))


def test_a_file_replaced_in_place_by_another_image_gets_another_run_folder(tmp_path):
    """Same path, other pixels: the earlier run's flags and saved outputs are not this image's."""
    path = tmp_path / "moving.nii.gz"
    write_image(ImageVolume(np.zeros((4, 8, 8), np.float32), Geometry.identity(3)), path)
    before = input_fingerprint(read_image(path))
    assert before == input_fingerprint(read_image(path))  # reopened unchanged: the same run
    write_image(ImageVolume(np.ones((4, 8, 8), np.float32), Geometry.identity(3)), path)
    after = input_fingerprint(read_image(path))
    assert after != before
    assert run_folder(tmp_path, "T1", "moving", "ckpt", ("T1", before)) != run_folder(
        tmp_path, "T1", "moving", "ckpt", ("T1", after))


def test_an_input_without_a_file_is_known_by_its_content_and_placement_not_its_layer_name():
    """A renamed layer (sample data, another plugin's reader, the console) keeps its run folder."""
    image = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    placed = Geometry(np.array([2.0, 1.0, 1.0]), np.array([-10.0, 0.0, 5.0]), np.eye(3))
    fingerprint = input_fingerprint(ImageVolume(image, placed, source="T1 reference"))

    assert input_fingerprint(ImageVolume(image.copy(), placed, source="T1 patient42")) == fingerprint
    assert input_fingerprint(ImageVolume(image + 1, placed, source="T1 reference")) != fingerprint
    moved = Geometry(placed.spacing, placed.origin + np.array([0.0, 0.0, 1.0]), placed.direction)
    assert input_fingerprint(ImageVolume(image, moved, source="T1 reference")) != fingerprint
    as_integers = image.view(np.int32)  # the same bytes read as other values
    assert input_fingerprint(ImageVolume(as_integers, placed, source="T1 reference")) != fingerprint


def test_the_same_inputs_under_other_layer_names_find_their_existing_run_folder(tmp_path):
    """Files opened in another order, or renamed layers: other names, the same inputs and model."""
    first = run_folder(tmp_path, "scan", "scan [1]", "ckpt-a", ("mri", "pet"))
    assert run_folder(tmp_path, "scan [1]", "scan", "ckpt-a", ("mri", "pet")) != first  # nothing there yet
    first.mkdir()
    assert run_folder(tmp_path, "scan [1]", "scan", "ckpt-a", ("mri", "pet")) == first
    assert run_folder(tmp_path, "MRI", "PET", "ckpt-a", ("mri", "pet")) == first
    assert run_folder(tmp_path, "scan [1]", "scan", "ckpt-b", ("mri", "pet")) != first  # another model
    assert run_folder(tmp_path, "scan [1]", "scan", "ckpt-a", ("pet", "mri")) != first  # inputs swapped


def test_of_several_folders_of_one_run_the_most_recently_modified_is_reused(tmp_path):
    folders = [run_folder(tmp_path, reference, "moving", "ckpt", ("a", "b")) for reference in ("T1", "MRI")]
    for folder, seconds in zip(folders, (2_000_000_000, 1_000_000_000), strict=True):
        folder.mkdir()
        os.utime(folder, (seconds, seconds))
    (tmp_path / f"newer-file{folders[0].name[len('T1+moving'):]}").write_text("not a folder")
    assert folders[0] != folders[1]
    assert run_folder(tmp_path, "other", "names", "ckpt", ("a", "b")) == folders[0]


def test_a_run_folder_chosen_before_it_existed_joins_the_one_another_writer_made_and_names_the_others(tmp_path):
    """Two workbenches chose their folders for the same inputs under other names before either wrote."""
    ours, theirs, other_model = (run_folder(tmp_path, reference, "moving", checkpoint, ("a", "b"))
                                 for reference, checkpoint in (("T1", "ckpt"), ("MRI", "ckpt"), ("T1", "ckpt-b")))
    assert joined_run_folder(ours) == ours  # nothing made yet
    theirs.mkdir()
    other_model.mkdir()
    assert joined_run_folder(ours) == theirs
    assert other_folders_of_run(theirs) == []
    ours.mkdir()  # made all the same (both wrote before either looked again): each keeps its own, and names the other
    assert joined_run_folder(ours) == ours
    assert other_folders_of_run(ours) == [theirs] and other_folders_of_run(theirs) == [ours]
    assert joined_run_folder(tmp_path / "not a run folder") == tmp_path / "not a run folder"


def test_settings_that_change_the_result_get_their_own_run_folder_and_unset_ones_keep_the_old_one(tmp_path):
    """Two runs' outputs and reports in one folder would describe different results."""
    default = run_folder(tmp_path, "T1", "T2", "ckpt", ("a", "b"))
    assert run_folder(tmp_path, "T1", "T2", "ckpt", ("a", "b"), {"tile size": None, "degradation": "auto"}) == default
    tiled = run_folder(tmp_path, "T1", "T2", "ckpt", ("a", "b"), {"tile size": 64, "degradation": "auto"})
    declared = run_folder(tmp_path, "T1", "T2", "ckpt", ("a", "b"), {"tile size": None, "degradation": "noise"})
    assert len({default, tiled, declared}) == 3
    assert tiled == run_folder(tmp_path, "T1", "T2", "ckpt", ("a", "b"), {"degradation": "auto", "tile size": 64})


def test_deformed_grid_lines_lie_in_the_last_two_axes_so_first_axis_motion_leaves_them_straight():
    """As its docstring says: every slice along the first axis holds the same grid, and a shift along
    that axis changes nothing."""
    still = deformed_grid(np.zeros((3, 8, 12, 12), np.float32), spacing=4)
    assert all(np.array_equal(still[z], still[0]) for z in range(8))
    through_plane = np.zeros((3, 8, 12, 12), np.float32)
    through_plane[0] = 2.0
    np.testing.assert_array_equal(deformed_grid(through_plane, spacing=4)[1:-2], still[1:-2])


def test_deformed_grid_of_a_one_slice_coronal_volume_draws_its_lines_in_the_slice_plane():
    """A (z, 1, x) coronal slice is shown in its own (z, x) plane: the lines cross there and bend with
    the in-plane field, as on a 2D image, instead of the 1-voxel y axis making every voxel a line."""
    in_plane = np.zeros((2, 12, 12), np.float32)
    in_plane[1] = 1.0  # one column along x
    coronal = np.zeros((3, 12, 1, 12), np.float32)
    coronal[2] = 1.0
    grid = deformed_grid(coronal, spacing=4, single_slice_axis=1)
    assert grid.shape == (12, 1, 12)
    np.testing.assert_array_equal(grid[:, 0, :], deformed_grid(in_plane, spacing=4))
    assert 0.0 < grid.mean() < 0.5


def test_the_run_folder_of_a_version_that_knew_files_by_their_paths_is_found_for_the_same_files(tmp_path):
    for name in ("ct", "mr"):
        write_image(ImageVolume(np.full((4, 8, 8), 7.0, np.float32), Geometry.identity(3)), tmp_path / f"{name}.nii.gz")
    reference, moving = read_image(tmp_path / "ct.nii.gz"), read_image(tmp_path / "mr.nii.gz")
    # Named as 576ac67's workbench named it: the files' resolved paths and the checkpoint's name, hashed.
    paths = f"{(tmp_path / 'ct.nii.gz').resolve()}\n{(tmp_path / 'mr.nii.gz').resolve()}\nunifuse-3d-phantom"
    earlier = tmp_path / "runs" / f"ct+mr__unifuse-3d-phantom__{hashlib.sha256(paths.encode()).hexdigest()[:10]}"
    earlier.mkdir(parents=True)
    fingerprints = (path_keyed_input_fingerprint(reference, "ct"), path_keyed_input_fingerprint(moving, "mr"))

    assert path_keyed_run_folder(tmp_path / "runs", "unifuse-3d-phantom", fingerprints) == earlier
    assert path_keyed_run_folder(tmp_path / "runs", "unifuse-2d-harvard", fingerprints) is None
    today = run_folder(tmp_path / "runs", "ct", "mr", "unifuse-3d-phantom",
                       (input_fingerprint(reference), input_fingerprint(moving)))
    assert today != earlier  # why the earlier folder must be looked up on its own


def test_a_run_folder_made_under_an_inputs_earlier_fingerprint_is_reused_until_one_of_today_exists(tmp_path):
    """A file napari's own reader opened was keyed by its grid up to 2026-12-07: its flags stay listed."""
    earlier = run_folder(tmp_path, "T1", "T2", "ckpt", ("grid of T1", "T2 file"))
    earlier.mkdir()
    today = ("T1 file", "T2 file")
    assert run_folder(tmp_path, "T1", "T2", "ckpt", today, earlier_fingerprints=("grid of T1", "T2 file")) == earlier
    assert run_folder(tmp_path, "T1", "T2", "ckpt", today, earlier_fingerprints=("grid of T1", "grid of T2")) == earlier
    assert run_folder(tmp_path, "T1", "T2", "ckpt", today, earlier_fingerprints=("grid of T3", "T2 file")) != earlier
    assert run_folder(tmp_path, "T1", "T2", "ckpt", today, {"tile size": 64},
                      earlier_fingerprints=("grid of T1", "T2 file")) != earlier  # another run's folder
    own = run_folder(tmp_path, "T1", "T2", "ckpt", today)
    own.mkdir()
    assert run_folder(tmp_path, "T1", "T2", "ckpt", today, earlier_fingerprints=("grid of T1", "T2 file")) == own


def test_the_grid_fingerprint_is_that_of_the_same_input_without_its_file(tmp_path):
    write_image(ImageVolume(np.full((4, 8, 8), 7.0, np.float32), Geometry.identity(3)), tmp_path / "ct.nii.gz")
    read = read_image(tmp_path / "ct.nii.gz")
    without_file = ImageVolume(read.array, read.geometry)
    assert grid_fingerprint(read) == input_fingerprint(without_file) != input_fingerprint(read)
