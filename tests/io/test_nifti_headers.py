"""A NIfTI header's placement survives into what is written on its grid, in every tool.

nibabel and FSL place a NIfTI by its sform, ITK (SimpleITK, ITK-SNAP, Slicer) by its qform: a file
written on a reference's grid must carry the reference's own forms and codes to overlay it in both.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from napari_unifuse.engine.inference import overlap_warnings
from napari_unifuse.io import (
    Geometry,
    ImageVolume,
    placement_metadata,
    read_displacement,
    read_image,
    write_displacement,
    write_image,
)

_SHAPE = (9, 8, 6)  # nibabel order (i, j, k)


def _affine(offset) -> np.ndarray:
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = offset
    return affine


def _nifti(path, *, qform_code: int, sform_code: int, qform_shift=(0.0, 0.0, 0.0), dtype=np.float32, rng=None):
    data = (rng or np.random.default_rng(0)).integers(0, 1000, size=_SHAPE).astype(dtype)
    image = nib.Nifti1Image(data, _affine((-20.0, -28.0, -36.0)))
    image.set_qform(_affine(np.add((-20.0, -28.0, -36.0), qform_shift)), code=qform_code)
    image.set_sform(_affine((-20.0, -28.0, -36.0)), code=sform_code)
    image.to_filename(path)
    return path


def _itk_corners(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint([(n - 1) * bit for n, bit in zip(size, bits)])
                     for bits in np.ndindex(*(2,) * image.GetDimension())])


HEADERS = {
    "MNI 4/4": {"qform_code": 4, "sform_code": 4},
    "sform only 0/2": {"qform_code": 0, "sform_code": 2},
    "qform 10/8/6 mm from the sform": {"qform_code": 1, "sform_code": 4, "qform_shift": (10.0, 8.0, 6.0)},
    "no orientation 0/0": {"qform_code": 0, "sform_code": 0},
}


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
@pytest.mark.parametrize("output", ["image", "displacement"])
def test_a_file_on_the_reference_grid_is_placed_as_the_reference_by_nibabel_and_by_itk(tmp_path, header, output):
    reference_path = _nifti(tmp_path / "reference.nii.gz", **header)
    reference = read_image(reference_path)
    written = tmp_path / f"{output}.nii.gz"
    if output == "image":
        write_image(ImageVolume(reference.array * 0.5, reference.geometry, placement_metadata(reference.metadata)),
                    written)
    else:
        write_displacement(np.zeros((3, *reference.spatial_shape)), reference.geometry, written,
                           reference_metadata=reference.metadata)

    theirs, ours = nib.load(reference_path).header, nib.load(written).header
    for code in ("qform_code", "sform_code"):
        assert ours[code] == theirs[code], code
    np.testing.assert_allclose(ours.get_qform(), theirs.get_qform(), atol=1e-4)
    np.testing.assert_allclose(ours.get_sform(), theirs.get_sform(), atol=1e-4)
    np.testing.assert_allclose(nib.load(written).affine, nib.load(reference_path).affine, atol=1e-4)
    np.testing.assert_allclose(_itk_corners(written), _itk_corners(reference_path), atol=1e-4)


@pytest.mark.parametrize("sform_code", [2, 4])
def test_a_field_carrying_disagreeing_forms_reads_back_on_its_reference_grid(tmp_path, sform_code):
    """ITK may place such a field by its qform, the package places the reference by its sform:
    read_displacement refused the field it had just written ("the field's grid differs")."""
    reference = read_image(_nifti(tmp_path / "reference.nii.gz", qform_code=1, sform_code=sform_code,
                                  qform_shift=(10.0, 8.0, 6.0)))
    u = np.random.default_rng(1).normal(0, 1, (3, *reference.spatial_shape)).astype(np.float32)
    written = write_displacement(u, reference.geometry, tmp_path / "field.nii.gz",
                                 reference_metadata=reference.metadata)
    np.testing.assert_allclose(read_displacement(written, reference.geometry), u, atol=1e-4)


def _world(path, index, tool: str) -> np.ndarray:
    """Where ``tool`` ("nibabel": the sform, "itk": the qform here) places array index ``index``
    (io's z, y, x order) of the file, in LPS mm, array order."""
    if tool == "itk":
        return np.array(sitk.ReadImage(str(path)).TransformContinuousIndexToPhysicalPoint(
            [float(i) for i in index[::-1]]))[::-1]
    ras = nib.load(path).affine @ [*index[::-1], 1.0]
    return np.array([-ras[0], -ras[1], ras[2]])[::-1]


def test_a_coronal_volume_in_world_axis_order_is_written_where_each_tool_places_the_original(tmp_path):
    """napari holds a coronal volume with its axes in world order, so the outputs made on its
    grid are written on that grid: with the original forms permuted alike, not the geometry in
    both, ITK (the qform, 3 mm from the sform) and nibabel (the sform) each place every voxel
    where they place the original's."""
    coronal = np.array([[1.5, 0, 0, -20], [0, 0, 2.5, -28], [0, 2.0, 0, -36], [0, 0, 0, 1]])  # j → S, k → A
    qform = coronal.copy()
    qform[0, 3] += 3.0
    original = tmp_path / "coronal.nii.gz"
    image = nib.Nifti1Image(np.random.default_rng(0).random(_SHAPE).astype(np.float32), coronal)
    image.set_qform(qform, code=1)
    image.set_sform(coronal, code=4)
    image.to_filename(original)
    volume = read_image(original)

    shown = volume.in_world_axis_order()

    axes = (1, 0, 2)  # array (k, j, i) runs along (y, z, x): j's axis goes first
    np.testing.assert_array_equal(shown.array, volume.array.transpose(axes))
    assert shown.geometry.world_axis_order() == (0, 1, 2) and shown.in_world_axis_order() is shown
    written = write_image(shown, tmp_path / "fused.nii.gz")
    header = nib.load(written).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 4)
    for corner in np.ndindex(2, 2, 2):
        index = np.multiply(corner, np.subtract(shown.array.shape, 1))
        file_index = np.empty(3)
        file_index[list(axes)] = index  # the written axis j is the original array's axis axes[j]
        for tool in ("nibabel", "itk"):
            np.testing.assert_allclose(_world(written, index, tool), _world(original, file_index, tool), atol=1e-4)


