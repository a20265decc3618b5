"""Displacement files are ITK displacement fields: SimpleITK applies them as we do."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, read_displacement, write_displacement


def _smooth(rng, shape, amplitude):
    field = gaussian_filter(rng.normal(size=shape), sigma=3.0)
    return amplitude * field / np.abs(field).max()


@pytest.mark.parametrize(
    ("shape", "spacing", "degrees"),
    [((40, 48), (0.7, 1.6), (30.0,)), ((14, 18, 16), (2.5, 0.9, 1.3), (10.0, -20.0, 35.0))],
    ids=["2d", "3d"],
)
def test_simpleitk_resample_with_written_field_matches_numpy_warp(tmp_path, rng, rotation, shape, spacing, degrees):
    ndim = len(shape)
    geometry = Geometry(spacing, rng.uniform(-50, 50, ndim), rotation(degrees))
    moving = _smooth(rng, shape, 100.0).astype(np.float32)
    u = np.stack([_smooth(rng, shape, 2.5) for _ in range(ndim)]).astype(np.float32)

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    ours = map_coordinates(moving, grid + u, order=1)

    path = write_displacement(u, geometry, tmp_path / "displacement.nii.gz")
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving_image = geometry.to_sitk(sitk.GetImageFromArray(moving))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving_image, moving_image, transform, sitk.sitkLinear, 0.0))

    # Compare where x + u stays inside the image (the two libraries treat borders differently).
    inside = np.all([(grid[k] + u[k] >= 0) & (grid[k] + u[k] <= shape[k] - 1) for k in range(ndim)], axis=0)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3 * np.abs(moving).max())

    np.testing.assert_allclose(read_displacement(path, geometry), u, atol=1e-4)


def test_field_on_another_grid_is_refused(tmp_path, rng):
    geometry = Geometry([1.0, 1.0], [0.0, 0.0], np.eye(2))
    path = write_displacement(np.zeros((2, 6, 7), np.float32), geometry, tmp_path / "u.mha")
    with pytest.raises(InputError, match="differs from the reference grid"):
        read_displacement(path, Geometry([2.0, 1.0], [0.0, 0.0], np.eye(2)))
    with pytest.raises(InputError, match=r"shape \(2, \*spatial\)"):
        write_displacement(np.zeros((3, 6, 7), np.float32), geometry, tmp_path / "bad.mha")


@pytest.mark.parametrize("field", ["smooth", "zero"])
@pytest.mark.parametrize("cut", ["half", "gzip trailer"])
def test_a_field_the_disk_cut_short_is_refused_not_left_to_read_wrong(tmp_path, rng, monkeypatch, field, cut):
    """A writer that reports no failed write (SimpleITK's) leaves on a full disk a truncated
    displacement.nii.gz that still reads (wrong values; the zero field even reads right without
    its gzip trailer): whatever wrote the file, a cut one is refused."""
    import napari_unifuse.io.fields as fields

    real_save = fields.save_nifti

    def disk_fills_up(image, name):
        real_save(image, name)
        with open(name, "rb") as stream:
            data = stream.read()
        with open(name, "wb") as stream:
            stream.write(data[: len(data) // 2] if cut == "half" else data[:-8])

    u = gaussian_filter(rng.normal(size=(3, 12, 14, 10)), 2.0) if field == "smooth" else np.zeros((3, 12, 14, 10))
    monkeypatch.setattr(fields, "save_nifti", disk_fills_up)
    with pytest.raises(InputError, match=r"the field was not written completely \(is the disk full\?\)"):
        write_displacement(u, Geometry.identity(3), tmp_path / "displacement.nii.gz")


def test_the_field_of_a_reference_without_orientation_moves_points_as_simpleitk_reads_the_reference(tmp_path, rng):
    """A NIfTI reference with qform and sform codes 0 is placed by a guess: nibabel's (the package's
    geometry: centred, y flipped in LPS) and ITK's (origin 0, identity direction) differ. The field,
    written without orientation like every output on that grid, held its vectors in nibabel's frame:
    SimpleITK moved points the wrong way along y, and read_displacement refused the file."""
    import nibabel as nib

    from napari_unifuse.io import read_image

    shape = (10, 14, 12)  # array order (z, y, x)
    paths = {}
    for role, array in (("reference", _smooth(rng, shape, 100.0)), ("moving", _smooth(rng, shape, 100.0))):
        image = nib.Nifti1Image(array.astype(np.float32).transpose(), None)
        image.header.set_zooms((1.5, 1.2, 2.0))
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
        paths[role] = tmp_path / f"{role}.nii.gz"
        nib.save(image, paths[role])
    reference, moving = read_image(paths["reference"]), read_image(paths["moving"])
    u = np.stack([_smooth(rng, shape, 2.0) for _ in range(3)]).astype(np.float32)
    u[1] += 2.0  # a clear step along y, the axis the two guesses point opposite ways

    path = write_displacement(u, reference.geometry, tmp_path / "displacement.nii.gz",
                              reference_metadata=reference.metadata)
    assert (nib.load(path).header["qform_code"], nib.load(path).header["sform_code"]) == (0, 0)

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    aligned = map_coordinates(moving.array.astype(np.float64), grid + u, order=1)  # moving at x + u
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(paths["moving"])),
                                                  sitk.ReadImage(str(paths["reference"])), transform,
                                                  sitk.sitkLinear, 0.0))
    inside = np.all([(grid[k] + u[k] >= 0) & (grid[k] + u[k] <= shape[k] - 1) for k in range(3)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], aligned[inside], atol=1e-3 * np.abs(aligned).max())

    np.testing.assert_allclose(read_displacement(path, reference.geometry), u, atol=1e-4)
    with pytest.raises(InputError, match="differs from the reference grid"):  # still only on its own grid
        read_displacement(path, read_image(paths["reference"]).geometry.transposed([0, 2, 1]))


def _nifti(tmp_path, name, array, zooms, affine=None):
    """``array`` (z, y, x) saved as NIfTI: oriented by ``affine`` (RAS, both codes 1), or without
    orientation (both codes 0) when there is none."""
    import nibabel as nib

    image = nib.Nifti1Image(array.astype(np.float32).transpose(), affine)
    image.header.set_zooms(zooms)
    if affine is None:
        image.set_qform(None, code=0)
        image.set_sform(None, code=0)
    path = tmp_path / name
    nib.save(image, path)
    return path


@pytest.mark.parametrize(("reference_kind", "moving_kind"), [
    ("without orientation", "oriented, on another grid"),
    ("without orientation", "without orientation, a central crop"),
    ("oriented", "without orientation, a central crop"),
])
def test_simpleitk_samples_the_moving_image_where_the_package_did_whoever_places_it_by_a_guess(
        tmp_path, rng, rotation, reference_kind, moving_kind, sampled_by_package_and_simpleitk):
    """A NIfTI without orientation (codes 0) is placed by two guesses: the package's (nibabel's,
    centred) and ITK's (origin 0). The field held ``u`` in ITK's frame of the reference alone, so
    where the two tools place the moving image otherwise than the field, SimpleITK's resample
    through it sampled the moving image elsewhere (a correlation of -0.02 with the aligned CT)."""
    from napari_unifuse.io import read_image

    def oriented(array, name):
        affine = np.eye(4)
        affine[:3, :3] = rotation((8.0, -5.0, 12.0)) @ np.diag([1.3, 1.1, 1.4])
        affine[:3, 3] = -affine[:3, :3] @ (np.array(array.shape[::-1]) - 1) / 2 + [3.0, -2.0, 4.0]
        return _nifti(tmp_path, name, array, (1.3, 1.1, 1.4), affine)

    shape, zooms = (10, 14, 12), (1.5, 1.2, 2.0)  # array order (z, y, x); zooms in nibabel's (x, y, z)
    reference_array = _smooth(rng, shape, 100.0)
    reference = read_image(_nifti(tmp_path, "reference.nii.gz", reference_array, zooms)
                           if reference_kind == "without orientation" else oriented(reference_array, "reference.nii.gz"))
    whole = _smooth(rng, (16, 20, 18), 100.0) + 200.0
    moving_path = (oriented(whole, "moving.nii.gz") if moving_kind.startswith("oriented")
                   else _nifti(tmp_path, "moving.nii.gz", whole[3:-3, 2:-2, 4:-4], zooms))
    moving = read_image(moving_path)
    u = np.stack([_smooth(rng, shape, 2.0) for _ in range(3)]).astype(np.float32)

    # The package samples the moving image at world(x + u), a point of its own placement of it.
    ours, theirs, inside = sampled_by_package_and_simpleitk(reference, moving, u)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-3 * np.abs(ours).max())


def test_a_moving_image_placed_alike_leaves_the_field_as_it_was(tmp_path, rng, rotation):
    """Oriented images (every tool places them alike): the field is ``u`` in the reference's frame,
    bit for bit, whether the moving image's placement (the identity) is given or not."""
    shape = (6, 7, 5)
    geometry = Geometry([1.5, 0.8, 1.1], [10.0, -4.0, 2.5], rotation((10.0, 20.0, -30.0)))
    u = np.stack([_smooth(rng, shape, 2.0) for _ in range(3)]).astype(np.float32)
    expected = np.einsum("ij,j...->...i", geometry.index_to_world[:3, :3], u.astype(np.float64))[..., ::-1]
    for name, placement in (("default.nii.gz", None), ("identity.nii.gz", np.eye(4))):
        path = write_displacement(u, geometry, tmp_path / name, moving_placement=placement)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        np.testing.assert_array_equal(written, expected.astype(np.float32))


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_a_field_of_another_shape_on_the_reference_geometry_is_refused_given_the_shape(tmp_path, suffix):
    """Spacing, origin and direction alike, the voxel counts not: the field passed the grid check and
    failed later, wherever it was compared with a field on the reference grid."""
    geometry = Geometry([1.5, 0.5], [3.0, -2.0], np.eye(2))
    path = write_displacement(np.zeros((2, 6, 7), np.float32), geometry, tmp_path / f"u{suffix}")
    assert read_displacement(path, geometry).shape == (2, 6, 7)
    np.testing.assert_array_equal(read_displacement(path, geometry, (6, 7)), np.zeros((2, 6, 7)))
    with pytest.raises(InputError, match=r"the field's grid has shape \(6, 7\) but the reference's has \(6, 8\)"):
        read_displacement(path, geometry, (6, 8))


def test_a_one_slice_fields_shape_is_checked_after_its_slice_axis_is_put_back(tmp_path):
    """A one-slice reference's NIfTI field is stored with the slice axis moved (_itk_readable_order)."""
    geometry = Geometry([3.0, 1.0, 1.0], [0.0, 0.0, 0.0], np.eye(3))
    u = np.zeros((3, 1, 5, 6), np.float32)
    u[2] = 0.5
    path = write_displacement(u, geometry, tmp_path / "u.nii.gz")
    np.testing.assert_allclose(read_displacement(path, geometry, (1, 5, 6)), u, atol=1e-5)
    with pytest.raises(InputError, match=r"has shape \(1, 5, 6\) but the reference's has \(1, 5, 7\)"):
        read_displacement(path, geometry, (1, 5, 7))
