"""Geometry and voxels survive read → write → read for NIfTI, MetaImage/NRRD, DICOM series and PNG."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, read_displacement, read_image, write_displacement, write_image


def _sitk_world(image: sitk.Image, array_index) -> np.ndarray:
    """World point of an array index according to SimpleITK (the independent reference)."""
    itk_index = [int(i) for i in reversed(array_index)]
    return np.array(image.TransformIndexToPhysicalPoint(itk_index))[::-1]


def _our_world(volume: ImageVolume, array_index) -> np.ndarray:
    return (volume.geometry.index_to_world @ [*array_index, 1])[:-1]


def _corner_indices(shape):
    return [tuple(0 if bit == "0" else n - 1 for bit, n in zip(f"{code:0{len(shape)}b}", shape)) for code in range(2 ** len(shape))]


@pytest.fixture
def oblique_nifti(tmp_path, rotation, rng):
    affine = np.eye(4)
    affine[:3, :3] = rotation((12.0, -20.0, 35.0)) @ np.diag([0.7, 1.3, 3.0])
    affine[:3, 3] = [-40.5, 12.25, 60.0]
    data = rng.integers(-1000, 2500, size=(9, 8, 6)).astype(np.int16)  # nibabel order (i, j, k)
    path = tmp_path / "oblique.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    return path, data


def test_nifti_oblique_geometry_matches_simpleitk_and_round_trips(oblique_nifti, tmp_path):
    path, data = oblique_nifti
    volume = read_image(path)
    assert volume.array.shape == data.shape[::-1]
    np.testing.assert_array_equal(volume.array, data.transpose())
    reference = sitk.ReadImage(str(path))  # ITK converts RAS → LPS its own way
    for index in _corner_indices(volume.array.shape):
        # ITK reads the float32 quaternion qform, nibabel the float32 sform: they agree to ~1e-5 mm.
        np.testing.assert_allclose(_our_world(volume, index), _sitk_world(reference, index), atol=1e-4)

    written = write_image(volume, tmp_path / "copy.nii.gz")
    reread = nib.load(written)
    np.testing.assert_allclose(reread.affine, nib.load(path).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(reread.dataobj), data)
    assert reread.get_data_dtype() == np.int16


def test_nifti_to_metaimage_keeps_world_positions(oblique_nifti, tmp_path):
    path, _ = oblique_nifti
    volume = read_image(path)
    mha = sitk.ReadImage(str(write_image(volume, tmp_path / "copy.mha")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mha), volume.array)
    for index in _corner_indices(volume.array.shape):
        np.testing.assert_allclose(_sitk_world(mha, index), _our_world(volume, index), atol=1e-9)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_round_trip(suffix, tmp_path, oblique_sitk_image, rng):
    array = rng.normal(size=(5, 7, 6)).astype(np.float32)
    image = oblique_sitk_image(array, (0.6, 0.9, 2.5), (10.0, -5.0, 3.5), (5.0, 10.0, -30.0))
    path = tmp_path / f"in{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_image(path)
    np.testing.assert_array_equal(volume.array, array)
    for index in _corner_indices(array.shape):
        np.testing.assert_allclose(_our_world(volume, index), _sitk_world(image, index), atol=1e-9)

    for out_suffix in (suffix, ".nii.gz"):
        again = read_image(write_image(volume, tmp_path / f"out{out_suffix}"))
        np.testing.assert_array_equal(again.array, array)
        # NIfTI stores the affine as float32.
        np.testing.assert_allclose(again.geometry.index_to_world, volume.geometry.index_to_world, atol=1e-5)


def test_dicom_series_round_trip(tmp_path, oblique_sitk_image, write_dicom_series, rng):
    array = rng.integers(-1000, 3000, size=(6, 10, 8)).astype(np.int16)
    image = oblique_sitk_image(array, (0.8, 0.6, 2.0), (-100.0, 50.0, 20.0), (0.0, 15.0, 25.0))
    files = write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1001")

    for path in (tmp_path / "series", files[3]):  # the folder, or any file of the series
        volume = read_image(path)
        np.testing.assert_array_equal(volume.array, array)
        for index in _corner_indices(array.shape):
            np.testing.assert_allclose(_our_world(volume, index), _sitk_world(image, index), atol=1e-5)
        assert volume.metadata["modality"] == "ct"
        assert "warnings" not in volume.metadata  # evenly spaced slices

    again = read_image(write_image(volume, tmp_path / "from_dicom.nii.gz"))
    np.testing.assert_array_equal(again.array, array)
    np.testing.assert_allclose(again.geometry.index_to_world, volume.geometry.index_to_world, atol=1e-5)


def test_folder_with_two_dicom_series_lists_them_and_a_file_picks_one(
    tmp_path, oblique_sitk_image, write_dicom_series, rng
):
    folder = tmp_path / "two"
    first = oblique_sitk_image(rng.integers(0, 100, (3, 6, 5)).astype(np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (0, 0, 0))
    second_array = rng.integers(0, 100, (4, 6, 5)).astype(np.int16)
    second = oblique_sitk_image(second_array, (0.5, 0.5, 1.0), (9.0, 9.0, 9.0), (0, 0, 10))
    write_dicom_series(first, folder, "1.2.826.0.1.3680043.2.1125.2001")
    files = write_dicom_series(second, folder, "1.2.826.0.1.3680043.2.1125.2002")

    with pytest.raises(InputError) as caught:
        read_image(folder)
    message = str(caught.value)
    assert "2 DICOM series" in message and "2001" in message and "2002" in message and str(folder) in message

    np.testing.assert_array_equal(read_image(files[0]).array, second_array)


def test_four_d_nifti_frame_is_selected(tmp_path, rng):
    frames = rng.normal(size=(5, 4, 3, 3)).astype(np.float32)
    path = tmp_path / "dynamic.nii.gz"
    nib.Nifti1Image(frames, np.diag([2.0, 2.0, 3.0, 1.0])).to_filename(path)
    volume = read_image(path, frame=2)
    np.testing.assert_array_equal(volume.array, frames[..., 2].transpose())
    assert volume.metadata["frame"] == 2


def test_png_grey_rgb_and_float_output(tmp_path, rng):
    grey = rng.integers(0, 256, (12, 9)).astype(np.uint8)
    colour = rng.integers(0, 256, (12, 9, 3)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(colour).save(tmp_path / "colour.png")

    grey_volume = read_image(tmp_path / "grey.png")
    assert not grey_volume.is_rgb and grey_volume.ndim == 2
    np.testing.assert_array_equal(grey_volume.array, grey)
    np.testing.assert_array_equal(grey_volume.geometry.index_to_world, np.eye(3))

    colour_volume = read_image(tmp_path / "colour.png")
    assert colour_volume.is_rgb and colour_volume.ndim == 2
    np.testing.assert_array_equal(colour_volume.array, colour)

    fused = rng.uniform(0, 1, (12, 9)).astype(np.float32)
    written = write_image(ImageVolume(fused, grey_volume.geometry), tmp_path / "fused.png")
    np.testing.assert_array_equal(np.asarray(Image.open(written)), np.round(fused * 255).astype(np.uint8))
    again = read_image(write_image(colour_volume, tmp_path / "colour_copy.png"))
    np.testing.assert_array_equal(again.array, colour)


def test_writer_refuses_to_overwrite_its_source(oblique_nifti):
    path, _ = oblique_nifti
    before = path.read_bytes()
    with pytest.raises(InputError, match="overwrite") as caught:
        write_image(read_image(path), path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_2d_oblique_image_round_trips(suffix, tmp_path, rotation, rng):
    volume = ImageVolume(rng.normal(size=(7, 11)).astype(np.float32), Geometry([0.4, 1.7], [12.0, -3.0], rotation((30.0,))))
    path = write_image(volume, tmp_path / f"slice{suffix}")
    again = read_image(path)
    assert again.ndim == 2
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.geometry.index_to_world, volume.geometry.index_to_world, atol=1e-5)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_sitk_world(reference, (6, 10)), _our_world(volume, (6, 10)), atol=1e-5)


@pytest.mark.parametrize("alpha", [False, True], ids=["RGB24", "RGBA32"])
def test_rgb_nifti_reads_as_a_2d_rgb_image_like_simpleitk(alpha, tmp_path, rng):
    channels = ["R", "G", "B", "A"] if alpha else ["R", "G", "B"]
    colour = np.zeros((9, 6), dtype=[(channel, "u1") for channel in channels])  # nibabel order (i, j)
    for channel in channels:
        colour[channel] = rng.integers(0, 256, colour.shape)
    affine = np.diag([0.5, 0.8, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    path = tmp_path / "colour.nii.gz"
    nib.Nifti1Image(colour, affine).to_filename(path)

    volume = read_image(path)
    reference = sitk.ReadImage(str(path))
    assert volume.is_rgb and volume.ndim == 2 and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference)[..., :3])  # alpha dropped
    for index in _corner_indices(volume.spatial_shape):
        np.testing.assert_allclose(_our_world(volume, index), _sitk_world(reference, index), atol=1e-6)
    again = read_image(write_image(volume, tmp_path / "colour.mha"))
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.is_rgb and again.geometry.allclose(volume.geometry)


def _with_alpha(tmp_path, rng, fmt: str, alpha: np.ndarray):
    colour = np.dstack([rng.integers(0, 256, alpha.shape, dtype=np.uint8) for _ in range(3)] + [alpha])
    path = tmp_path / f"picture.{fmt}"
    if fmt == "png":
        Image.fromarray(colour, mode="RGBA").save(path)
    elif fmt == "mha":
        sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(path))
    else:
        records = np.zeros(alpha.shape[::-1], dtype=[(channel, "u1") for channel in "RGBA"])
        for index, channel in enumerate("RGBA"):
            records[channel] = colour[..., index].T
        nib.Nifti1Image(records, np.eye(4)).to_filename(path)
    return path, colour


@pytest.mark.parametrize("fmt", ["png", "mha", "nii.gz"])
def test_a_see_through_picture_says_its_transparency_is_ignored_and_an_opaque_one_does_not(tmp_path, rng, fmt):
    """RGBA PET exports used to lose their alpha channel without a word."""
    alpha = np.full((12, 10), 255, dtype=np.uint8)
    opaque_path, colour = _with_alpha(tmp_path, rng, fmt, alpha)
    opaque = read_image(opaque_path)
    assert opaque.is_rgb and "warnings" not in opaque.metadata
    np.testing.assert_array_equal(opaque.array, colour[..., :3])

    alpha[:3] = 0  # a quarter of the picture fully transparent
    see_through = read_image(_with_alpha(tmp_path, rng, fmt, alpha)[0])
    assert see_through.metadata["warnings"] == [
        "transparency ignored: 25 % of the pixels are partly or fully transparent (alpha channel); "
        "their stored colour is used as if opaque"]


def test_one_slice_rgb_nifti_is_the_2d_picture(tmp_path, rng):
    colour = np.zeros((9, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    colour["G"] = rng.integers(0, 256, colour.shape)
    nib.Nifti1Image(colour, np.diag([0.5, 0.8, 2.0, 1.0])).to_filename(tmp_path / "flat.nii.gz")
    nib.Nifti1Image(colour[..., None], np.diag([0.5, 0.8, 2.0, 1.0])).to_filename(tmp_path / "slice.nii.gz")
    flat, one_slice = read_image(tmp_path / "flat.nii.gz"), read_image(tmp_path / "slice.nii.gz")
    assert one_slice.is_rgb and one_slice.array.shape == (6, 9, 3)
    np.testing.assert_array_equal(one_slice.array, flat.array)
    assert one_slice.geometry.allclose(flat.geometry)


def test_rgb_nifti_volume_is_refused_with_one_clear_line(tmp_path):
    path = tmp_path / "colour3d.nii.gz"
    nib.Nifti1Image(np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4)).to_filename(path)
    with pytest.raises(InputError, match="3D colour") as error:
        read_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("unit", ["micron", "meter"])
def test_nifti_spatial_units_become_millimetres_as_in_simpleitk(unit, tmp_path, rotation):
    per_mm = {"micron": 1000.0, "meter": 0.001}[unit]
    affine = np.eye(4)
    affine[:3, :3] = rotation((10.0, 0.0, -25.0)) @ np.diag([0.5, 0.75, 2.0]) * per_mm
    affine[:3, 3] = np.array([-30.0, 12.0, 45.0]) * per_mm
    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine)
    image.header.set_xyzt_units(unit)
    path = tmp_path / f"in_{unit}.nii.gz"
    image.to_filename(path)

    volume = read_image(path)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(volume.geometry.itk_spacing, reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(volume.geometry.itk_origin, reference.GetOrigin(), atol=1e-4)
    for index in _corner_indices(volume.spatial_shape):
        np.testing.assert_allclose(_our_world(volume, index), _sitk_world(reference, index), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.spacing, [2.0, 0.75, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    ("values", "stored_as"),
    [
        (np.full((3, 4, 5), 1.5, np.float16), np.float32),
        (np.full((3, 4, 5), 123456.789012345), np.float64),
        (np.full((3, 4, 5), 2**32 - 1, np.uint32), np.uint32),
        (np.full((3, 4, 5), 2**40, np.int64), np.int64),
        (np.arange(60, dtype=np.int64).reshape(3, 4, 5), np.uint8),
        (np.full((3, 4, 5), 65535, np.uint16), np.uint16),
        (np.full((3, 4, 5), -7, np.int8), np.int8),
        (np.ones((3, 4, 5), np.bool_), np.uint8),
    ],
    ids=["float16", "float64", "uint32", "int64-large", "int64-small", "uint16", "int8", "bool"],
)
def test_nifti_keeps_every_value_exactly(values, stored_as, tmp_path):
    written = write_image(ImageVolume(values, Geometry.identity(3)), tmp_path / "values.nii.gz")
    assert nib.load(written).get_data_dtype() == stored_as
    reread = read_image(written).array
    np.testing.assert_array_equal(reread.astype(np.float64), values.astype(np.float64))
    np.testing.assert_array_equal(reread, values.astype(reread.dtype))


@pytest.mark.parametrize("suffix", [".MHA", ".MHD", ".NRRD", ".NHDR"])
def test_upper_case_itk_suffixes_read_and_write_the_named_file(suffix, tmp_path, rng):
    volume = ImageVolume(rng.normal(size=(4, 5, 6)).astype(np.float32), Geometry([2.0, 1.0, 0.5], [1.0, 2.0, 3.0], np.eye(3)))
    path = tmp_path / f"OUT{suffix}"
    assert write_image(volume, path) == path and path.is_file()
    header_only = suffix in (".MHD", ".NHDR")  # the voxels sit in a file beside the header
    assert len(list(tmp_path.iterdir())) == 1 + header_only
    reread = read_image(path)
    np.testing.assert_array_equal(reread.array, volume.array)
    assert reread.geometry.allclose(volume.geometry)


def test_dicom_series_with_a_missing_slice_warns_how_far_slices_are_off(tmp_path, write_dicom_series, capfd):
    image = sitk.GetImageFromArray(np.zeros((12, 16, 16), np.int16))
    image.SetSpacing((0.7, 0.9, 2.5))
    files = write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.1003")
    files[6].unlink()
    capfd.readouterr()

    volume = read_image(tmp_path / "series")
    (warning,) = volume.metadata["warnings"]
    assert "gap of 5 mm between slices 5 and 6" in warning and "2.5 mm apart" in warning
    assert "misplaced by up to 1.25 mm" in warning
    assert "Non uniform" not in capfd.readouterr().err  # ITK's console text is kept off stderr
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # and ITK's global switch is restored


def test_files_under_a_folder_name_that_is_not_utf8_are_written_and_a_read_is_refused(tmp_path):
    """SimpleITK aborts the process on such a name; writes are staged elsewhere, reads refused in one line."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    geometry = Geometry((2.0, 1.0), (5.0, -3.0), np.eye(2))
    volume = ImageVolume(np.arange(12, dtype=np.float32).reshape(3, 4), geometry)
    field = np.ones((2, 3, 4), np.float32)

    written = write_image(volume, folder / "fused.mha"), write_displacement(field, geometry, folder / "u.nii.gz")

    assert sorted(path.name for path in folder.iterdir()) == ["fused.mha", "u.nii.gz"]
    assert all(path.stat().st_size > 0 for path in written)
    for read in (lambda: read_image(folder / "fused.mha"), lambda: read_displacement(folder / "u.nii.gz")):
        with pytest.raises(InputError, match="not valid UTF-8"):
            read()
