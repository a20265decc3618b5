"""Training datasets: sample layout, seeding by (epoch, index), colour handling, folder layouts."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.errors import InputError
from napari_unifuse.model.warp import warp
from napari_unifuse.training import datasets, harvard

from .test_harvard import write_fake_harvard

SAMPLE_KEYS = {"reference", "moving", "label", "displacement", "class_index", "reference_misaligned", "moving_clean"}


def _phantoms(stream=datasets.TRAIN_STREAM, spatial_dims=2, crop=(32, 32), none_fraction=0.25):
    return datasets.PhantomPairs(
        seed=3, stream=stream, none_fraction=none_fraction, length=6, spatial_dims=spatial_dims,
        shapes=[(24, 48, 48)], crop=crop,
    )


def test_phantom_sample_layout():
    sample = _phantoms()[0]
    assert set(sample) == SAMPLE_KEYS
    for key in ("reference", "moving", "label", "reference_misaligned", "moving_clean"):
        assert sample[key].shape == (1, 32, 32) and sample[key].dtype == torch.float32
    assert sample["displacement"].shape == (2, 32, 32)
    assert sample["class_index"].dtype == torch.int64
    assert 0 <= int(sample["class_index"]) < len(DEGRADATION_CLASSES)


def test_samples_are_reproducible_per_epoch_and_index():
    first, again = _phantoms(), _phantoms()
    for key in SAMPLE_KEYS:
        assert torch.equal(first[2][key], again[2][key])
    assert not torch.equal(first[2]["displacement"], first[3]["displacement"])
    again.set_epoch(1)
    assert not torch.equal(first[2]["displacement"], again[2]["displacement"])


def test_validation_samples_do_not_change_with_the_epoch():
    validation = _phantoms(stream=datasets.VALIDATION_STREAM)
    before = validation[1]["moving"]
    validation.set_epoch(4)
    assert torch.equal(before, validation[1]["moving"])


def test_none_fraction_one_gives_clean_inputs():
    sample = _phantoms(none_fraction=1.0)[0]
    assert DEGRADATION_CLASSES[int(sample["class_index"])] == "none"


def test_clean_moving_image_is_the_label_misaligned_like_the_input():
    """moving_clean is I_fine of Eq. 11-12: the true field brings it onto the label, and for a clean
    sample it is the input itself."""
    sample = datasets.PhantomPairs(seed=3, stream=datasets.TRAIN_STREAM, none_fraction=1.0, length=2,
                                   spatial_dims=2, shapes=[(24, 64, 64)], crop=(48, 48),
                                   misalignment={"regime": "mild"})[0]
    assert sample["displacement"].abs().max() > 1.0
    torch.testing.assert_close(sample["moving_clean"], sample["moving"], atol=0.02, rtol=0)
    realigned = warp(sample["moving_clean"][None], sample["displacement"][None], padding_mode="border")[0]
    error = (_interior(realigned, 8) - _interior(sample["label"], 8)).abs().mean()
    unaligned = (_interior(sample["moving_clean"], 8) - _interior(sample["label"], 8)).abs().mean()
    assert error < 0.25 * unaligned


def test_none_regime_leaves_the_pair_aligned():
    sample = datasets.PhantomPairs(seed=3, stream=datasets.TRAIN_STREAM, none_fraction=1.0, length=2,
                                   spatial_dims=2, shapes=[(24, 48, 48)], crop=(32, 32),
                                   misalignment={"regime": "none"})[1]
    assert not sample["displacement"].any()
    torch.testing.assert_close(sample["moving"], sample["label"], atol=1e-5, rtol=0)


def test_phantom_3d_crops():
    sample = _phantoms(spatial_dims=3, crop=(16, 24, 24))[1]
    assert sample["moving"].shape == (1, 16, 24, 24)
    assert sample["displacement"].shape == (3, 16, 24, 24)


def test_whole_image_degradations_degrade_before_the_crop(monkeypatch):
    """Motion is synthesised on the whole phantom and then cropped; metal, not listed, on the crop."""
    from napari_unifuse.data import pairs

    degraded_shapes = []

    def recording(label, task, rng, severity=0.5):
        degraded_shapes.append((pairs.resolve_task(task)[0], label.spatial_shape))
        return degrade_label(label, task, rng, severity)

    degrade_label = pairs.degrade_label
    monkeypatch.setattr(pairs, "degrade_label", recording)
    train, _ = datasets.build_datasets(
        {"kind": "phantom", "shape": [32, 40, 40], "crop": 16, "tasks": ["t1-t2", "mr-ct"], "train_length": 8,
         "none_fraction": 0.0, "whole_image_degradations": ["motion"], "misalignment": {"regime": "none"}},
        seed=0, spatial_dims=3)
    for index in range(len(train)):
        assert train[index]["moving"].shape == (1, 16, 16, 16)
    assert {shape for task, shape in degraded_shapes if task == "motion"} == {(32, 40, 40)}
    assert {shape for task, shape in degraded_shapes if task == "metal"} == {(16, 16, 16)}
    with pytest.raises(InputError, match="unknown degradations"):
        datasets.build_datasets({"kind": "phantom", "whole_image_degradations": ["blur"]}, seed=0, spatial_dims=3)


def _interior(tensor, margin):
    return tensor[..., margin:-margin, margin:-margin]


def test_harvard_colour_samples_carry_misaligned_chroma(tmp_path):
    # Smooth fake images so that interpolation error is small and the check is about geometry.
    root = write_fake_harvard(tmp_path, size=64)
    for path in root.rglob("*.png"):
        from skimage.io import imread, imsave

        image = imread(path).astype(float)
        sigma = (3, 3, 0) if image.ndim == 3 else 3
        imsave(path, np.clip(ndimage.gaussian_filter(image, sigma) * 3 - 250, 0, 255).astype(np.uint8),
               check_contrast=False)
    pairs = harvard.index_harvard(root)
    dataset = datasets.HarvardPairs(pairs, seed=0, stream=0, none_fraction=0.0)
    pet_index = next(i for i, p in enumerate(pairs) if p.task == "PET-MRI")
    sample = dataset[pet_index]
    assert sample["is_color"] == 1.0 and sample["cbcr"].shape == (2, 64, 64)
    # The chroma moved with the image: warping it back by the true displacement restores it.
    realigned = warp(sample["cbcr"][None], sample["displacement"][None], padding_mode="border")[0]
    aligned_error = (_interior(realigned, 8) - _interior(sample["label_cbcr"], 8)).abs().mean()
    misaligned_error = (_interior(sample["cbcr"], 8) - _interior(sample["label_cbcr"], 8)).abs().mean()
    assert aligned_error < 0.3 * misaligned_error

    ct_index = next(i for i, p in enumerate(pairs) if p.task == "CT-MRI")
    grey = dataset[ct_index]
    assert grey["is_color"] == 0.0
    assert torch.all(grey["cbcr"] == 0.5) and torch.all(grey["label_cbcr"] == 0.5)
    assert DEGRADATION_CLASSES[int(grey["class_index"])] == "metal"


def _write_case(folder, names, shape=(16, 24, 24), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, scale in names:
        volume = ndimage.gaussian_filter(rng.random(shape), 2) * scale
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), folder / name)


def test_folder_layouts_find_cases_and_split_them(tmp_path):
    for case in ("BraTS_001", "BraTS_002", "BraTS_003"):
        _write_case(tmp_path / case, [(f"{case}_t1.nii.gz", 1000.0), (f"{case}_t2.nii.gz", 800.0)])
    (tmp_path / "no_pair").mkdir()
    with pytest.warns(UserWarning, match=r"1 of 4 sub-folders are skipped: 1 holds neither \(no_pair\)"):
        train, validation = datasets.build_datasets(
            {"kind": "folders", "root": str(tmp_path), "layout": "brats", "crop": [8, 16, 16], "val_fraction": 0.34},
            seed=0, spatial_dims=3,
        )
    assert len(train) == 2 and len(validation) == 1
    assert {c[0] for c in train.cases}.isdisjoint({c[0] for c in validation.cases})
    sample = train[0]
    assert sample["moving"].shape == (1, 8, 16, 16)
    assert 0.0 <= float(sample["reference"].min()) and float(sample["reference"].max()) <= 1.0


def test_folder_layout_without_matching_files_is_named(tmp_path):
    _write_case(tmp_path / "case1", [("mr.nii.gz", 1.0)])
    with pytest.raises(InputError, match="ct.nii.gz"):
        datasets.build_datasets({"kind": "folders", "root": str(tmp_path), "layout": "synthrad"}, seed=0, spatial_dims=3)


def test_unknown_data_kind_is_named():
    with pytest.raises(InputError, match="kind"):
        datasets.build_datasets({"kind": "imagenet"}, seed=0, spatial_dims=2)


def test_crops_are_centred_on_anatomy_and_stay_inside_the_image():
    image = np.zeros((100, 100), np.float32)
    image[70:80, 10:20] = 1.0  # the only anatomy: a small block near a corner
    label = np.arange(image.size, dtype=np.float32).reshape(image.shape)
    for seed in range(20):
        reference_crop, label_crop = datasets.random_crop([image, label], (32, 32), np.random.default_rng(seed))
        assert reference_crop.shape == (32, 32) and reference_crop.max() == 1.0
        # Both arrays share the window: the label's values locate it.
        top, left = divmod(int(label_crop[0, 0]), 100)
        np.testing.assert_array_equal(reference_crop, image[top:top + 32, left:left + 32])
    empty = datasets.random_crop([np.zeros((40, 40), np.float32)], (16, 16), np.random.default_rng(0))[0]
    assert empty.shape == (16, 16)  # no anatomy: a uniform window


def test_several_phantom_sizes_give_crops_of_the_head_at_several_voxel_sizes():
    train, _ = datasets.build_datasets(
        {"kind": "phantom", "shapes": [[24, 32, 32], [48, 64, 64]], "crop": 16, "tasks": ["t1-t2"],
         "train_length": 12, "misalignment": {"regime": "none"}}, seed=0, spatial_dims=3)
    spacings = {train.clean_pair(index, datasets.sample_rng(0, datasets.TRAIN_STREAM, 0, index)).spacing
                for index in range(12)}
    assert len(spacings) == 2  # both sizes drawn, each at its own voxel size
    assert train[0]["reference"].shape == (1, 16, 16, 16)
    with pytest.raises(InputError, match="not both"):
        datasets.build_datasets({"kind": "phantom", "shape": [24, 32, 32], "shapes": [[24, 32, 32]]},
                                seed=0, spatial_dims=3)


def test_shape_weights_set_how_often_each_size_is_drawn():
    section = {"kind": "phantom", "shapes": [[24, 32, 32], [48, 64, 64]], "crop": 16, "tasks": ["t1-t2"],
               "train_length": 200, "misalignment": {"regime": "none"}}

    def large_share(weights):
        train, _ = datasets.build_datasets({**section, "shape_weights": weights}, seed=0, spatial_dims=3)
        train._volumes = {shape: {name: (np.zeros(shape, np.float32), (1.0, 1.0, 1.0), {}) for name in ("t1", "t2")}
                          for shape in train.shapes}  # the draw alone: no phantom needs building
        drawn = [train.clean_pair(index, datasets.sample_rng(0, datasets.TRAIN_STREAM, 0, index)).reference.shape
                 for index in range(200)]
        return sum(shape == (48, 64, 64) for shape in drawn) / len(drawn)

    assert large_share([0, 1]) == 1.0
    assert 0.65 < large_share([1, 3]) < 0.85
    for weights in ([1], [1, -1], [0, 0]):
        with pytest.raises(InputError, match="shape_weights"):
            datasets.build_datasets({**section, "shape_weights": weights}, seed=0, spatial_dims=3)


def test_extra_sources_append_their_samples_and_share_a_batch(tmp_path):
    root = write_fake_harvard(tmp_path, size=32)
    data = {"kind": "harvard", "root": str(root), "val_fraction": 0.5, "none_fraction": 1.0, "crop": 32,
            "extra_sources": [{"kind": "phantom", "shapes": [[24, 48, 48]], "tasks": ["mr-ct"],
                               "train_length": 3, "val_length": 2},
                              {"kind": "phantom", "shapes": [[24, 48, 48]], "tasks": ["mr-ct"],
                               "train_length": 2, "val_length": 2, "none_fraction": 0.0}]}
    train, val = datasets.build_datasets(data, seed=0, spatial_dims=2)
    atlas_train, atlas_val = datasets.build_datasets({k: v for k, v in data.items() if k != "extra_sources"},
                                                     seed=0, spatial_dims=2)
    assert len(train) == len(atlas_train) + 5 and len(val) == len(atlas_val) + 4
    # The first extra source inherits none_fraction 1.0 and the crop; the second sets its own.
    first = [train[len(atlas_train) + i] for i in range(3)]
    second = [train[len(atlas_train) + 3 + i] for i in range(2)]
    assert all(DEGRADATION_CLASSES[int(s["class_index"])] == "none" for s in first)
    assert all(DEGRADATION_CLASSES[int(s["class_index"])] == "metal" for s in second)
    assert all(s["moving"].shape == (1, 32, 32) for s in first + second)
    # Grey phantom slices get neutral chroma, so that a batch can hold atlas and phantom samples.
    assert all(s["is_color"] == 0.0 and torch.all(s["cbcr"] == 0.5) for s in first)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=len(train))))
    assert batch["cbcr"].shape == (len(train), 2, 32, 32)
    # The atlas samples are those of the atlas alone; set_epoch reaches every source.
    assert torch.equal(train[0]["moving"], atlas_train[0]["moving"])
    before = train[len(train) - 1]["moving"].clone()
    train.set_epoch(1)
    assert not torch.equal(train[len(train) - 1]["moving"], before)


def test_an_extra_source_cannot_list_its_own():
    data = {"kind": "phantom", "extra_sources": [{"kind": "phantom", "extra_sources": []}]}
    with pytest.raises(InputError, match="extra sources of its own"):
        datasets.build_datasets(data, seed=0, spatial_dims=2)
    with pytest.raises(InputError, match="list of data sections"):
        datasets.build_datasets({"kind": "phantom", "extra_sources": {"kind": "phantom"}}, seed=0, spatial_dims=2)


def test_a_narrowed_validation_split_has_one_task_one_regime_and_more_of_the_same_stream():
    data = {"kind": "phantom", "shapes": [[24, 48, 48]], "crop": 32, "tasks": ["t1-t2", "mr-ct"], "val_length": 2,
            "none_fraction": 0.0, "misalignment": {"regimes": {"large": 0.5, "mild": 0.5}}}
    short = datasets.narrowed_validation(data, seed=3, spatial_dims=2, task="mr-ct", regime="none", length=1)
    longer = datasets.narrowed_validation(data, seed=3, spatial_dims=2, task="mr-ct", regime="none", length=5)
    assert len(short) == 2 and len(longer) == 5
    for index in range(2):
        assert torch.equal(short[index]["moving"], longer[index]["moving"])
    for index in range(5):
        sample = longer[index]
        assert not sample["displacement"].any()
        assert DEGRADATION_CLASSES[int(sample["class_index"])] == "metal"   # MRI -> CT's degradation
    assert data["tasks"] == ["t1-t2", "mr-ct"] and "regimes" in data["misalignment"]   # the config is untouched


def _write_2d_case(folder, reference, moving):
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    for name, array in (("mr.nii.gz", reference), ("ct.nii.gz", moving)):
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(folder / name))


def _thin_tissue_ct(shape=(96, 96), deep_disc=False):
    """Air with 2-pixel tissue strips, too thin for a metal insert; optionally a deep disc in one corner."""
    tissue = np.zeros(shape, bool)
    tissue[:, 60::20] = tissue[:, 61::20] = True
    tissue[60::20] = tissue[61::20] = True
    if deep_disc:
        y, x = np.ogrid[: shape[0], : shape[1]]
        tissue |= (y - 24) ** 2 + (x - 24) ** 2 <= 18**2
    return tissue * 500.0 + 1.0, np.where(tissue, 40.0, -1000.0)


def _metal_crops(tmp_path, deep_disc):
    reference, ct = _thin_tissue_ct(deep_disc=deep_disc)
    for case in ("a", "b", "c"):
        _write_2d_case(tmp_path / case, reference, ct)
    train, _ = datasets.build_datasets(
        {"kind": "folders", "root": str(tmp_path), "layout": "synthrad", "crop": 32, "none_fraction": 0.0,
         "severity": [0.75, 0.75], "val_fraction": 0.34}, seed=0, spatial_dims=2)
    return train


def test_a_crop_without_room_for_metal_is_redrawn_and_still_holds_metal(tmp_path):
    train = _metal_crops(tmp_path, deep_disc=True)
    for epoch in range(4):
        train.set_epoch(epoch)
        for index in range(len(train)):
            sample = train[index]
            # Metal saturates the CT window (1.0) far above the 40 HU tissue (0.35).
            assert DEGRADATION_CLASSES[int(sample["class_index"])] == "metal"
            assert float(sample["moving"].max()) > 0.9


def test_a_ct_with_no_room_for_metal_anywhere_trains_as_none_with_a_warning(tmp_path):
    train = _metal_crops(tmp_path, deep_disc=False)
    with pytest.warns(UserWarning, match="1 sample.*no tissue deep enough for a metal insert"):
        sample = train[0]
    assert DEGRADATION_CLASSES[int(sample["class_index"])] == "none"
    assert float(sample["moving"].max()) < 0.5  # no metal in a sample labelled none


def test_a_redraw_leaves_the_samples_that_needed_none_as_they_were():
    assert np.array_equal(datasets.sample_rng(3, 0, 2, 7).random(4), np.random.default_rng([3, 0, 2, 7]).random(4))
    assert not np.array_equal(datasets.sample_rng(3, 0, 2, 7, 1).random(4), datasets.sample_rng(3, 0, 2, 7).random(4))


def _noise_cases(root, count=3, names=("mr.nii.gz", "ct.nii.gz")):
    rng = np.random.default_rng(0)
    for case in range(count):
        _write_2d_case(root / f"case{case}", rng.random((32, 32)) * 1000, rng.random((32, 32)) * 1000)
        if names != ("mr.nii.gz", "ct.nii.gz"):
            for old, new in zip(("mr.nii.gz", "ct.nii.gz"), names):
                (root / f"case{case}" / old).rename(root / f"case{case}" / new)


def _own_layout(root, moving_modality, **extra):
    return {"kind": "folders", "root": str(root), "reference": "mr.nii.gz", "moving": "ct.nii.gz",
            "reference_modality": "mr", "moving_modality": moving_modality, "crop": 16, **extra}


@pytest.mark.parametrize(("modality", "degradation"), [("CT", "metal"), ("PT", "lowdose"), ("nm", "lowdose"),
                                                       ("flair", "motion"), ("T1", "motion")])
def test_moving_modalities_are_case_folded_and_aliased_like_io(tmp_path, modality, degradation):
    _noise_cases(tmp_path)
    train, _ = datasets.build_datasets(_own_layout(tmp_path, modality), seed=0, spatial_dims=2)
    assert train.clean_pair(0, np.random.default_rng(0)).degradation == degradation


def test_a_moving_modality_that_picks_no_degradation_is_refused_unless_nothing_is_degraded(tmp_path):
    _noise_cases(tmp_path)
    with pytest.raises(InputError, match="moving_modality 'auto' picks no degradation.*none_fraction: 1"):
        datasets.build_datasets(_own_layout(tmp_path, "auto"), seed=0, spatial_dims=2)
    with pytest.raises(InputError, match="unknown moving_modality 'xray'"):
        datasets.build_datasets(_own_layout(tmp_path, "xray"), seed=0, spatial_dims=2)
    train, _ = datasets.build_datasets(_own_layout(tmp_path, "auto", none_fraction=1.0), seed=0, spatial_dims=2)
    assert train.clean_pair(0, np.random.default_rng(0)).degradation == "none"


def test_a_severity_that_moves_nothing_is_refused_where_motion_is_trained_and_only_there(tmp_path):
    """Motion at severity 0 moves nothing: a sample labelled motion would be clean."""
    _noise_cases(tmp_path)
    frozen = {"severity": [0.0, 0.0]}
    with pytest.raises(InputError, match=r"severity \[0.0, 0.0\] draws no movement for motion"):
        datasets.build_datasets(_own_layout(tmp_path, "t2", **frozen), seed=0, spatial_dims=2)
    with pytest.raises(InputError, match="draws no movement for motion"):
        datasets.PhantomPairs(seed=3, stream=datasets.TRAIN_STREAM, none_fraction=0.2, length=2, spatial_dims=2,
                              shapes=[(24, 48, 48)], tasks=("mr-ct", "t1-t2"), severity=(0.0, 0.0))
    # Metal and low dose at 0 are their mildest versions, and a clean-only run degrades nothing.
    datasets.build_datasets(_own_layout(tmp_path, "ct", **frozen), seed=0, spatial_dims=2)
    datasets.build_datasets(_own_layout(tmp_path, "t2", none_fraction=1.0, **frozen), seed=0, spatial_dims=2)
    datasets.PhantomPairs(seed=3, stream=datasets.TRAIN_STREAM, none_fraction=0.2, length=2, spatial_dims=2,
                          shapes=[(24, 48, 48)], tasks=("mr-ct", "ct-pet"), severity=(0.0, 0.0))


def test_a_layout_with_its_own_keys_beside_it_is_refused(tmp_path):
    _noise_cases(tmp_path)
    data = {"kind": "folders", "root": str(tmp_path), "layout": "synthrad", "moving": "pet.nii.gz",
            "moving_modality": "pet"}
    with pytest.raises(InputError, match="layout 'synthrad' sets .*your own moving, moving_modality, not both"):
        datasets.build_datasets(data, seed=0, spatial_dims=2)


def test_case_folders_lacking_a_file_are_counted_and_named(tmp_path):
    _noise_cases(tmp_path / "ok", count=3)
    _noise_cases(tmp_path / "slip", count=2, names=("mr.nii.gz", "CT.nii.gz"))
    for folder in (tmp_path / "slip").iterdir():
        folder.rename(tmp_path / "ok" / f"slip_{folder.name}")
    with pytest.warns(UserWarning, match=r"2 of 5 sub-folders are skipped: 2 hold only one of mr.nii.gz and ct.nii.gz \(slip_case0, slip_case1\)"):
        train, validation = datasets.build_datasets({"kind": "folders", "root": str(tmp_path / "ok"),
                                                     "layout": "synthrad"}, seed=0, spatial_dims=2)
    assert len(train) + len(validation) == 3


def test_a_model_of_other_dimensions_than_the_images_is_named_at_build(tmp_path):
    _noise_cases(tmp_path)
    with pytest.raises(InputError, match="model.spatial_dims is 3 but the images are 2D"):
        datasets.build_datasets({"kind": "folders", "root": str(tmp_path), "layout": "synthrad"}, seed=0,
                                spatial_dims=3)


def _write_nifti_case(folder, shape_xyz, affine=None, moving_affine=None, names=("ref.nii.gz", "mov.nii.gz")):
    """A case of two NIfTIs of nibabel shape ``shape_xyz`` (x first): a bright disc in a dark field."""
    folder.mkdir(parents=True)
    grids = np.meshgrid(*[np.linspace(-1, 1, side) for side in shape_xyz], indexing="ij")
    disc = (sum(g ** 2 for g in grids[:2]) < 0.5).astype(np.float32)
    for name, volume, placed in ((names[0], disc * 600, affine), (names[1], disc * 400 + 50, moving_affine)):
        nib.save(nib.Nifti1Image(volume, np.eye(4) if placed is None else placed), folder / name)


def _own_nifti_folders(root, **extra):
    return {"kind": "folders", "root": str(root), "reference": "ref.nii.gz", "moving": "mov.nii.gz",
            "reference_modality": "t1", "moving_modality": "t2", **extra}


@pytest.mark.parametrize("cases", [1, 3])
def test_an_empty_validation_split_is_refused_in_one_line_saying_why(tmp_path, cases):
    for case in range(cases):
        _write_nifti_case(tmp_path / f"case{case}", (24, 24, 24))
    val_fraction = 0.15 if cases == 1 else 0.0
    remedy = "add cases: training needs at least 2" if cases == 1 else "set data.val_fraction above 0"
    with pytest.raises(InputError, match=rf"validation split is empty \({cases} cases?, val_fraction "
                                         rf"{val_fraction:g}\).*{remedy}"):
        datasets.build_datasets(_own_nifti_folders(tmp_path, crop=16, val_fraction=val_fraction), seed=0,
                                spatial_dims=3)


def test_cases_of_different_sizes_without_a_crop_are_refused_naming_two_and_suggesting_a_crop(tmp_path):
    _write_nifti_case(tmp_path / "big", (32, 32, 24))
    _write_nifti_case(tmp_path / "small", (28, 32, 24))
    with pytest.raises(InputError, match=r"cases differ in size \(big is 32×32×24 \(x×y×z\), small 28×32×24 "
                                         r"\(x×y×z\)\).*set data.crop.*at most \[24, 32, 28\] \(z, y, x\)"):
        datasets.build_datasets(_own_nifti_folders(tmp_path), seed=0, spatial_dims=3)


def test_a_case_smaller_than_the_crop_is_named_up_front_in_the_files_axis_order(tmp_path):
    for case in ("a", "b", "c"):
        _write_nifti_case(tmp_path / case, (32, 32, 32))
    _write_nifti_case(tmp_path / "thin", (32, 30, 20))   # z is the short side: 20 < 24
    with pytest.raises(InputError, match=r"thin/ref.nii.gz: case thin is 32×30×20 \(x×y×z\) voxels.*nibabel.*"
                                         r"smaller than data.crop \[24, 24, 24\] \(z, y, x\)"
                                         r".*at most \[20, 30, 32\] \(z, y, x\)") as refused:
        datasets.build_datasets(_own_nifti_folders(tmp_path, crop=24), seed=0, spatial_dims=3)
    assert "\n" not in str(refused.value)


def test_one_slice_volumes_train_as_2d_images_like_fuse_reads_them(tmp_path):
    for case in ("a", "b", "c"):
        _write_nifti_case(tmp_path / case, (48, 40, 1))
    train, validation = datasets.build_datasets(_own_nifti_folders(tmp_path, crop=16), seed=0, spatial_dims=2)
    assert train[0]["moving"].shape == (1, 16, 16) and train[0]["displacement"].shape == (2, 16, 16)
    assert validation[0]["reference"].shape == (1, 16, 16)
    whole, _ = datasets.build_datasets(_own_nifti_folders(tmp_path), seed=0, spatial_dims=2)
    assert whole.clean_pair(0, np.random.default_rng(0)).reference.shape == (40, 48)   # (y, x) of the slice
    with pytest.raises(InputError, match="spatial_dims is 3 but the images are 2D \\(a one-slice volume"):
        datasets.build_datasets(_own_nifti_folders(tmp_path, crop=16), seed=0, spatial_dims=3)


def test_a_2d_case_among_3d_ones_is_named_before_training(tmp_path, monkeypatch):
    for case in ("a3d", "b3d", "c3d"):
        _write_nifti_case(tmp_path / case, (24, 24, 24))
    _write_nifti_case(tmp_path / "z2d", (48, 48))
    read = []
    monkeypatch.setattr("napari_unifuse.io.read_image", lambda path, frame=None: read.append(path))
    with pytest.raises(InputError, match=r"cases mix 2-D and 3-D images: 1 of 4 is 2-D \(z2d: ref.nii.gz 48×48"):
        datasets.build_datasets(_own_nifti_folders(tmp_path, crop=16), seed=0, spatial_dims=3)
    assert read == []   # headers alone: no volume was decoded


def test_a_case_whose_moving_image_misses_its_reference_is_skipped_with_a_warning(tmp_path):
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)
    _write_nifti_case(tmp_path / "apart", (24, 24, 24), moving_affine=far)
    for case in ("b", "c"):
        _write_nifti_case(tmp_path / case, (24, 24, 24))
    with pytest.warns(UserWarning, match=r"1 of 3 cases are skipped.*apart \(the moving image does not overlap"
                                         r".*500 mm apart"):
        train, validation = datasets.build_datasets(_own_nifti_folders(tmp_path, crop=16), seed=0, spatial_dims=3)
    assert {case for case, _, _ in train.cases + validation.cases} == {"b", "c"}


def _png_cases(root, colour_cases, count=4, size=32):
    """Case folders of mr.png and spect.png (grey, or RGB pseudo-colour for ``colour_cases``)."""
    from skimage.io import imsave

    grids = np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij")
    disc = sum(g ** 2 for g in grids) < 0.5
    for case in range(count):
        folder = root / f"case{case}"
        folder.mkdir(parents=True)
        imsave(folder / "mr.png", (disc * 200 + 20).astype(np.uint8), check_contrast=False)
        spect = (disc * 180 + 10).astype(np.uint8)
        if case in colour_cases:
            spect = np.stack([spect, spect // 2, 255 - spect], axis=-1)
        imsave(folder / "spect.png", spect, check_contrast=False)
    return {"kind": "folders", "root": str(root), "reference": "mr.png", "moving": "spect.png",
            "reference_modality": "mr", "moving_modality": "spect", "crop": 16, "val_fraction": 0.25}


def test_a_colour_moving_image_among_grey_ones_trains_with_neutral_chroma_for_the_grey(tmp_path):
    """One pseudo-colour SPECT among grey ones stopped training with KeyError 'cbcr' in the collation."""
    from torch.utils.data import ConcatDataset, DataLoader

    train, validation = datasets.build_datasets(_png_cases(tmp_path, colour_cases={1}), seed=0, spatial_dims=2)
    cases = train.case_names() + validation.case_names()
    batch = next(iter(DataLoader(ConcatDataset([train, validation]), batch_size=len(cases))))
    colour = [case == "case1" for case in cases]
    assert batch["is_color"].tolist() == [float(is_colour) for is_colour in colour]
    assert batch["cbcr"].shape == (4, 2, 16, 16) and batch["label_cbcr"].shape == (4, 2, 16, 16)
    grey = ~torch.tensor(colour)
    assert torch.all(batch["cbcr"][grey] == datasets.NEUTRAL_CHROMA)
    assert torch.all(batch["label_cbcr"][grey] == datasets.NEUTRAL_CHROMA)
    assert batch["label_cbcr"][~grey].sub(datasets.NEUTRAL_CHROMA).abs().max() > 0.1   # the colour case's own chroma


def test_a_grey_folder_cohort_carries_no_chroma(tmp_path):
    train, _ = datasets.build_datasets(_png_cases(tmp_path, colour_cases=set()), seed=0, spatial_dims=2)
    assert set(train[0]) == SAMPLE_KEYS


def test_harvard_pairs_of_different_sizes_without_crop_or_size_are_refused_before_training(tmp_path):
    from skimage.io import imsave

    root = write_fake_harvard(tmp_path, size=16)
    rng = np.random.default_rng(0)
    for folder in ("MRI", "CT"):
        imsave(root / "CT-MRI" / folder / "2004.png", rng.integers(0, 256, (12, 14), np.uint8), check_contrast=False)
    section = {"kind": "harvard", "root": str(root), "tasks": ["CT-MRI"], "val_fraction": 0.3}
    with pytest.raises(InputError, match=r"pairs differ in size \(CT-MRI pair 2004 is 14×12 \(x×y\) where 11 of "
                                         r"12, .* are 16×16 \(x×y\)\).*set data.size \(e.g. 16\).*or data.crop "
                                         r"\(at most \[12, 14\] \(y, x\)") as refused:
        datasets.build_datasets(section, seed=0, spatial_dims=2)
    assert "\n" not in str(refused.value)
    with pytest.raises(InputError, match=r"MRI/2004.png: CT-MRI pair 2004 is 14×12 \(x×y\), smaller than data.crop"):
        datasets.build_datasets({**section, "crop": 13}, seed=0, spatial_dims=2)
    # Resized to 16², the 14×12 pair's pixels are no longer square, which only clean samples take (no metal).
    for fitting in ({"size": 16, "none_fraction": 1.0}, {"crop": 12}):
        train, _ = datasets.build_datasets({**section, **fitting}, seed=0, spatial_dims=2)
        assert train[0]["moving"].shape[1:] == ((16, 16) if "size" in fitting else (12, 12))
    # Read one pair at a time (unifuse evaluate), the pairs keep their own sizes.
    train, validation = datasets.build_datasets(section, seed=0, spatial_dims=2, batched=False)
    sizes = {sample["moving"].shape[1:] for split in (train, validation)
             for sample in (split[index] for index in range(len(split)))}
    assert sizes == {(16, 16), (12, 14)}


@pytest.mark.parametrize("fault", ["truncated", "other size"])
def test_an_unusable_harvard_pair_is_named_before_training(tmp_path, fault):
    from skimage.io import imsave

    root = write_fake_harvard(tmp_path, size=16)
    moving = root / "CT-MRI" / "CT" / "16004.png"
    if fault == "truncated":
        moving.write_bytes(moving.read_bytes()[:60])
        message = r"CT-MRI pair 16004: not a readable PNG \(.*\); replace the file or remove the pair"
    else:
        imsave(moving, np.random.default_rng(0).integers(0, 256, (16, 20), np.uint8), check_contrast=False)
        message = r"CT-MRI pair 16004: the CT image is 20×16 pixels and the MRI 16×16; .* must be the same size"
    for resize in ({}, {"size": 8}):
        with pytest.raises(InputError, match=rf"^{re.escape(str(moving))}: {message}"):
            datasets.build_datasets({"kind": "harvard", "root": str(root), **resize}, seed=0, spatial_dims=2)


def test_a_data_source_reading_files_without_a_root_says_where_to_set_it():
    with pytest.raises(InputError, match=r"^data: data.kind harvard reads its images from a folder: set data.root "
                                         "or pass --data-root$"):
        datasets.build_datasets({"kind": "harvard", "crop": 32}, seed=0, spatial_dims=2)
    with pytest.raises(InputError, match=r"set data.extra_sources\[0\].root$"):
        datasets.build_datasets({"kind": "phantom", "extra_sources": [{"kind": "folders", "layout": "brats"}]},
                                seed=0, spatial_dims=2)


def test_a_colour_reference_in_a_folder_cohort_is_refused_before_training_naming_its_case(tmp_path):
    """Its colour axis was taken for a spatial one at the first sample: "the geometry's spacing has 2 values but
    its origin has 3", a geometry the user never gave."""
    from skimage.io import imread, imsave

    section = _png_cases(tmp_path, colour_cases=set())
    reference = tmp_path / "case2" / "mr.png"
    grey = imread(reference)
    imsave(reference, np.stack([grey // 4, grey, grey // 2], axis=-1), check_contrast=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(reference))}: case case2: the reference image is in "
                                         "colour: training reads a grey reference"):
        datasets.build_datasets(section, seed=0, spatial_dims=2)


# The sides the small 2-D UniFuse trains on (training.trainer.trainable_sides): multiples of 4, at least 8.
SMALL_2D_SIDES = datasets.NetworkSides(multiple=4, smallest=8)


@pytest.mark.parametrize(("crop", "fit"), [(30, [28, 28]), (4, [8, 8]), ([8, 6], [8, 8])])
def test_a_crop_the_network_cannot_train_on_is_refused_naming_data_crop_and_a_crop_it_can(tmp_path, crop, fit):
    """The run stopped at its first step with the network's own message, or a traceback from the
    contrastive loss (crop 4), naming no setting."""
    section = {**_png_cases(tmp_path, colour_cases=set()), "crop": crop}
    with pytest.raises(InputError, match=r"^data.crop: .* not sides the network trains on \(multiples of 4, at least "
                                         rf"8\); give e.g. {re.escape(str(fit))}$"):
        datasets.build_datasets(section, seed=0, spatial_dims=2, sides=SMALL_2D_SIDES)
    # Without the network's rule (unifuse evaluate reads whole pairs) nothing is asked of the crop.
    datasets.build_datasets(section, seed=0, spatial_dims=2)


def test_whole_images_the_network_cannot_train_on_are_refused_suggesting_a_crop(tmp_path):
    folders = {**_png_cases(tmp_path / "folders", colour_cases=set(), size=30), "crop": None}
    with pytest.raises(InputError, match=r"the cases train whole at 30×30 \(x×y\) voxels, data.crop not being set: "
                                         r"not sides the network trains on .*set data.crop.*e.g. \[28, 28\]"):
        datasets.build_datasets(folders, seed=0, spatial_dims=2, sides=SMALL_2D_SIDES)
    root = write_fake_harvard(tmp_path / "harvard", size=18)
    section = {"kind": "harvard", "root": str(root), "tasks": ["CT-MRI"], "val_fraction": 0.3}
    with pytest.raises(InputError, match=r"the pairs \(CT-MRI pair 2004 among them\) train whole at 18×18 \(x×y\) "
                                         r"pixels, neither data.crop nor data.size being set: .*e.g. \[16, 16\]"):
        datasets.build_datasets(section, seed=0, spatial_dims=2, sides=SMALL_2D_SIDES)
    with pytest.raises(InputError, match=r"^data.size: \[18, 18\] \(y, x\): not sides"):
        datasets.build_datasets({**section, "size": 18}, seed=0, spatial_dims=2, sides=SMALL_2D_SIDES)
    for fitting in ({"size": 16}, {"crop": 16}):
        datasets.build_datasets({**section, **fitting}, seed=0, spatial_dims=2, sides=SMALL_2D_SIDES)
    with pytest.raises(InputError, match=r"^data.shape: the phantom of shape \[64, 30, 30\] trains whole at "
                                         r"\[30, 30\], data.crop not being set"):
        datasets.build_datasets({"kind": "phantom", "shape": [64, 30, 30]}, seed=0, spatial_dims=2,
                                sides=SMALL_2D_SIDES)
