"""NIfTI files whose suffix is in any case (``Ref.Nii.Gz``, ``scan.Nii``) read and write like lower-case ones.

nibabel rebuilds a file name from the suffix it found, in all upper or all lower case, so a
mixed-case ``.Nii.Gz`` would be looked for (or written) as ``.nii.Gz``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, read_displacement, read_image, write_displacement, write_image

_GZIP_MAGIC = b"\x1f\x8b"


def _affine(rotation) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation((10.0, -25.0, 40.0)) @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-30.5, 14.0, 52.25]
    return affine


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize(
    ("lower", "name"),
    [
        ("ref.nii.gz", "Ref.Nii.Gz"),
        ("ref.nii.gz", "ref.nIi.gz"),
        ("ref.nii.gz", "ref.Nii.GZ"),
        ("ref.nii.gz", "REF.NII.GZ"),
        ("scan.nii", "scan.Nii"),
        ("scan.nii", "SCAN.nIi"),
    ],
)
def test_mixed_case_suffix_reads_like_the_lower_case_copy(tmp_path, rotation, rng, image_class, lower, name):
    data = rng.integers(-500, 3000, size=(7, 6, 5)).astype(np.int16)
    image = image_class(data, _affine(rotation))
    image.header.set_xyzt_units("mm")
    reference_path = tmp_path / "lower" / lower
    reference_path.parent.mkdir()
    image.to_filename(reference_path)
    path = tmp_path / "mixed" / name
    path.parent.mkdir()
    shutil.copyfile(reference_path, path)

    reference, volume = read_image(reference_path), read_image(path)

    assert volume.source == str(path)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.array, data.transpose())
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.geometry.index_to_world, reference.geometry.index_to_world)
    assert volume.metadata["nifti_affine"] == reference.metadata["nifti_affine"]
    # json writes NaN (unset scl_slope / scl_inter) as NaN, which == alone would not match
    assert json.dumps(volume.metadata["header"], sort_keys=True) == json.dumps(reference.metadata["header"], sort_keys=True)
    assert volume.metadata["format"] == "nifti"


@pytest.mark.parametrize("name", ["Bad.Nii.Gz", "bad.Nii"])
def test_mixed_case_suffix_on_a_file_that_is_not_nifti_says_so(tmp_path, name):
    path = tmp_path / name
    content = b"not a NIfTI header at all " * 40
    path.write_bytes(gzip.compress(content) if name.lower().endswith(".gz") else content)
    with pytest.raises(InputError, match="cannot be read as NIfTI") as caught:
        read_image(path)
    assert "No such file" not in str(caught.value)


@pytest.mark.parametrize("name", ["Out.Nii.Gz", "out.nIi.gz", "out.Nii.GZ", "OUT.NII.GZ", "Out.Nii", "out.nii.Gz"])
def test_mixed_case_destination_is_written_at_that_path(tmp_path, rotation, rng, name):
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    geometry = Geometry.from_ras_affine(_affine(rotation), ndim=3)
    destination = tmp_path / "out"
    destination.mkdir()

    written = write_image(ImageVolume(array, geometry), destination / name)

    assert written == destination / name
    assert os.listdir(destination) == [name]  # no second file under a case-mapped name
    with open(written, "rb") as stream:
        gzipped = stream.read(2) == _GZIP_MAGIC
    assert gzipped == name.lower().endswith(".gz")
    reread = read_image(written)
    np.testing.assert_array_equal(reread.array, array)
    np.testing.assert_allclose(reread.geometry.index_to_world, geometry.index_to_world, atol=1e-5)
    np.testing.assert_allclose(nib.load(shutil.copyfile(written, tmp_path / name.lower())).affine,
                               geometry.to_ras_affine(), atol=1e-5)


@pytest.mark.parametrize("name", ["Field.Nii.Gz", "field.Nii", "field.nii.GZ", "FIELD.NII.GZ"])
def test_mixed_case_displacement_field_round_trips(tmp_path, rotation, rng, name):
    # ITK's NIfTI library refuses a mixed-case suffix; the field is read through a lower-case name.
    geometry = Geometry.from_ras_affine(_affine(rotation), ndim=3)
    u = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    path = write_displacement(u, geometry, tmp_path / name)
    assert os.listdir(tmp_path) == [name]
    np.testing.assert_allclose(read_displacement(path, geometry), u, atol=1e-4)
    assert os.listdir(tmp_path) == [name]


def test_missing_mixed_case_displacement_field_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot be read as a displacement field"):
        read_displacement(tmp_path / "Gone.Nii.Gz")
