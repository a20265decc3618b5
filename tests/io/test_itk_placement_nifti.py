"""Where ITK (SimpleITK) places a NIfTI whose forms it reads otherwise than nibabel, checked against
SimpleITK itself: it takes the sform only when its axes are perpendicular and either its code is 1
or the qform is unset, else the qform; it refuses a sheared sform beside no qform."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_unifuse.errors import InputError
from napari_unifuse.io import (
    Geometry,
    ImageVolume,
    placement_metadata,
    read_displacement,
    read_image,
    write_displacement,
    write_image,
)
from napari_unifuse.io.fields import itk_placement
from napari_unifuse.io.nifti_xforms import NiftiXforms

_ZOOMS = (1.2, 1.0, 1.5)  # nibabel order (i, j, k)
_SHAPE = (8, 9, 10)  # array order (z, y, x), i.e. 10 × 9 × 8 voxels in nibabel's (i, j, k)
# Byte offset of pixdim in a NIfTI-1 header (nifti1.h): 8 float32, pixdim[1] the size along voxel axis i.
_PIXDIM_OFFSET = 76


def _form(degrees: float = 0.0, shear: float = 0.0, offset=(-5.0, -4.0, -6.0)) -> np.ndarray:
    """A RAS form: the zooms, rotated ``degrees`` about z, ``shear`` mm of x per slice (k)."""
    turn = np.deg2rad(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    form = np.eye(4)
    form[:3, :3] = rotation @ np.diag(_ZOOMS) @ np.array([[1.0, 0.0, shear], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    form[:3, 3] = offset
    return form


def _save(path, array, *, sform, sform_code, qform, qform_code):
    image = nib.Nifti1Image(array.astype(np.float32).transpose(), _form())
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nib.save(image, path)
    return path


def _smooth(rng, shape, amplitude):
    field = gaussian_filter(rng.normal(size=shape), sigma=2.0)
    return amplitude * field / np.abs(field).max()


HEADERS = {  # sform, its code, qform code (the qform is the plain form, 10 mm off where it differs)
    "rotated sform, code 1": (_form(degrees=10.0), 1, 1),
    "rotated sform, code 2": (_form(degrees=10.0), 2, 1),
    "rotated sform, code 4, no qform": (_form(degrees=10.0), 4, 0),
    "sheared sform, code 1": (_form(shear=0.2), 1, 1),
    "sheared sform, code 2": (_form(shear=0.2), 2, 1),
    "sform longer than pixdim, no qform": (_form() @ np.diag([1.5, 1.0, 1.0, 1.0]), 1, 0),
}


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
def test_the_package_places_a_nifti_in_itk_where_simpleitk_does(tmp_path, rng, header):
    sform, sform_code, qform_code = header
    qform = _form(offset=(5.0, -4.0, -6.0))
    path = _save(tmp_path / "image.nii.gz", rng.random(_SHAPE), sform=sform, sform_code=sform_code,
                 qform=qform, qform_code=qform_code)
    volume = read_image(path)
    theirs = Geometry.from_sitk(sitk.ReadImage(str(path))).index_to_world
    ours = itk_placement(volume) @ volume.geometry.index_to_world
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_a_sheared_sform_beside_no_qform_is_said_to_be_refused_by_itk(tmp_path, rng):
    path = _save(tmp_path / "image.nii.gz", rng.random(_SHAPE), sform=_form(shear=0.2), sform_code=1,
                 qform=_form(), qform_code=0)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))
    volume = read_image(path)
    assert any("refuse to read" in warning for warning in volume.metadata["warnings"])
    assert NiftiXforms.from_metadata(volume.metadata).itk_form() is None


@pytest.mark.parametrize(("sform", "sform_code", "itk_reads"), [
    (_form(degrees=10.0), 1, "The sform is used, as nibabel, FSL and ITK-based tools"),
    (_form(degrees=10.0), 4, "place the image by its qform, passing over an sform of code 4"),
    (_form(shear=0.2), 1, "place the image by its qform, passing over an sform which shears"),
], ids=["rotated, code 1", "rotated, code 4", "sheared, code 1"])
def test_the_disagreement_warning_names_the_form_simpleitk_reads(tmp_path, rng, sform, sform_code, itk_reads):
    """The warning said ITK-based tools read the qform, whatever the sform: SimpleITK reads an sform
    of code 1 whose axes are perpendicular."""
    path = _save(tmp_path / "image.nii.gz", rng.random(_SHAPE), sform=sform, sform_code=sform_code,
                 qform=_form(), qform_code=1)
    itk_origin = np.array(sitk.ReadImage(str(path)).GetOrigin()) * [-1, -1, 1]  # RAS
    read_by_itk = "sform" if np.allclose(itk_origin, sform[:3, 3], atol=1e-4) and np.allclose(
        sitk.ReadImage(str(path)).GetDirection(), Geometry.from_ras_affine(sform).itk_direction, atol=1e-4) else "qform"
    assert read_by_itk == ("sform" if "sform is used, as" in itk_reads else "qform")
    (warning,) = read_image(path).metadata["warnings"]
    assert "disagree" in warning and itk_reads in warning
    assert "keep both forms" in warning


@pytest.mark.parametrize("sheared", [False, True], ids=["rotated sform, code 2", "sheared sform, code 1"])
def test_simpleitk_resamples_such_a_moving_nifti_through_the_field_where_the_package_sampled_it(
        tmp_path, rng, sheared, sampled_by_package_and_simpleitk):
    """A moving NIfTI whose forms SimpleITK reads otherwise than nibabel (it takes the qform) was
    placed by the package's forms in the field: SimpleITK's resample through it sampled the moving
    image up to millimetres from where the aligned image took its values."""
    reference_path = _save(tmp_path / "reference.nii.gz", _smooth(rng, _SHAPE, 100.0), sform=_form(),
                           sform_code=1, qform=_form(), qform_code=1)
    sform, sform_code = (_form(shear=0.3), 1) if sheared else (_form(degrees=12.0), 2)
    moving_path = _save(tmp_path / "moving.nii.gz", _smooth(rng, _SHAPE, 100.0) + 200.0, sform=sform,
                        sform_code=sform_code, qform=_form(), qform_code=1)
    reference, moving = read_image(reference_path), read_image(moving_path)
    u = np.stack([_smooth(rng, _SHAPE, 1.5) for _ in range(3)]).astype(np.float32)

    ours, theirs, inside = sampled_by_package_and_simpleitk(reference, moving, u)
    assert inside.mean() > 0.4
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3 * np.abs(ours).max())


def test_the_field_of_a_reference_simpleitk_places_by_its_qform_moves_points_as_u_says(tmp_path, rng):
    """A reference whose sform (code 2) is rotated 10° from its qform: SimpleITK reads it and its
    field by the qform, but the field's vectors were ``u`` in the sform's axes, so its resample of
    an image on the reference's header moved points 10° off ``u``. The field reads back to ``u``."""
    header = {"sform": _form(degrees=10.0), "sform_code": 2, "qform": _form(), "qform_code": 1}
    reference_path = _save(tmp_path / "reference.nii.gz", _smooth(rng, _SHAPE, 100.0), **header)
    moving_path = _save(tmp_path / "moving.nii.gz", _smooth(rng, _SHAPE, 100.0) + 200.0, **header)
    reference, moving = read_image(reference_path), read_image(moving_path)
    u = np.stack([_smooth(rng, _SHAPE, 1.5) for _ in range(3)]).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in _SHAPE], indexing="ij")).astype(np.float64)
    ours = map_coordinates(moving.array.astype(np.float64), grid + u, order=1)  # same grid: x + u

    path = write_displacement(u, reference.geometry, tmp_path / "displacement.nii.gz",
                              reference_metadata=reference.metadata)
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(moving_path)), sitk.ReadImage(str(reference_path)),
                                                  transform, sitk.sitkLinear, 0.0))
    inside = np.all([(grid[k] + u[k] >= 0) & (grid[k] + u[k] <= _SHAPE[k] - 1) for k in range(3)], axis=0)
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3 * np.abs(ours).max())
    np.testing.assert_allclose(read_displacement(path, reference.geometry, _SHAPE), u, atol=1e-4)