def test_an_image_moved_off_the_reference_grid_is_written_where_its_geometry_says_with_the_codes(tmp_path):
    reference = read_image(_nifti(tmp_path / "reference.nii.gz", qform_code=1, sform_code=4,
                                  qform_shift=(10.0, 8.0, 6.0)))
    moved = Geometry(reference.geometry.spacing, reference.geometry.origin + 5.0, reference.geometry.direction)
    written = write_image(ImageVolume(reference.array, moved, placement_metadata(reference.metadata)),
                          tmp_path / "moved.nii.gz")
    header = nib.load(written).header
    assert (header["qform_code"], header["sform_code"]) == (1, 4)
    np.testing.assert_allclose(header.get_qform(), moved.to_ras_affine(), atol=1e-4)
    np.testing.assert_allclose(header.get_sform(), moved.to_ras_affine(), atol=1e-4)


def test_forms_that_disagree_are_said_with_the_distance_and_the_form_used(tmp_path):
    shifted = read_image(_nifti(tmp_path / "shifted.nii.gz", qform_code=1, sform_code=4, qform_shift=(10.0, 8.0, 6.0)))
    (warning,) = shifted.metadata["warnings"]
    assert "qform (code 1) and sform (code 4) disagree" in warning
    assert "up to 14.1 mm apart" in warning and "The sform is used" in warning
    consistent = read_image(_nifti(tmp_path / "consistent.nii.gz", qform_code=1, sform_code=1))
    assert "warnings" not in consistent.metadata


def test_a_header_without_orientation_says_its_position_is_a_guess(tmp_path):
    volume = read_image(_nifti(tmp_path / "bare.nii.gz", qform_code=0, sform_code=0))
    (warning,) = volume.metadata["warnings"]
    assert "gives no orientation" in warning and "a guess" in warning


