"""What the start-up checks of training find before the first step: pixels the CT simulation cannot
scan, what the readers noted about a case, and blank Harvard images."""

from __future__ import annotations

import gzip
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest
from skimage.io import imsave

from napari_unifuse.errors import InputError
from napari_unifuse.io import read_image
from napari_unifuse.training import datasets

from .test_folder_cases import _cohort, _twin_cohorts
from .test_harvard import write_fake_harvard


def _give_pixels(case_folder, spacing_xyz):
    for name in ("ref.nii.gz", "mov.nii.gz"):
        image = nib.load(case_folder / name)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([*spacing_xyz, 1.0])), case_folder / name)


def test_a_ct_case_of_rectangular_pixels_is_refused_before_the_first_step(tmp_path):
    """It passed the checks and stopped the run at its first metal draw, epochs in, with no checkpoint."""
    _twin_cohorts(tmp_path, "ct", cases=4)
    _give_pixels(tmp_path / "axial" / "case2", (1.0, 1.4, 1.5))
    with pytest.raises(InputError, match=r"case2/ref.nii.gz: case case2: its in-plane pixels are 1×1.4 mm \(x×y\).*"
                                         r"square.*resample"):
        datasets.build_datasets(_cohort(tmp_path / "axial", "ct", crop=12), seed=0, spatial_dims=3)


@pytest.mark.parametrize(("moving_modality", "none_fraction"), [("ct", 1.0), ("t2", 0.2)])
def test_rectangular_pixels_train_where_no_metal_is_drawn(tmp_path, moving_modality, none_fraction):
    _twin_cohorts(tmp_path, moving_modality, cases=4, spacing_xyz=(1.0, 1.4, 1.5))
    train, _ = datasets.build_datasets(_cohort(tmp_path / "axial", moving_modality, crop=12,
                                               none_fraction=none_fraction), seed=0, spatial_dims=3)
    assert train[0]["moving"].shape == (1, 12, 12, 12)


def _spoil_with_nan(path):
    image = nib.load(path)
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[4:6, 4:6, 4:6] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine), path)


def test_what_the_readers_noted_about_a_case_is_said_once_naming_it(tmp_path):
    """A moving image with NaN voxels (filled with air, as fuse warns) trained without a word."""
    _twin_cohorts(tmp_path, "ct", cases=4)
    _spoil_with_nan(tmp_path / "axial" / "case1" / "mov.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, validation = datasets.build_datasets(_cohort(tmp_path / "axial", "ct", crop=12), seed=0,
                                                    spatial_dims=3)
        for split in (train, validation):
            for index in range(len(split)):
                split[index]
    noted = [str(warning.message) for warning in caught if "NaN" in str(warning.message)]
    assert len(noted) == 1
    assert "case case1: mov.nii.gz: non-finite values: 8 NaN voxels set to -1000 HU (air)" in noted[0]


def test_only_the_first_process_says_what_the_readers_noted(tmp_path, monkeypatch):
    """Under torchrun every process builds the datasets: one line per case, not one per process."""
    _twin_cohorts(tmp_path, "ct", cases=4)
    _spoil_with_nan(tmp_path / "axial" / "case1" / "mov.nii.gz")
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets.build_datasets(_cohort(tmp_path / "axial", "ct", crop=12), seed=0, spatial_dims=3)
    assert not [warning for warning in caught if "NaN" in str(warning.message)]


@pytest.mark.parametrize(("folder", "pixel"), [("CT", 0), ("MRI", 0), ("MRI", 255), ("PET", (200, 30, 0))])
def test_a_blank_harvard_image_is_refused_naming_its_pair(tmp_path, folder, pixel):
    """The folders kind refused a blank image; the Harvard kind trained on it without a word."""
    root = write_fake_harvard(tmp_path, size=16)
    task = "PET-MRI" if folder == "PET" or pixel == 255 else "CT-MRI"
    pair_id = "25015" if task == "PET-MRI" else "2004"
    shape = (16, 16, 3) if folder == "PET" else (16, 16)
    imsave(root / task / folder / f"{pair_id}.png", np.broadcast_to(np.array(pixel, np.uint8), shape).copy(),
           check_contrast=False)
    with pytest.raises(InputError, match=rf"{task} pair {pair_id}: the {folder} image holds one (value|colour) everywhere "
                                         r".*remove the pair"):
        datasets.build_datasets({"kind": "harvard", "root": str(root), "tasks": [task]}, seed=0, spatial_dims=2)


def test_a_harvard_size_that_makes_ct_pixels_rectangular_is_refused_before_the_first_step(tmp_path):
    """data.size of another aspect ratio than the pairs' stopped the run at its first metal draw."""
    root = write_fake_harvard(tmp_path, size=16)
    section = {"kind": "harvard", "root": str(root), "size": [16, 8], "val_fraction": 0.3}
    with pytest.raises(InputError, match=r"data.size \[16, 8\] \(y, x\) resizes CT-MRI pair 2004, 16×16 \(x×y\) "
                                         r"pixels of 1 mm, to pixels of 2×1 mm \(x×y\), and .*square"):
        datasets.build_datasets({**section, "tasks": ["CT-MRI", "PET-MRI"]}, seed=0, spatial_dims=2)
    # Low dose and clean pairs take any pixels.
    for where_no_metal in ({"tasks": ["PET-MRI"]}, {"none_fraction": 1.0}):
        train, _ = datasets.build_datasets({**section, **where_no_metal}, seed=0, spatial_dims=2)
        assert train[0]["moving"].shape == (1, 16, 8)


def _store_a_negative_pixdim(path):
    """pixdim[1] stored negative, as some converters write it: nibabel (read_image) takes its size,
    SimpleITK a negative spacing (and, passing over the sform, the qform mirrored)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 80, -struct.unpack_from("<f", raw, 80)[0])
    path.write_bytes(gzip.compress(bytes(raw)))


def _with_disagreeing_forms(path):
    """The sform shifted 40 mm from the qform and scaled otherwise than pixdim: read_image places the
    image by the sform, SimpleITK by the qform."""
    image = nib.load(path)
    sform = image.affine.copy()
    sform[:3, :3] *= 1.1
    sform[:3, 3] += [40.0, 0.0, 0.0]
    saved = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    saved.set_sform(sform, 1)
    nib.save(saved, path)


@pytest.mark.parametrize("change", [_store_a_negative_pixdim, _with_disagreeing_forms])
def test_the_start_up_checks_place_a_nifti_case_as_fusion_reads_it(tmp_path, change):
    """They took SimpleITK's reading of the header, which refused a negative pixdim ("voxel spacing
    must be positive") that unifuse fuse reads, and placed disagreeing forms otherwise than fuse."""
    _twin_cohorts(tmp_path, "t2", cases=3)
    for case in range(3):
        for name in ("ref.nii.gz", "mov.nii.gz"):
            change(tmp_path / "axial" / f"case{case}" / name)
    path = tmp_path / "axial" / "case0" / "mov.nii.gz"
    header, whole = datasets._image_header(path), read_image(path)
    assert header.spatial_shape == whole.spatial_shape
    np.testing.assert_allclose(header.geometry.index_to_world, whole.geometry.index_to_world, atol=1e-4)
    train, _ = datasets.build_datasets(_cohort(tmp_path / "axial", "t2", crop=12), seed=0, spatial_dims=3)
    assert train[0]["moving"].shape == (1, 12, 12, 12)