def test_a_nifti_output_of_a_sheared_sform_reference_keeps_its_header_and_sits_in_itk_where_it_does(tmp_path, rng):
    """A sheared grid was refused as NIfTI, so a reference whose sform is sheared had MetaImage
    outputs placed by the shear, while SimpleITK shows the reference by its qform: up to 2.5 mm off.
    Written as NIfTI with the reference's own forms and codes, each tool shows them where it shows it."""
    header = {"sform": _form(shear=0.2), "sform_code": 2, "qform": _form(degrees=10.0), "qform_code": 1}
    reference_path = _save(tmp_path / "reference.nii.gz", rng.random(_SHAPE), **header)
    reference = read_image(reference_path)
    assert reference.geometry.is_sheared
    output = write_image(ImageVolume(reference.array, reference.geometry, placement_metadata(reference.metadata)),
                         tmp_path / "fused.nii.gz")

    written, original = nib.load(output).header, nib.load(reference_path).header
    for form in ("qform", "sform"):
        np.testing.assert_allclose(getattr(written, f"get_{form}")(), getattr(original, f"get_{form}")(), atol=1e-5)
        assert int(written[f"{form}_code"]) == int(original[f"{form}_code"])
    theirs, ours = sitk.ReadImage(str(reference_path)), sitk.ReadImage(str(output))
    for placement in ("GetOrigin", "GetDirection", "GetSpacing"):
        np.testing.assert_allclose(getattr(ours, placement)(), getattr(theirs, placement)(), atol=1e-5)


