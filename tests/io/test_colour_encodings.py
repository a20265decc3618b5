"""Colour stored in other encodings than 8-bit RGB reads as the same picture, or is refused naming the file:
8-bit colour as floats, 16-bit colour, colour NIfTI written as vectors, and NRRD spacing in other units than mm."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from napari.layers import Image as ImageLayer
from PIL import Image

from napari_unifuse._napari_io import layer_to_volume
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, read_image


@pytest.fixture
def colour(rng) -> np.ndarray:
    """An 8-bit (rows, columns, 3) picture whose channels differ (a grey one would read as grey)."""
    return rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)


def _write_vector_image(path, pixels: np.ndarray):
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    return path


# ---- 8-bit colour stored as floats, 16-bit and other colour types ----------------------------------
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_float_colour_in_0_to_255_reads_as_its_8bit_picture_and_says_so(tmp_path, colour, suffix):
    volume = read_image(_write_vector_image(tmp_path / f"pet{suffix}", colour.astype(np.float32)))
    assert volume.is_rgb and volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, colour / 255, rtol=1e-6)
    assert any("divided by 255" in warning for warning in volume.metadata["warnings"])


def test_float_colour_in_0_to_1_reads_as_stored_without_a_warning(tmp_path, colour):
    stored = (colour / 255).astype(np.float32)
    volume = read_image(_write_vector_image(tmp_path / "pet.mha", stored))
    np.testing.assert_array_equal(volume.array, stored)
    assert "warnings" not in volume.metadata


@pytest.mark.parametrize("low, high", [(-1e-4, 1.0005), (0.0, 1.0)], ids=["a hair outside", "exactly"])
def test_float_colour_a_resampling_hair_outside_0_to_1_is_kept_as_it_is(tmp_path, colour, low, high):
    """Float colour reaching 1.0005 (what resampling leaves; data.color accepts it) was divided by
    255 and read as all but black, and one a hair below 0 was refused."""
    stored = np.interp(colour, (colour.min(), colour.max()), (low, high)).astype(np.float32)
    volume = read_image(_write_vector_image(tmp_path / "pet.mha", stored))
    np.testing.assert_array_equal(volume.array, stored)
    assert "warnings" not in volume.metadata


@pytest.mark.parametrize("low, high", [(0.0, 300.0), (-5.0, 200.0), (0.0, 1.5)],
                         ids=["above 255", "negative", "neither scale"])
def test_float_colour_of_no_known_scale_is_refused_naming_the_file(tmp_path, colour, low, high):
    stored = np.interp(colour, (0, 255), (low, high)).astype(np.float32)
    path = _write_vector_image(tmp_path / "pet.mha", stored)
    with pytest.raises(InputError, match="neither \\[0, 1\\] nor 8-bit") as error:
        read_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_16bit_colour_reads_as_the_same_16bit_png_does(tmp_path, colour, suffix):
    stored = colour.astype(np.uint16) * 257 + 3  # uses the low byte too
    from_png = read_image(_write_vector_image(tmp_path / "pet.png", stored))
    volume = read_image(_write_vector_image(tmp_path / f"pet{suffix}", stored))
    assert volume.is_rgb and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, from_png.array)
    np.testing.assert_allclose(volume.array, stored / 65535, rtol=1e-6)


def test_other_integer_colour_is_refused_naming_the_file(tmp_path, colour):
    path = _write_vector_image(tmp_path / "pet.mha", colour.astype(np.int16))
    with pytest.raises(InputError, match="int16 have no known colour scale") as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_a_colour_layer_is_held_as_its_file_is(colour):
    """The workbench fuses a layer as the CLI fuses the file: 0-255 floats and uint16 become [0, 1]."""
    from_floats = layer_to_volume(ImageLayer(colour.astype(np.float32), rgb=True, name="float PET"))
    np.testing.assert_allclose(from_floats.array, colour / 255, rtol=1e-6)
    assert any("divided by 255" in warning for warning in from_floats.metadata["warnings"])
    from_16bit = layer_to_volume(ImageLayer(colour.astype(np.uint16) * 257, rgb=True, name="16-bit PET"))
    np.testing.assert_allclose(from_16bit.array, colour / 255, rtol=1e-6)
    np.testing.assert_array_equal(layer_to_volume(ImageLayer(colour, rgb=True, name="8-bit PET")).array, colour)
    with pytest.raises(InputError, match="^unsigned PET: .*neither \\[0, 1\\] nor 8-bit"):
        layer_to_volume(ImageLayer(colour * 4.0 - 8, rgb=True, name="unsigned PET"))


# ---- colour NIfTI stored as vectors ----------------------------------------------------------------
def test_a_colour_nifti_written_by_simpleitk_reads_as_the_png_it_came_from(tmp_path, colour):
    png = tmp_path / "pet.png"
    Image.fromarray(colour).save(png)
    nifti = tmp_path / "pet.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(png)), str(nifti))
    assert nib.load(nifti).shape == (9, 6, 1, 1, 3)  # x, y, z, t, colour: a 5-D vector file
    volume, picture = read_image(nifti), read_image(png)
    assert volume.is_rgb and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, picture.array)
    assert volume.geometry.allclose(picture.geometry)


def test_an_rgba_or_float_colour_nifti_written_by_simpleitk_reads_as_its_picture(tmp_path, colour):
    alpha = np.full(colour.shape[:2] + (1,), 255, np.uint8)
    alpha[0, 0] = 0
    rgba = read_image(_write_vector_image(tmp_path / "rgba.nii.gz", np.concatenate([colour, alpha], axis=-1)))
    np.testing.assert_array_equal(rgba.array, colour)
    assert any("transparency ignored" in warning for warning in rgba.metadata["warnings"])
    floats = read_image(_write_vector_image(tmp_path / "float.nii.gz", (colour / 255).astype(np.float32)))
    assert floats.is_rgb
    np.testing.assert_allclose(floats.array, colour / 255, rtol=1e-6)


def _rgb_vector_nifti(path, vectors: np.ndarray):
    """A NIfTI with the RGB_VECTOR intent (2003) and its colour on the last of (x, y, z, 3)."""
    image = nib.Nifti1Image(vectors, np.eye(4))
    image.header.set_intent("rgb vector")
    nib.save(image, path)
    return path


def test_an_rgb_vector_intent_slice_reads_as_colour(tmp_path, colour):
    vectors = colour.transpose(1, 0, 2)[:, :, np.newaxis, :].astype(np.float32) / 255
    volume = read_image(_rgb_vector_nifti(tmp_path / "pet.nii.gz", vectors))
    assert volume.is_rgb
    np.testing.assert_allclose(volume.array, colour / 255, rtol=1e-6)


@pytest.mark.parametrize("layout", ["rgb vector intent (x, y, z, 3)", "vector (x, y, z, 1, 3)"])
def test_a_colour_vector_volume_is_refused_as_colour_not_as_frames(tmp_path, colour, layout):
    slices = np.stack([colour.transpose(1, 0, 2)] * 4, axis=2)  # x, y, z, colour
    path = tmp_path / "pet.nii.gz"
    if layout.startswith("rgb"):
        _rgb_vector_nifti(path, slices)
    else:
        nib.save(nib.Nifti1Image(slices[:, :, :, np.newaxis, :], np.eye(4)), path)
    with pytest.raises(InputError, match="colour images are supported in 2D only") as error:
        read_image(path)
    assert "fslroi" not in str(error.value) and "displacement" not in str(error.value)


@pytest.mark.parametrize("components", [3, 4])
def test_8bit_colour_on_a_4th_axis_without_the_intent_is_refused_with_the_colour_hint(tmp_path, colour, components):
    """(x, y, 1, 3) uint8 read as 3 frames: the refusal named fslroi and not the missing RGB intent."""
    pixels = np.concatenate([colour, np.full((6, 9, 1), 255, np.uint8)], axis=-1)[..., :components]
    vectors = pixels.transpose(1, 0, 2)[:, :, np.newaxis, :]
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(vectors, np.eye(4)), path)
    forms = r"RGB_VECTOR.*RGB24" if components == 3 else r"RGBA_VECTOR.*RGBA32"
    with pytest.raises(InputError, match=rf"{components} frames.*if it is a colour picture.*{forms}.*PNG"):
        read_image(path)
    np.testing.assert_array_equal(read_image(_rgb_vector_nifti(path, vectors)).array, colour)  # the hint, taken


def test_8bit_colour_as_a_third_axis_reads_as_slices_with_the_colour_hint(tmp_path, colour):
    """(x, y, 3) uint8 is a volume of 3 slices (then refused beside a 2-D reference without a word of colour)."""
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(colour.transpose(1, 0, 2), np.eye(4)), path)
    volume = read_image(path)
    assert volume.ndim == 3 and not volume.is_rgb  # NIfTI's third axis is z: a volume it may well be
    assert [warning for warning in volume.metadata["warnings"] if "colour picture" in warning] == [
        "read as 3 slices of grey values: if it is a colour picture, store it as (x, y, 1, 3) with the NIfTI intent "
        "RGB_VECTOR (nibabel: header.set_intent('rgb vector')), or as RGB24, or save it as PNG"]
    follows_the_hint = colour.transpose(1, 0, 2)[:, :, np.newaxis, :]
    np.testing.assert_array_equal(read_image(_rgb_vector_nifti(path, follows_the_hint)).array, colour)


def test_the_colour_hint_reaches_the_refusal_of_such_slices_beside_a_picture(tmp_path, colour):
    from napari_unifuse.engine.inference import refuse_mixed_dimensions

    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(colour.transpose(1, 0, 2), np.eye(4)), path)
    picture = ImageVolume(colour[..., 0].astype(np.float32), Geometry.identity(2))
    with pytest.raises(InputError, match=r"both must be 2D or both 3D \(the reader noted: .*pet\.nii\.gz: read as 3 "
                                         "slices of grey values: if it is a colour picture"):
        refuse_mixed_dimensions(picture, read_image(path))


@pytest.mark.parametrize("what", ["uint8 frames of a volume", "float components"])
def test_no_colour_hint_where_the_data_is_no_8bit_picture(tmp_path, colour, what):
    data = np.stack([colour.transpose(1, 0, 2)] * 2, axis=2)  # (x, y, 2 slices, 3 frames)
    if what == "float components":
        data = data[:, :, :1].astype(np.float32) + 1000  # no [0, 1] colour either
    path = tmp_path / "frames.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError, match="3 frames") as error:
        read_image(path)
    assert "colour picture" not in str(error.value)
    nib.save(nib.Nifti1Image(np.zeros((9, 6, 3), np.int16), np.eye(4)), path)
    assert not any("colour picture" in warning for warning in read_image(path).metadata.get("warnings", []))


def test_a_signed_vector_nifti_is_still_told_to_read_it_as_a_displacement_field(tmp_path, rng):
    field = rng.normal(size=(5, 4, 3, 1, 3)).astype(np.float32)
    path = tmp_path / "field.nii.gz"
    nib.save(nib.Nifti1Image(field, np.eye(4)), path)
    with pytest.raises(InputError, match="read_displacement"):
        read_image(path)


def test_a_colour_slice_off_the_axial_plane_is_refused_in_one_line(tmp_path, colour):
    records = np.zeros((9, 6, 1), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for channel, name in enumerate("RGB"):
        records[name][..., 0] = colour[..., channel].T
    coronal = np.array([[-0.9, 0, 0, 20], [0, 0, 1.5, -30], [0, 0.9, 0, 40], [0, 0, 0, 1.0]])  # y runs to S
    path = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(records, coronal), path)
    with pytest.raises(InputError, match="coronal, sagittal or oblique plane.*axial plane only") as error:
        read_image(path)
    assert "\n" not in str(error.value)


# ---- NRRD space units ----------------------------------------------------------------------------
def _nrrd_with_space_units(path, units: str):
    """A NRRD of 0.5 × 0.5 × 2 mm voxels at (1, 2, 3) mm, stated in ``units`` (the space units' value)."""
    image = sitk.GetImageFromArray(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    scale = {'"microns"': 1000.0, '"m"': 0.001}.get(units.split()[0], 1.0)
    image.SetSpacing([0.5 * scale, 0.5 * scale, 2.0 * scale])
    image.SetOrigin([1.0 * scale, 2.0 * scale, 3.0 * scale])
    sitk.WriteImage(image, str(path))
    header, _, data = path.read_bytes().partition(b"\n\n")
    path.write_bytes(header + f"\nspace units: {units}\n\n".encode() + data)
    return path


@pytest.mark.parametrize("unit", ["microns", "m"])
def test_nrrd_space_units_are_converted_to_mm(tmp_path, unit):
    volume = read_image(_nrrd_with_space_units(tmp_path / "scan.nrrd", f'"{unit}" "{unit}" "{unit}"'))
    np.testing.assert_allclose(volume.geometry.spacing, [2.0, 0.5, 0.5], rtol=1e-9)
    np.testing.assert_allclose(volume.geometry.origin, [3.0, 2.0, 1.0], rtol=1e-9)
    assert "warnings" not in volume.metadata


def test_a_detached_nrrd_header_has_its_space_units_converted_too(tmp_path):
    attached = _nrrd_with_space_units(tmp_path / "scan.nrrd", '"microns" "microns" "microns"')
    header, _, data = attached.read_bytes().partition(b"\n\n")
    (tmp_path / "scan.raw").write_bytes(data)
    detached = tmp_path / "scan.nhdr"
    detached.write_bytes(header + b"\ndata file: scan.raw\n")
    np.testing.assert_allclose(read_image(detached).geometry.spacing, [2.0, 0.5, 0.5], rtol=1e-9)


def test_nrrd_space_units_not_known_are_kept_as_mm_and_named_in_a_warning(tmp_path):
    volume = read_image(_nrrd_with_space_units(tmp_path / "scan.nrrd", '"furlongs" "furlongs" "furlongs"'))
    np.testing.assert_allclose(volume.geometry.spacing, [2.0, 0.5, 0.5])
    assert any("furlongs" in warning and "not converted to mm" in warning for warning in volume.metadata["warnings"])


def test_nrrd_in_mm_reads_as_before(tmp_path):
    volume = read_image(_nrrd_with_space_units(tmp_path / "scan.nrrd", '"mm" "mm" "mm"'))
    assert volume.geometry.allclose(Geometry(np.array([2.0, 0.5, 0.5]), np.array([3.0, 2.0, 1.0]), np.eye(3)))
    assert "warnings" not in volume.metadata
