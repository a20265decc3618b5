"""Every entry point fuses a 3-D volume in world axis order (``ImageVolume.in_world_axis_order``), as
the workbench's reader shows it: a pair stored with permuted axes (a coronal NIfTI) fuses exactly as
the same voxels stored axially, on the reference's grid in world order."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse.cli import main
from napari_unifuse.cli.evaluate import field_errors, pairs_from_csv, unit_intensities
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import Geometry, read_image
from napari_unifuse.io.fields import write_displacement

# (z, y, x) of the axial arrays: every side different, so that a wrong permutation cannot pass; z
# under CLASSICAL_MIN_SIDE, so that SimpleITK's registration (seconds) does not run beside the network.
SHAPE = (14, 22, 18)
SPACING_XYZ = (1.1, 1.2, 1.5)
# nibabel's axes (x, y, z) stored as (x, z, y): a coronal file, the package's array (y, z, x).
CORONAL_VOXEL_AXES = [0, 2, 1]


def _blob(centre: tuple[float, float, float]) -> np.ndarray:
    grids = np.meshgrid(*(np.linspace(-1, 1, side) for side in SHAPE), indexing="ij")
    return np.exp(-3 * sum((grid - offset) ** 2 for grid, offset in zip(grids, centre, strict=True)))


def _write_pair(folder, coronal: bool, head_to_foot: bool = False):
    """A reference and a moving image (shifted, other intensities), axial or coronal-stored;
    ``head_to_foot``: the voxel axis along z counts slices downwards (a coronal DICOM series' rows)."""
    folder.mkdir()
    affine = np.diag([*SPACING_XYZ, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    paths = []
    for name, array in (("reference", 100 + 1000 * _blob((0.0, 0.1, -0.1))),
                        ("moving", 50 + 400 * _blob((0.1, 0.0, 0.05)) ** 0.5)):
        data, voxel_affine = array.transpose().astype(np.float32), affine  # nibabel's (x, y, z)
        if head_to_foot:
            data, voxel_affine = data[:, :, ::-1], affine @ _reversed_voxel_axis(2, data.shape[2])
        if coronal:
            data = data.transpose(CORONAL_VOXEL_AXES)
            voxel_affine = voxel_affine[:, [*CORONAL_VOXEL_AXES, 3]]
        image = nib.Nifti1Image(np.ascontiguousarray(data), voxel_affine)
        image.set_qform(voxel_affine, code=1)
        image.set_sform(voxel_affine, code=1)
        path = folder / f"{name}.nii.gz"
        nib.save(image, str(path))
        paths.append(path)
    return paths


def _reversed_voxel_axis(axis: int, size: int) -> np.ndarray:
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, size - 1.0
    return flip


@pytest.fixture
def pairs(tmp_path):
    axial, coronal = _write_pair(tmp_path / "axial", False), _write_pair(tmp_path / "coronal", True)
    assert read_image(coronal[0]).geometry.world_axis_order() == (1, 0, 2)
    return axial, coronal


def test_a_coronal_stored_pair_fuses_as_the_same_pair_stored_axially(pairs, smallest_unifuse):
    axial, coronal = pairs
    engine = FusionEngine(smallest_unifuse(3), device="cpu")
    on_axial = engine.run_fusion(*map(read_image, axial), quality=True, uncertainty_passes=1)
    coronal_reference = read_image(coronal[0])
    on_coronal = engine.run_fusion(coronal_reference, read_image(coronal[1]), quality=True, uncertainty_passes=1)

    for name in ("fused", "aligned"):
        np.testing.assert_array_equal(getattr(on_coronal, name).array, getattr(on_axial, name).array)
    np.testing.assert_array_equal(on_coronal.displacement, on_axial.displacement)
    np.testing.assert_array_equal(on_coronal.slice_class_probs, on_axial.slice_class_probs)
    for name, array in on_axial.quality.maps().items():
        np.testing.assert_array_equal(on_coronal.quality.maps()[name], array)
    # On the reference's grid in world order: the same voxels at the same world positions.
    world_ordered = coronal_reference.in_world_axis_order()
    assert on_coronal.fused.geometry.allclose(world_ordered.geometry)
    assert on_coronal.fused.geometry.allclose(on_axial.fused.geometry)

    inputs = on_coronal.provenance["inputs"]
    assert inputs["reference"]["reoriented_from_axes"] == [1, 0, 2]
    assert inputs["moving"]["reoriented_from_axes"] == [1, 0, 2]
    assert "[1, 0, 2]" in on_coronal.provenance["outputs"]["grid"]
    axial_provenance = on_axial.provenance
    assert not any("reoriented_from_axes" in axial_provenance["inputs"][role] for role in ("reference", "moving"))
    assert "grid" not in axial_provenance["outputs"]


def _fuse_with_cli(reference_path, moving_path, out):
    """``unifuse fuse`` of the pair, the moving image its own label; the pair's folder."""
    assert main(["fuse", "--reference", str(reference_path), "--moving", str(moving_path), "--label",
                 str(moving_path), "--method", "identity+average", "--out", str(out), "--device", "cpu",
                 "--no-quality"]) == 0
    return out / "moving"


def test_the_cli_writes_a_coronal_pair_on_the_reference_grid_in_world_order(pairs, tmp_path):
    axial, coronal = pairs
    on_axial, on_coronal = _fuse_with_cli(*axial, tmp_path / "axial_run"), _fuse_with_cli(*coronal, tmp_path / "run")
    world_ordered = read_image(coronal[0]).in_world_axis_order()
    fused = nib.load(str(on_coronal / "fused.nii.gz"))
    np.testing.assert_allclose(fused.affine, world_ordered.geometry.to_ras_affine(), atol=1e-5)
    assert fused.shape == world_ordered.array.shape[::-1]
    np.testing.assert_array_equal(fused.get_fdata(), nib.load(str(on_axial / "fused.nii.gz")).get_fdata())
    # The label is taken on the grid the pair was fused on, as the moving image is: the same metrics.
    metrics = json.loads((on_coronal / "metrics.json").read_text())
    assert metrics == json.loads((on_axial / "metrics.json").read_text())
    provenance = json.loads((on_coronal / "provenance.json").read_text())
    assert provenance["inputs"]["reference"]["reoriented_from_axes"] == [1, 0, 2]
    # The label (here the moving file) is recorded with its stored order, as the moving image is.
    label, moving = provenance["inputs"]["label"], provenance["inputs"]["moving"]
    assert label["reoriented_from_axes"] == [1, 0, 2] and {key: moving[key] for key in label} == label
    axial_inputs = json.loads((on_axial / "provenance.json").read_text())["inputs"]
    assert "reoriented_from_axes" not in axial_inputs["reference"] and "reoriented_from_axes" not in axial_inputs["label"]


def test_evaluate_reads_a_coronal_pair_its_label_and_field_on_the_grid_it_is_fused_on(pairs):
    """The true field, written on the coronal reference's grid as stored, has its axes and its
    components (voxels along those axes) transposed with the images."""
    grids = np.meshgrid(*(np.linspace(-1, 1, side) for side in SHAPE), indexing="ij")
    field = np.stack([0.5 * grids[0], -0.3 * grids[1] ** 2, 0.8 * grids[1] * grids[2]]).astype(np.float32)
    read = {}
    for (reference_path, moving_path), stored_field in ((pairs[0], field),
                                                         (pairs[1], field[[1, 0, 2]].transpose(0, 2, 1, 3))):
        stored_reference = read_image(reference_path)
        write_displacement(stored_field, stored_reference.geometry, reference_path.parent / "field.nii.gz",
                           reference_metadata=stored_reference.metadata)
        csv_path = reference_path.parent / "pairs.csv"
        csv_path.write_text("reference,moving,label,displacement\n"
                            "reference.nii.gz,moving.nii.gz,moving.nii.gz,field.nii.gz\n", encoding="utf-8")
        (read[reference_path.parent.name],) = pairs_from_csv(csv_path)
    axial, coronal = read["axial"], read["coronal"]
    np.testing.assert_allclose(axial.displacement, field, atol=1e-5)
    np.testing.assert_array_equal(coronal.displacement, axial.displacement)
    np.testing.assert_array_equal(coronal.label, axial.label)
    for role in ("reference", "moving"):
        np.testing.assert_array_equal(getattr(coronal, role).array, getattr(axial, role).array)
        assert getattr(coronal, role).geometry.allclose(getattr(axial, role).geometry)
    # The errors in mm weigh each component by the spacing along its world axis, (z, y, x) here.
    expected_mm = np.linalg.norm(field * np.array(SPACING_XYZ[::-1]).reshape(3, 1, 1, 1), axis=0).mean()
    for pair in (axial, coronal):
        errors = field_errors(np.zeros_like(field), pair, unit_intensities(pair.reference)[0])
        assert errors["epe"] == pytest.approx(np.linalg.norm(field, axis=0).mean(), rel=1e-5)
        assert errors["epe_mm"] == pytest.approx(expected_mm, rel=1e-5)


def test_a_reoriented_input_is_recorded_as_handed_in(pairs, smallest_unifuse):
    """The provenance described the reoriented copy: its shape, its grid and, for in-memory data, the hash of
    an array the caller never had."""
    from napari_unifuse.io.digests import sha256_of_array

    _, coronal = pairs
    reference, moving = (dataclasses.replace(read_image(path), source=None) for path in coronal)  # in memory
    result = FusionEngine(smallest_unifuse(3), device="cpu").run_fusion(reference, moving, quality=False)
    for role, image in (("reference", reference), ("moving", moving)):
        record = result.provenance["inputs"][role]
        assert record["shape"] == list(image.array.shape)
        assert record["array_sha256"] == sha256_of_array(image.array)
        assert Geometry.from_dict(record["geometry"]).allclose(image.geometry)


def test_a_workbench_run_records_a_reoriented_file_as_the_cli_does(pairs, smallest_unifuse):
    """The workbench's layer holds the file in world axis order: its run recorded the layer's shape and grid
    beside reoriented_from_axes, the CLI's the file's, so the two records of one file disagreed."""
    from napari.layers import Image

    from napari_unifuse._napari_io import layer_to_volume, volume_to_layer_data

    _, coronal = pairs
    engine = FusionEngine(smallest_unifuse(3), device="cpu")
    on_files_result = engine.run_fusion(*map(read_image, coronal), quality=False)
    layers = [layer_to_volume(Image(data, **kwargs)) for data, kwargs, _ in
              (volume_to_layer_data(read_image(path)) for path in coronal)]
    on_layers_result = engine.run_fusion(*layers, quality=False)
    on_files, on_layers = (result.provenance["inputs"] for result in (on_files_result, on_layers_result))
    for role in ("reference", "moving"):
        for key in ("shape", "reoriented_from_axes", "path", "sha256"):
            assert on_layers[role][key] == on_files[role][key], (role, key)
        assert Geometry.from_dict(on_layers[role]["geometry"]).allclose(Geometry.from_dict(on_files[role]["geometry"]))
    assert on_layers_result.provenance["outputs"]["grid"] == on_files_result.provenance["outputs"]["grid"]


def _one_slice_coronal(path, centre: float) -> None:
    """A coronal slice as NIfTI tools write one: nibabel shape (x, z, 1), the one-voxel axis along y."""
    grids = np.meshgrid(*(np.linspace(-1, 1, side) for side in (24, 20)), indexing="ij")
    data = np.exp(-3 * ((grids[0] - centre) ** 2 + grids[1] ** 2))[..., None].astype(np.float32)
    affine = np.diag([*SPACING_XYZ, 1.0])[:, [0, 2, 1, 3]]
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_a_one_slice_coronal_pair_fuses_from_files_and_from_layers_alike(tmp_path, smallest_unifuse):
    """It failed with "IndexError: tuple index out of range" in `unifuse fuse` and the workbench: the
    slice's 2-D image still carried its volume's three stored axes."""
    from napari.layers import Image

    from napari_unifuse._napari_io import layer_to_volume, volume_to_layer_data

    paths = [tmp_path / "reference.nii.gz", tmp_path / "moving.nii.gz"]
    for path, centre in zip(paths, (0.0, 0.1), strict=True):
        _one_slice_coronal(path, centre)
    engine = FusionEngine(smallest_unifuse(2), device="cpu")
    on_files = engine.run_fusion(*map(read_image, paths), quality=False)
    layers = [layer_to_volume(Image(data, **kwargs)) for data, kwargs, _ in
              (volume_to_layer_data(read_image(path)) for path in paths)]
    on_layers = engine.run_fusion(*layers, quality=False)
    np.testing.assert_array_equal(on_layers.fused.array, on_files.fused.array)
    for result in (on_files, on_layers):
        record = result.provenance["inputs"]["reference"]
        assert record["shape"] == list(read_image(paths[0]).array.shape)
        assert record["reoriented_from_axes"] == list(read_image(paths[0]).geometry.world_axis_order())
    assert on_layers.provenance["outputs"]["grid"] == on_files.provenance["outputs"]["grid"]


def test_the_cli_report_of_a_coronal_pair_shows_the_inputs_as_the_axial_pairs(pairs, tmp_path):
    """Its overview was drawn in the coronal plane and its inputs table gave the stored grid, the
    workbench's (and the axial pair's) in the axial plane: one pair, two pages."""
    import re

    pages = []
    for name, (reference, moving) in zip(("axial", "coronal"), pairs, strict=True):
        out = tmp_path / name
        assert main(["fuse", "--reference", str(reference), "--moving", str(moving), "--method", "identity+average",
                     "--out", str(out), "--device", "cpu", "--uncertainty-passes", "1", "--report"]) == 0
        page = (out / "moving" / "report.html").read_text(encoding="utf-8")
        # The inputs table and the overview picture (to the end of its tag), the folder names aside.
        start = page.index('<section id="inputs">')
        overview = page[start:page.index(">", page.index("<img", start)) + 1]
        pages.append(re.sub(r"/(axial|coronal)/", "/", overview))
    assert "(14, 22, 18)" in pages[0] and pages[0] == pages[1]


@pytest.mark.parametrize("coronal", [False, True], ids=["axial", "coronal"])
def test_slices_stored_head_to_foot_fuse_as_the_axial_pair_and_slice_k_is_naparis_step_k(
        pairs, tmp_path, smallest_unifuse, coronal):
    """Slices stored from head to foot (a coronal DICOM series' rows run downwards) kept that order:
    napari, which scrolls world z upwards, showed array slice N-1-k at its step k, so "slice 12" in a
    report or a per-slice row was napari's 15; and the pair fused otherwise than the same voxels stored
    foot to head. They are reversed with the axes now."""
    from napari.components import ViewerModel

    from napari_unifuse._napari_io import volume_to_layer_data

    axial, _ = pairs
    downwards = _write_pair(tmp_path / "downwards", coronal, head_to_foot=True)
    stored = read_image(downwards[0])
    assert stored.geometry.slices_run_inferior() and not stored.is_in_world_axis_order
    engine = FusionEngine(smallest_unifuse(3), device="cpu")
    on_axial = engine.run_fusion(*map(read_image, axial), quality=True, uncertainty_passes=1)
    on_downwards = engine.run_fusion(stored, read_image(downwards[1]), quality=True, uncertainty_passes=1)
    for name in ("fused", "aligned"):
        np.testing.assert_array_equal(getattr(on_downwards, name).array, getattr(on_axial, name).array)
    np.testing.assert_array_equal(on_downwards.slice_class_probs, on_axial.slice_class_probs)
    assert on_downwards.fused.geometry.allclose(on_axial.fused.geometry)
    record = on_downwards.provenance["inputs"]["reference"]
    assert record["slices_reversed"] is True and record["shape"] == list(stored.array.shape)
    assert Geometry.from_dict(record["geometry"]).allclose(stored.geometry)
    assert "reversed" in on_downwards.provenance["outputs"]["grid"]

    viewer = ViewerModel()
    data, kwargs, _ = volume_to_layer_data(stored.in_world_axis_order())
    layer = viewer.add_image(data, **kwargs)
    for step in (0, 5, data.shape[0] - 1):
        viewer.dims.set_current_step(0, step)
        assert viewer.dims.point[0] == pytest.approx(layer.data_to_world([step, 0, 0])[0])


def test_evaluate_reads_a_field_stored_on_slices_from_head_to_foot_as_the_axial_pairs(pairs, tmp_path):
    grids = np.meshgrid(*(np.linspace(-1, 1, side) for side in SHAPE), indexing="ij")
    field = np.stack([0.5 * grids[0] + 0.2, -0.3 * grids[1] ** 2, 0.8 * grids[1] * grids[2]]).astype(np.float32)
    read = {}
    for (reference_path, _), stored_field in ((pairs[0], field), (_write_pair(tmp_path / "downwards", False, True),
                                                                   field[:, ::-1] * np.array([-1, 1, 1]).reshape(3, 1, 1, 1))):
        stored_reference = read_image(reference_path)
        write_displacement(np.ascontiguousarray(stored_field, dtype=np.float32), stored_reference.geometry,
                           reference_path.parent / "field.nii.gz", reference_metadata=stored_reference.metadata)
        csv_path = reference_path.parent / "pairs.csv"
        csv_path.write_text("reference,moving,label,displacement\n"
                            "reference.nii.gz,moving.nii.gz,moving.nii.gz,field.nii.gz\n", encoding="utf-8")
        (read[reference_path.parent.name],) = pairs_from_csv(csv_path)
    np.testing.assert_allclose(read["downwards"].displacement, read["axial"].displacement, atol=1e-6)
    np.testing.assert_array_equal(read["downwards"].label, read["axial"].label)


def test_a_one_slice_volume_whose_slice_axis_points_to_the_feet_keeps_its_grid():
    """A single slice has no order to reverse: its outputs stay on its own grid (ITK's same-space checks)."""
    from napari_unifuse.io import ImageVolume

    volume = ImageVolume(np.ones((1, 8, 6), np.float32), Geometry(np.full(3, 3.0), np.zeros(3), np.diag([-1.0, 1, 1])))
    assert volume.is_in_world_axis_order and volume.in_world_axis_order() is volume
    stacked = ImageVolume(np.ones((2, 8, 6), np.float32), volume.geometry)
    assert stacked.in_world_axis_order().geometry.direction[0, 0] == 1.0