def test_a_sheared_sform_beside_no_qform_is_still_refused_as_nifti(tmp_path, rng):
    """ITK-based tools refuse such a header: NIfTI outputs keeping it would open nowhere there."""
    path = _save(tmp_path / "reference.nii.gz", rng.random(_SHAPE), sform=_form(shear=0.2), sform_code=1,
                 qform=_form(), qform_code=0)
    reference = read_image(path)
    with pytest.raises(InputError, match=r"grid is sheared .* save it as \.mha"):
        write_image(ImageVolume(reference.array, reference.geometry, placement_metadata(reference.metadata)),
                    tmp_path / "fused.nii.gz")


@pytest.mark.parametrize("sform_code", [1, 2])
def test_the_field_of_a_one_slice_reference_whose_forms_itk_reads_otherwise_reads_back(tmp_path, sform_code):
    """A one-slice field is stored with its slice axis moved; with a code-2 sform rotated from the
    qform (ITK reads the qform) the package could not read its own field back ("grid differs")."""
    array = np.random.default_rng(0).random((1, 18, 20))  # one slice along nibabel's k
    path = _save(tmp_path / "slice.nii.gz", array, sform=_form(degrees=10.0), sform_code=sform_code,
                 qform=_form(), qform_code=1)
    reference = read_image(path)
    u = np.random.default_rng(1).normal(scale=0.3, size=(3, *reference.array.shape)).astype(np.float32)
    field = write_displacement(u, reference.geometry, tmp_path / "displacement.nii.gz",
                               reference_metadata=reference.metadata)
    np.testing.assert_allclose(read_displacement(field, reference.geometry, reference.array.shape), u, atol=1e-5)


def _with_negative_voxel_sizes(path, axes):
    """``path`` with pixdim stored negative along nibabel voxel ``axes`` (as some converters write a flip)."""
    raw = bytearray(path.read_bytes())
    for axis in axes:
        offset = _PIXDIM_OFFSET + 4 * (axis + 1)
        struct.pack_into("<f", raw, offset, -struct.unpack_from("<f", raw, offset)[0])
    path.write_bytes(bytes(raw))
    return path