def _two_d_nifti(path, affine, rng) -> np.ndarray:
    data = rng.random((20, 24)).astype(np.float32)  # nibabel order (i, j)
    nib.Nifti1Image(data, affine).to_filename(path)
    return data


PLANES = {
    "axial at z = 40 mm": np.array([[1.7, 0, 0, -60], [0, 1.7, 0, -80], [0, 0, 1, 40], [0, 0, 0, 1]], float),
    "coronal (j -> S)": np.array([[1.7, 0, 0, -60], [0, 0, 1, 12], [0, 1.7, 0, -70], [0, 0, 0, 1]], float),
}


def test_a_2d_nifti_in_a_coronal_plane_is_the_one_slice_volume_its_header_describes(tmp_path, rng):
    """It was refused: "the affine maps an array axis to a zero-length vector"."""
    affine = PLANES["coronal (j -> S)"]
    data = _two_d_nifti(tmp_path / "slice.nii.gz", affine, rng)
    volume = read_image(tmp_path / "slice.nii.gz")
    assert volume.array.shape == (1, 24, 20) and volume.single_slice_axis == 0
    np.testing.assert_array_equal(volume.array[0], data.T)
    np.testing.assert_allclose(volume.geometry.to_ras_affine(), affine, atol=1e-5)


def test_an_axial_2d_nifti_stays_2d_and_its_outputs_keep_its_plane(tmp_path, rng):
    """2-D like the pictures and slices it is paired and trained with; its height is the header's."""
    affine = PLANES["axial at z = 40 mm"]
    _two_d_nifti(tmp_path / "slice.nii.gz", affine, rng)
    volume = read_image(tmp_path / "slice.nii.gz")
    assert volume.array.shape == (24, 20) and volume.geometry.ndim == 2
    written = nib.load(write_image(ImageVolume(volume.array + 1, volume.geometry,
                                               placement_metadata(volume.metadata)), tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)


def test_two_axial_2d_nifti_slices_80_mm_apart_are_said_to_lie_in_different_planes(tmp_path, rng):
    slices = []
    for name, z in (("upper", 40.0), ("lower", -40.0)):
        affine = PLANES["axial at z = 40 mm"].copy()
        affine[2, 3] = z
        _two_d_nifti(tmp_path / f"{name}.nii.gz", affine, rng)
        slices.append(read_image(tmp_path / f"{name}.nii.gz"))
    assert overlap_warnings(*slices) == [
        "the two 2-D NIfTI slices lie in different planes by their headers (the reference at z = 40 mm, the "
        "moving image at z = -40 mm, 80 mm apart); 2-D images are fused within one plane: check that they show "
        "the same slice of the anatomy"]
    assert overlap_warnings(slices[0], slices[0]) == []


def test_a_big_endian_nifti_reads_in_native_byte_order_and_goes_to_simpleitk(tmp_path, rng):
    data = rng.integers(-1000, 1000, size=_SHAPE).astype(">i2")
    image = nib.Nifti1Image(data, _affine((0.0, 0.0, 0.0)), header=nib.Nifti1Header().as_byteswapped(">"))
    image.set_data_dtype(">i2")
    image.to_filename(tmp_path / "big_endian.nii.gz")
    volume = read_image(tmp_path / "big_endian.nii.gz")
    assert volume.array.dtype == np.dtype("int16") and volume.array.dtype.isnative
    np.testing.assert_array_equal(volume.array, data.transpose())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.to_sitk()), data.transpose())
    written = write_image(volume, tmp_path / "copy.mha")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), data.transpose())


