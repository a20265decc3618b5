"""Folder cohorts trained as fusion reads them: world axis order whatever the file's, and every
case's voxels checked before the first step."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.errors import InputError
from napari_unifuse.training import datasets

# numpy (z, y, x) axes -> nibabel (x, y, z) axes of a file storing them axially, coronally (x, z, y).
STORAGE = {"axial": (0, 1, 2), "coronal": (0, 2, 1)}


def _save(array_zyx, spacing_xyz, path, storage):
    """``array_zyx`` (world z, y, x) saved with its axes in ``storage``'s order: the same voxels at
    the same world positions, whatever the order."""
    order = STORAGE[storage]
    affine = np.diag([*spacing_xyz, 1.0])
    data, affine = array_zyx.transpose().transpose(order), affine[:, [*order, 3]]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine), path)


def _head(shape_zyx, seed):
    """A smooth head-like blob: tissue deep enough for a metal insert, air around it."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, side) for side in shape_zyx], indexing="ij")
    head = sum(g ** 2 for g in grids) < 0.8
    return head * (0.5 + ndimage.gaussian_filter(rng.random(shape_zyx), 2))


def _twin_cohorts(root, moving_modality, spacing_xyz=(1.0, 1.0, 1.5), cases=3, shape_zyx=(20, 28, 24)):
    """One cohort stored axially and its twin stored coronally, voxel for voxel."""
    for case in range(cases):
        reference, moving = _head(shape_zyx, case) * 1000, _head(shape_zyx, case + 10)
        moving = moving * 1500 - 1000 if moving_modality == "ct" else moving * 800  # CT in HU
        for storage in STORAGE:
            _save(reference, spacing_xyz, root / storage / f"case{case}" / "ref.nii.gz", storage)
            _save(moving, spacing_xyz, root / storage / f"case{case}" / "mov.nii.gz", storage)


def _cohort(root, moving_modality, **extra):
    return {"kind": "folders", "root": str(root), "reference": "ref.nii.gz", "moving": "mov.nii.gz",
            "reference_modality": "t1", "moving_modality": moving_modality, "val_fraction": 0.34, **extra}


@pytest.mark.parametrize("moving_modality", ["t2", "ct"])
def test_a_coronal_cohort_trains_on_the_samples_of_its_axial_twin(tmp_path, moving_modality):
    _twin_cohorts(tmp_path, moving_modality)
    splits = {storage: datasets.build_datasets(_cohort(tmp_path / storage, moving_modality, crop=[12, 16, 16],
                                                       none_fraction=0.0), seed=0, spatial_dims=3)
              for storage in STORAGE}
    for split in (0, 1):
        axial, coronal = splits["axial"][split], splits["coronal"][split]
        assert axial.case_names() == coronal.case_names()
        for index in range(len(axial)):
            expected, got = axial[index], coronal[index]
            for key in expected:
                assert np.array_equal(expected[key].numpy(), got[key].numpy()), (split, index, key)


def test_a_crop_too_large_for_a_coronal_case_is_measured_along_the_world_axes(tmp_path):
    _twin_cohorts(tmp_path, "t2", shape_zyx=(12, 28, 24))   # 12 slices along world z, stored as the file's y
    _save(_head((20, 28, 24), 0), (1.0, 1.0, 1.0), tmp_path / "coronal" / "case0" / "ref.nii.gz", "coronal")
    _save(_head((20, 28, 24), 1), (1.0, 1.0, 1.0), tmp_path / "coronal" / "case0" / "mov.nii.gz", "coronal")
    # The stored shapes (x, z, y) all exceed 16 along the file's z; along world z two cases hold 12.
    with pytest.raises(InputError, match=r"case case1 is 24×28×12 \(x×y×z\) voxels in world axis order.*"
                                         r"its file lists 24×12×28.*smaller than data.crop \[16, 16, 16\] "
                                         r"\(z, y, x\).*at most \[12, 28, 24\] \(z, y, x\)"):
        datasets.build_datasets(_cohort(tmp_path / "coronal", "t2", crop=16), seed=0, spatial_dims=3)
    # World z is what the crop runs along: 12 fits.
    train, _ = datasets.build_datasets(_cohort(tmp_path / "coronal", "t2", crop=[12, 16, 16]), seed=0,
                                       spatial_dims=3)
    assert train[0]["moving"].shape == (1, 12, 16, 16)


def test_a_sample_that_fails_mid_run_names_its_case(tmp_path):
    # Axial pixels of 1 × 2 mm, which the CT simulation cannot scan, stand for what no start-up check
    # foresees: the cases are handed to the dataset unchecked (build_datasets refuses these).
    _twin_cohorts(tmp_path, "ct", spacing_xyz=(1.0, 2.0, 1.0))
    section = _cohort(tmp_path / "axial", "ct")
    layout = datasets.folder_layout(section)
    train = datasets.FolderPairs(datasets.folder_cases(section["root"], layout), layout, seed=0,
                                 stream=datasets.TRAIN_STREAM, none_fraction=0.0, crop=(12, 12, 12))
    with pytest.raises(InputError, match=rf"case {train.case_names()[0]}: .*square in-plane pixels"):
        train[0]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _all_nan(path):
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.full(image.shape, np.nan, np.float32), image.affine), path)


def _blank(path):
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), path)


def _not_gzip(path):
    path.write_bytes(gzip.compress(b"not a NIfTI header")[:10])


@pytest.mark.parametrize(("spoil", "problem"), [(_truncate, "cannot be read"), (_all_nan, "every voxel is NaN"),
                                                 (_not_gzip, "cannot be read"),
                                                 (_blank, "the image holds one value everywhere")])
def test_a_case_whose_voxels_cannot_train_is_named_before_the_first_step(tmp_path, spoil, problem):
    _twin_cohorts(tmp_path, "t2", cases=4)
    spoil(tmp_path / "axial" / "case2" / "mov.nii.gz")
    with pytest.raises(InputError, match=rf"case2/mov.nii.gz: case case2: {problem}"):
        datasets.build_datasets(_cohort(tmp_path / "axial", "t2", crop=12), seed=0, spatial_dims=3)


def test_case_folders_holding_dicom_series_folders_are_cases(tmp_path):
    """A layout naming each case's series folders (t1/, t2/) found no case: only files counted."""
    for case in ("a", "b"):
        for series in ("t1", "t2"):
            (tmp_path / case / series).mkdir(parents=True)
            (tmp_path / case / series / "IM0001").write_bytes(b"")
    cases = datasets.folder_cases(tmp_path, {"reference": "t1", "moving": "t2"})
    assert [(name, reference.name, moving.name) for name, reference, moving in cases] == [
        ("a", "t1", "t2"), ("b", "t1", "t2")]