def _itk_corners(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    return np.array([image.TransformIndexToPhysicalPoint([(n - 1) * bit for n, bit in zip(image.GetSize(), bits)])
                     for bits in np.ndindex(*(2,) * image.GetDimension())])


@pytest.mark.parametrize(("sform_code", "qform_code"), [(1, 1), (2, 0), (0, 0)],
                         ids=["sform and qform, code 1", "sform only, code 2", "no orientation"])
@pytest.mark.parametrize("axes", [(0,), (1, 2)], ids=["i", "j and k"])
def test_negative_voxel_sizes_are_said_to_mirror_the_image_in_itk_against_its_outputs(
        tmp_path, rng, sform_code, qform_code, axes):
    """nibabel makes a negative pixdim positive as it loads the header (printing only "setting to
    abs"), while SimpleITK reverses that voxel axis, whichever form it reads: ITK-based tools showed
    the image mirrored against its outputs (written with positive sizes), and nothing said so."""
    form = _form(degrees=10.0)
    path = _with_negative_voxel_sizes(_save(tmp_path / "image.nii", rng.random(_SHAPE), sform=form,
                                            sform_code=sform_code, qform=form, qform_code=qform_code), axes)
    volume = read_image(path)
    output = write_image(ImageVolume(volume.array, volume.geometry, placement_metadata(volume.metadata)),
                         tmp_path / "fused.nii.gz")
    apart = np.linalg.norm(_itk_corners(path) - _itk_corners(output), axis=1).max()
    assert apart > 1.0  # SimpleITK does mirror it
    (warning,) = [warning for warning in volume.metadata["warnings"] if "negative voxel sizes" in warning]
    assert f"up to {apart:.3g} mm" in warning and "mirrored" in warning
    assert "Outputs on its grid are written with positive voxel sizes" in warning


def test_a_negative_voxel_size_across_a_one_slice_volume_mirrors_nothing_and_is_not_warned_about(tmp_path, rng):
    path = _with_negative_voxel_sizes(_save(tmp_path / "slice.nii", rng.random((1, 9, 10)), sform=_form(),
                                            sform_code=1, qform=_form(), qform_code=1), axes=(2,))
    volume = read_image(path)
    output = write_image(ImageVolume(volume.array, volume.geometry, placement_metadata(volume.metadata)),
                         tmp_path / "fused.nii.gz")
    np.testing.assert_allclose(_itk_corners(path), _itk_corners(output), atol=1e-4)
    assert "warnings" not in volume.metadata


def test_an_sform_itk_takes_with_the_voxel_sizes_is_said_to_be_so(tmp_path, rng):
    """An sform of code 1 whose axes are longer than pixdim, 10 mm from the qform: SimpleITK places
    the image by the sform's origin and directions with the voxel sizes, and the warning said it
    passed over "an sform of code 1, not 1 (scanner)" for the qform."""
    sform = _form(offset=(5.0, -4.0, -6.0)) @ np.diag([1.5, 1.0, 1.0, 1.0])
    path = _save(tmp_path / "image.nii.gz", rng.random(_SHAPE), sform=sform, sform_code=1, qform=_form(),
                 qform_code=1)
    by_sform_with_pixdim = sform.copy()
    by_sform_with_pixdim[:3, :3] = _form()[:3, :3]
    np.testing.assert_allclose(Geometry.from_sitk(sitk.ReadImage(str(path))).index_to_world,
                               Geometry.from_ras_affine(by_sform_with_pixdim).index_to_world, atol=1e-4)
    (warning,) = read_image(path).metadata["warnings"]
    assert "not 1 (scanner)" not in warning and "passing over" not in warning
    assert "take its axis directions with the voxel sizes (pixdim, 1.2 × 1 × 1.5 mm)" in warning
