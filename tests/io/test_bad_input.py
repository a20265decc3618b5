"""Every kind of bad input gives an InputError naming the file and the problem."""

from __future__ import annotations

import gzip
import re
import shlex
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image

# Byte offset of srow_x in a NIfTI-1 header (nifti1.h): 3 float32 rows of 4 starting here.
_SROW_X_OFFSET = 280


def _nifti(path, array, affine=None):
    nib.Nifti1Image(array, np.eye(4) if affine is None else affine).to_filename(path)
    return path


def _truncated_nifti(tmp_path):
    whole = _nifti(tmp_path / "whole.nii.gz", np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32))
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _truncated_png(tmp_path):
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(whole)
    path = tmp_path / "truncated.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _garbage_mha(tmp_path):
    path = tmp_path / "garbage.mha"
    path.write_bytes(b"this is not a MetaImage header\n" * 4)
    return path


def _unknown_extension(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"data")
    return path


def _nan_affine(tmp_path):
    path = _nifti(tmp_path / "nan_affine.nii", np.ones((4, 4, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[_SROW_X_OFFSET : _SROW_X_OFFSET + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    return path


def _empty_folder(tmp_path):
    path = tmp_path / "no_dicom_here"
    path.mkdir()
    return path


CASES = {
    "truncated NIfTI": (_truncated_nifti, "cannot be read as NIfTI"),
    "truncated PNG": (_truncated_png, "cannot be read as an image"),
    "garbage MetaImage": (_garbage_mha, "cannot be read as an ITK image"),
    "unknown extension": (_unknown_extension, "unknown file type '.xyz'"),
    "4D without frame": (lambda p: _nifti(p / "dyn.nii.gz", np.zeros((3, 3, 3, 7), np.float32)), "7 frames"),
    "frame out of range": (lambda p: (_nifti(p / "dyn.nii.gz", np.zeros((3, 3, 3, 2), np.float32)), 5), "frames 0..1"),
    "frame on a 3D file": (lambda p: (_nifti(p / "vol.nii.gz", np.zeros((3, 3, 3), np.float32)), 0), "single volume"),
    "empty array": (lambda p: _nifti(p / "zero_size.nii.gz", np.zeros((0, 4, 4), np.float32)), "is empty"),
    "NaN-only": (lambda p: _nifti(p / "invalid.nii.gz", np.full((4, 4, 4), np.nan, np.float32)), "every voxel is NaN"),
    "non-finite affine": (_nan_affine, "non-finite"),
    "folder without DICOM": (_empty_folder, "no DICOM series"),
    "missing file": (lambda p: p / "absent.nii.gz", "not found"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_file_and_problem(case, tmp_path):
    make, problem = CASES[case]
    made = make(tmp_path)
    path, frame = made if isinstance(made, tuple) else (made, None)
    with pytest.raises(InputError) as caught:
        read_image(path, frame=frame)
    message = str(caught.value)
    assert str(path) in message and problem in message, message


def test_four_d_message_says_how_to_choose(tmp_path):
    path = _nifti(tmp_path / "dyn.nii.gz", np.zeros((3, 3, 3, 4), np.float32))
    with pytest.raises(InputError, match=r"4 frames.*frame=k\) for k in 0\.\.3"):
        read_image(path)



def test_one_value_per_voxel_with_one_voxel_fifth_axes_is_a_volume_and_a_vector_image_is_refused(tmp_path):
    """(x, y, z, 1, 1), as ITK reads it, was refused as holding "vectors or tensors per voxel"."""
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    volume = read_image(_nifti(tmp_path / "pet.nii.gz", data[..., np.newaxis, np.newaxis]))
    np.testing.assert_array_equal(volume.array, data.transpose())
    with pytest.raises(InputError, match=r"5D NIfTI \(shape \(4, 5, 6, 1, 3\)\) holds vectors"):
        read_image(_nifti(tmp_path / "field.nii.gz", np.zeros((4, 5, 6, 1, 3), np.float32)))

def test_nans_become_zero_and_infinities_are_clipped_with_a_warning(tmp_path):
    data = np.linspace(1, 2, 120, dtype=np.float32).reshape(4, 5, 6)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    data[0, 0, 1] = -np.inf
    volume = read_image(_nifti(tmp_path / "holes.nii.gz", data))
    assert np.all(np.isfinite(volume.array))
    finite = data[np.isfinite(data)]
    # nibabel's (x, y, z) comes back as (z, y, x).
    assert volume.array[3, 2, 1] == 0
    assert volume.array[0, 0, 0] == finite.max() and volume.array[1, 0, 0] == finite.min()
    (warning,) = volume.metadata["warnings"]
    assert "1 NaN voxels set to 0" in warning and "1 +inf" in warning and "1 -inf" in warning


def test_nans_outside_a_ct_field_of_view_become_air_not_water(tmp_path):
    """A CT resampled with NaN outside its field of view: 0 HU there is water, a grey disc around
    the head in the aligned and fused images; its background is air."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 32, xx - 32)
    ct = np.where(radius < 20, 40.0, -1000.0) + rng.normal(0, 10, (64, 64))  # soft tissue in air
    ct[radius > 28] = np.nan  # outside the reconstructed field
    volume = read_image(_nifti(tmp_path / "ct.nii.gz", ct[:, :, None].astype(np.float32)))  # read back as (1, x, y)
    assert np.all(volume.array[0][radius.T > 28] == -1000)
    (warning,) = volume.metadata["warnings"]
    assert f"{int(np.isnan(ct).sum())} NaN voxels set to -1000 HU (air)" in warning


def test_a_file_this_user_may_not_read_is_said_to_be_so_not_corrupt(tmp_path, monkeypatch):
    """(The tests run as root, whom chmod does not stop: the refusal is the one open() raises.)"""
    import napari_unifuse.io.readers as readers

    path = _nifti(tmp_path / "scan.nii.gz", np.zeros((4, 4, 4), np.float32))

    def refused(name):
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(readers, "load_nifti", refused)
    with pytest.raises(InputError, match=r"cannot be read: permission denied \(Permission denied\)") as error:
        read_image(path)
    assert "corrupt" not in str(error.value)


def _metaimage(path, compressed=False):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(path), useCompression=compressed)
    return path


def test_a_metaimage_without_its_data_file_names_the_missing_file(tmp_path):
    path = _metaimage(tmp_path / "scan.mhd")
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(InputError) as caught:
        read_image(path)
    assert str(caught.value) == (f"{path}: cannot be read as a MetaImage: its voxel data file 'scan.raw' (the header's "
                                 "ElementDataFile) is missing: put it in the header's folder under that name")


@pytest.mark.parametrize("suffix, holder", [(".mha", "the file"), (".mhd", "its voxel data file 'scan.raw'")])
def test_a_metaimage_cut_short_in_its_voxel_data_says_how_much_is_there(suffix, holder, tmp_path):
    path = _metaimage(tmp_path / f"scan{suffix}")
    data = path if suffix == ".mha" else tmp_path / "scan.raw"
    data.write_bytes(data.read_bytes()[:-100])  # 4 × 5 × 6 float32: 480 bytes of voxel data
    with pytest.raises(InputError, match=f"cannot be read as a MetaImage: {holder} is truncated, holding 380 of the "
                                         "480 bytes of voxel data the header describes"):
        read_image(path)


def test_a_compressed_metaimage_cut_short_says_how_much_is_there(tmp_path):
    path = _metaimage(tmp_path / "scan.mha", compressed=True)
    stated = int(re.search(rb"CompressedDataSize = (\d+)", path.read_bytes()).group(1))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match=f"the file is truncated, holding {stated - 3} of the {stated} bytes"):
        read_image(path)


def test_a_metaimage_cut_inside_its_header_says_it_is_truncated(tmp_path):
    path = _metaimage(tmp_path / "scan.mha")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="the file is truncated, ending inside its header") as caught:
        read_image(path)
    assert "Reason:" not in str(caught.value)


@pytest.mark.parametrize(("stored_as", "named", "rename"), [
    (".nii.gz", ".nii", "rename it to .nii.gz"),
    (".nii", ".nii.gz", "rename it to .nii"),
], ids=["gzipped, named .nii", "not gzipped, named .nii.gz"])
def test_a_nifti_whose_name_misstates_its_compression_is_read_by_its_content(tmp_path, stored_as, named, rename):
    """They were refused: "Cannot work out file type" and "is not a gzip file" (which SimpleITK opens)."""
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    stored = _nifti(tmp_path / f"stored{stored_as}", data, affine)
    misnamed = tmp_path / f"scan{named}"
    misnamed.write_bytes(stored.read_bytes())
    assert misnamed.read_bytes().startswith(b"\x1f\x8b") == stored_as.endswith(".gz")

    volume, expected = read_image(misnamed), read_image(stored)
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.geometry.index_to_world, expected.geometry.index_to_world)
    (warning,) = volume.metadata["warnings"]
    assert f"named {named}" in warning and rename in warning


def test_a_misnamed_file_that_holds_no_nifti_is_refused_as_not_nifti(tmp_path):
    path = tmp_path / "scan.nii"
    path.write_bytes(gzip.compress(b"not a NIfTI header" * 40))
    with pytest.raises(InputError, match="cannot be read as NIfTI .*no NIfTI header"):
        read_image(path)


@pytest.mark.parametrize("image_class", [nib.Nifti1Pair, nib.AnalyzeImage], ids=["NIfTI pair", "ANALYZE 7.5"])
@pytest.mark.parametrize("opened", [".hdr", ".img"])
def test_a_header_and_image_pair_is_refused_with_the_line_that_converts_it(tmp_path, image_class, opened):
    folder = tmp_path / "O'Brien $HOME"  # a quote and a dollar sign: the line is pasted into a shell
    folder.mkdir()
    image_class(np.zeros((4, 5, 6), np.float32), np.eye(4)).to_filename(folder / "scan.hdr")
    with pytest.raises(InputError, match="unknown file type") as caught:
        read_image(folder / f"scan{opened}")
    command = str(caught.value).split("e.g. with ", 1)[1].removeprefix("python ")
    subprocess.run(f"{shlex.quote(sys.executable)} {command}", shell=True, check=True)  # the hint works as given
    assert read_image(folder / "scan.nii").array.shape == (6, 5, 4)