@pytest.mark.parametrize("thin", ["coronal slice", "axial slice"])
def test_the_field_of_a_one_slice_volume_is_a_3d_itk_field_that_moves_points_as_u_says(tmp_path, rng, thin):
    """ITK's NIfTI reader drops a trailing one-voxel axis of a vector image: the field of a coronal
    one-slice volume was unreadable ("Bad direction, determinant is 0"), an axial one 2-D."""
    # One slice along array axis 0 (ITK's last); the coronal direction makes ITK's 2-D block singular.
    direction = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) if thin == "coronal slice" else np.eye(3)
    geometry = Geometry([3.0, 1.2, 0.9], [10.0, -20.0, 30.0], direction)
    shape = (1, 14, 12)
    u = np.stack([np.zeros(shape), *(gaussian_filter(rng.normal(size=shape), 2.0) * 3 for _ in range(2))])

    path = write_displacement(u, geometry, tmp_path / "displacement.nii.gz")
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    assert field.GetDimension() == 3 and field.GetNumberOfComponentsPerPixel() == 3
    transform = sitk.DisplacementFieldTransform(field)
    world = geometry.index_to_world
    for index in [(0, 3, 4), (0, 10, 7), (0, 13, 0)]:
        point = (world @ [*index, 1.0])[:3]
        moved = (world @ [*(np.array(index) + u[(slice(None), *index)]), 1.0])[:3]
        np.testing.assert_allclose(transform.TransformPoint(tuple(point[::-1]))[::-1], moved, atol=1e-4)
    np.testing.assert_allclose(read_displacement(path, geometry), u, atol=1e-4)


def test_the_field_of_an_axial_2d_nifti_keeps_its_plane_and_disagreeing_forms(tmp_path, rng):
    """The field of a 2-D reference with its plane at z = 40 mm, an MNI sform (code 4) and a qform
    (code 2) 4 mm to its right got the package's geometry in both forms (codes kept): nibabel put it
    at z = 0, ITK 4 mm from where it puts the reference, while the fused image next to it was right."""
    sform = PLANES["axial at z = 40 mm"]
    qform = sform.copy()
    qform[0, 3] += 4.0
    image = nib.Nifti1Image(rng.random((20, 24)).astype(np.float32), sform)
    image.set_sform(sform, code=4)
    image.set_qform(qform, code=2)
    image.to_filename(tmp_path / "reference.nii.gz")
    reference = read_image(tmp_path / "reference.nii.gz")
    u = rng.normal(0, 1, (2, *reference.spatial_shape)).astype(np.float32)

    written = write_displacement(u, reference.geometry, tmp_path / "field.nii.gz",
                                 reference_metadata=reference.metadata)

    ours = nib.load(written).header
    assert (int(ours["qform_code"]), int(ours["sform_code"])) == (2, 4)
    np.testing.assert_allclose(ours.get_qform(), qform, atol=1e-4)
    np.testing.assert_allclose(ours.get_sform(), sform, atol=1e-4)
    itk_reference, itk_field = sitk.ReadImage(str(tmp_path / "reference.nii.gz")), sitk.ReadImage(str(written))
    np.testing.assert_allclose(itk_field.GetOrigin(), itk_reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(itk_field.GetDirection(), itk_reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(read_displacement(written, reference.geometry), u, atol=1e-4)


def test_an_axial_2d_nifti_moved_within_its_plane_is_written_at_its_height(tmp_path, rng):
    """Nudged 1 mm in-plane (its header's forms no longer describe the grid), the slice was written
    at z = 0, and reading it back said it lay 40 mm from the original's plane."""
    affine = PLANES["axial at z = 40 mm"].copy()
    affine[2, 2] = 2.5  # a slice thickness the 2-D geometry does not hold
    _two_d_nifti(tmp_path / "slice.nii.gz", affine, rng)
    original = read_image(tmp_path / "slice.nii.gz")
    moved = Geometry(original.geometry.spacing, original.geometry.origin + [1.0, 0.0], original.geometry.direction)

    written = write_image(ImageVolume(original.array, moved, placement_metadata(original.metadata)),
                          tmp_path / "moved.nii.gz")

    expected = moved.to_ras_affine()
    expected[:, 2], expected[2, 3] = affine[:, 2], 40.0
    header = nib.load(written).header
    np.testing.assert_allclose(header.get_sform(), expected, atol=1e-4)
    np.testing.assert_allclose(header.get_qform(), expected, atol=1e-4)  # what ITK-based tools read
    np.testing.assert_allclose(read_image(written).geometry.index_to_world, moved.index_to_world, atol=1e-4)
    assert overlap_warnings(original, read_image(written)) == []
