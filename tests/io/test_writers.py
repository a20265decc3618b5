"""What the writers refuse and how a failed write leaves the destination: sheared grids in NIfTI,
a full disk while replacing a file, a folder given as the file to write."""

from __future__ import annotations

import errno
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, read_image, write_image

TILT = np.deg2rad(20.0)
# A gantry-tilted CT's grid: the slice axis (array axis 0) leans along y.
SHEARED = Geometry([2.5, 0.8, 0.8], [5.0, -20.0, 10.0], np.array([[np.cos(TILT), 0, 0], [np.sin(TILT), 1, 0], [0, 0, 1]]))


def test_a_sheared_grid_is_refused_as_nifti_and_placed_exactly_by_simpleitk_as_metaimage(tmp_path, rng):
    """NIfTI's qform, which ITK-based tools read, holds no shear: SimpleITK read the far corner of a
    20° tilt millimetres off the layer's, and nothing told the user."""
    volume = ImageVolume(rng.random((6, 7, 8)).astype(np.float32), SHEARED)
    with pytest.raises(InputError, match=r"grid is sheared .* save it as \.mha"):
        write_image(volume, tmp_path / "tilted.nii.gz")
    assert list(tmp_path.iterdir()) == []

    itk = sitk.ReadImage(str(write_image(volume, tmp_path / "tilted.mha")))
    far_corner = np.array(itk.TransformIndexToPhysicalPoint((7, 6, 5)))[::-1]  # ITK (x, y, z) -> array order
    np.testing.assert_allclose(far_corner, (SHEARED.index_to_world @ [5, 6, 7, 1])[:3], atol=1e-4)


def test_a_full_disk_while_replacing_a_nifti_keeps_the_old_file_and_says_why(tmp_path, monkeypatch):
    """nibabel wrote straight over the destination: the old file was lost, a truncated one left, and
    the raw OSError shown. MetaImage already staged its write and said "No space left on device"."""
    path = tmp_path / "result.nii.gz"
    write_image(ImageVolume(np.ones((4, 5, 6), np.float32), Geometry.identity(3)), path)
    before = path.read_bytes()
    real_save = nib.save

    def disk_fills_up(image, name):
        real_save(image, name)
        with open(name, "r+b") as stream:
            stream.truncate(40)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))

    monkeypatch.setattr(nib, "save", disk_fills_up)
    with pytest.raises(InputError, match=r"result\.nii\.gz: could not write the image: No space left on device$"):
        write_image(ImageVolume(np.zeros((8, 8, 8), np.float32), Geometry.identity(3)), path)

    assert path.read_bytes() == before and read_image(path).array.shape == (4, 5, 6)
    assert list(tmp_path.iterdir()) == [path]  # no staged file left behind


@pytest.mark.parametrize("name", ["x.mha", "x.nhdr", "y.nii.gz", "z.png"])
def test_a_folder_given_as_the_file_to_write_is_refused_and_left_empty(tmp_path, name):
    """MetaImage moved its staged file into the folder (x.mha/x.mha) and reported success; NIfTI and
    PNG raised a raw IsADirectoryError."""
    folder = tmp_path / name
    folder.mkdir()
    volume = ImageVolume(np.arange(20, dtype=np.uint8).reshape(4, 5), Geometry.identity(2))
    with pytest.raises(InputError, match=f"{name}: this is a folder; give a file name to save to"):
        write_image(volume, folder)
    assert list(folder.iterdir()) == []
