"""Harvard AANLIB indexing and the patient-independent split, on a fake folder built here."""

from __future__ import annotations

import re

import numpy as np
import pytest
from skimage.io import imsave

from napari_unifuse.errors import InputError
from napari_unifuse.training import harvard

# task -> case -> slice numbers; cases 21 (CT & SPECT) and 41 (CT & PET) appear in two folders,
# as in the real collection, where they are the same subject.
FAKE_LAYOUT = {
    "CT-MRI": {2: [4, 6, 7], 16: [3, 4, 5, 6], 21: [4, 5], 41: [3, 4, 5]},
    "PET-MRI": {25: [15, 16, 17], 30: [25, 26], 41: [22, 24, 25]},
    "SPECT-MRI": {3: [8, 9], 9: [10, 11, 12], 21: [5, 6, 7], 35: [5, 8], 40: [11, 13, 14]},
}


def write_fake_harvard(root, size=16):
    rng = np.random.default_rng(0)
    for task, cases in FAKE_LAYOUT.items():
        reference_name, moving_name, _ = harvard.HARVARD_TASKS[task]
        for case, slices in cases.items():
            for slice_number in slices:
                name = f"{case}{slice_number:03d}.png"
                for folder in (reference_name, moving_name):
                    (root / task / folder).mkdir(parents=True, exist_ok=True)
                    colour = folder in ("PET", "SPECT")
                    shape = (size, size, 3) if colour else (size, size)
                    imsave(root / task / folder / name, rng.integers(0, 256, shape, dtype=np.uint8), check_contrast=False)
    return root


def test_case_is_the_number_without_its_three_slice_digits():
    assert harvard.case_of("2004") == 2
    assert harvard.case_of("16003") == 16
    assert harvard.case_of("32003") == 32
    assert harvard.case_of("41113") == 41
    with pytest.raises(InputError):
        harvard.case_of("abc")


def test_index_pairs_every_file_with_its_partner(tmp_path):
    root = write_fake_harvard(tmp_path)
    pairs = harvard.index_harvard(root)
    assert len(pairs) == sum(len(s) for cases in FAKE_LAYOUT.values() for s in cases.values())
    for pair in pairs:
        assert pair.reference_path.name == pair.moving_path.name
        assert pair.reference_path.parent.name == "MRI"
    # Numeric order within a task: 2004 comes before 16003.
    ct = [p.pair_id for p in pairs if p.task == "CT-MRI"]
    assert ct.index("2004") < ct.index("16003")


def test_unpaired_file_is_reported(tmp_path):
    root = write_fake_harvard(tmp_path)
    (root / "CT-MRI" / "CT" / "2004.png").unlink()
    with pytest.raises(InputError, match="2004"):
        harvard.index_harvard(root)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_is_patient_independent_across_all_folders(tmp_path, seed):
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    train, validation = harvard.split_cases(pairs, val_fraction=0.2, seed=seed)
    train_cases = {p.case for p in train}
    validation_cases = {p.case for p in validation}
    assert validation and train
    assert not train_cases & validation_cases
    assert len(train) + len(validation) == len(pairs)
    # Every task keeps training data.
    assert {p.task for p in train} == set(FAKE_LAYOUT)


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path):
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    first = harvard.split_cases(pairs, 0.2, seed=5)[1]
    again = harvard.split_cases(pairs, 0.2, seed=5)[1]
    assert [p.pair_id for p in first] == [p.pair_id for p in again]
    others = {tuple(sorted({p.case for p in harvard.split_cases(pairs, 0.2, seed=s)[1]})) for s in range(8)}
    assert len(others) > 1


def test_read_pair_keeps_pseudo_colour_as_rgb(tmp_path):
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    pet = next(p for p in pairs if p.task == "PET-MRI")
    reference, moving = harvard.read_harvard_pair(pet)
    assert reference.shape == (16, 16) and moving.shape == (16, 16, 3)
    assert moving.dtype == np.float32 and 0.0 <= moving.min() and moving.max() <= 1.0
    ct = next(p for p in pairs if p.task == "CT-MRI")
    assert harvard.read_harvard_pair(ct)[1].shape == (16, 16)


def test_a_pair_that_cannot_be_read_is_named_by_its_file_and_id(tmp_path):
    """A truncated PNG read mid-training said only "Truncated File Read"; two sizes gave a grid message
    without the file."""
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    pair = next(p for p in pairs if p.pair_id == "2004")
    pair.moving_path.write_bytes(pair.moving_path.read_bytes()[:60])
    with pytest.raises(InputError, match=rf"^{re.escape(str(pair.moving_path))}: CT-MRI pair 2004: not a readable PNG"):
        harvard.read_harvard_pair(pair)
    imsave(pair.moving_path, np.zeros((16, 12), np.uint8), check_contrast=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(pair.moving_path))}: CT-MRI pair 2004: the CT image is 12×16 pixels "
                                         "and the MRI 16×16"):
        harvard.read_harvard_pair(pair)
    assert harvard.pair_shape(next(p for p in pairs if p.pair_id == "2006")) == (16, 16)


def test_upper_case_png_files_are_indexed_like_lower_case_ones(tmp_path):
    """25016.PNG pairs were silently left out, and a folder of .PNG files held "no PNG pairs"."""
    root = write_fake_harvard(tmp_path)
    for folder in ("MRI", "CT"):
        path = root / "CT-MRI" / folder / "2004.png"
        path.rename(path.with_name("2004.PNG"))
    pair = next(p for p in harvard.index_harvard(root) if p.pair_id == "2004")
    assert pair.reference_path.name == pair.moving_path.name == "2004.PNG"
    assert harvard.pair_shape(pair) == (16, 16)


def test_hidden_files_are_left_out_with_a_warning_naming_their_folder(tmp_path):
    """macOS's ._2004.png (AppleDouble) stopped indexing: "expected a numeric id ..., got '._2004'"."""
    root = write_fake_harvard(tmp_path)
    expected = len(harvard.index_harvard(root))
    (root / "CT-MRI" / "MRI" / "._2004.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(root / 'CT-MRI' / 'MRI'))}: 1 hidden file\(s\) left out "
                                         r"\(\._2004\.png"):
        assert len(harvard.index_harvard(root)) == expected


def test_a_file_whose_name_is_no_atlas_id_is_named_by_its_path(tmp_path):
    root = write_fake_harvard(tmp_path)
    for folder in ("MRI", "CT"):
        imsave(root / "CT-MRI" / folder / "scan.png", np.zeros((16, 16), np.uint8), check_contrast=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(root / 'CT-MRI' / 'MRI' / 'scan.png'))}: expected a "
                                         "numeric id"):
        harvard.index_harvard(root)


def test_a_16_bit_grey_png_is_refused_before_training_naming_its_pair(tmp_path):
    """It passed the start-up checks, then stopped the run at its first draw: "expected 8-bit PNG, got uint16"."""
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    pair = next(p for p in pairs if p.task == "CT-MRI")
    imsave(pair.moving_path, np.random.default_rng(1).integers(0, 65536, (16, 16), dtype=np.uint16),
           check_contrast=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(pair.moving_path))}: {pair.name}: the CT image is a "
                                         "16-bit grey PNG, and the Harvard layout reads 8-bit PNGs"):
        harvard.pair_shape(pair)


def test_a_colour_reference_trains_as_its_luma_as_fusion_reads_it(tmp_path):
    """A tinted MRI trained on its red channel alone (a quarter of its grey level here)."""
    from napari_unifuse.data.color import rgb_to_ycbcr

    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    pair = next(p for p in pairs if p.task == "CT-MRI")
    grey = np.random.default_rng(2).integers(0, 256, (16, 16)).astype(np.uint8)
    tinted = np.stack([grey // 4, grey, grey // 2], axis=-1)
    imsave(pair.reference_path, tinted, check_contrast=False)
    reference, _ = harvard.read_harvard_pair(pair)
    np.testing.assert_array_equal(reference, rgb_to_ycbcr(tinted)[..., 0])
    # A grey image stored as RGB stays the channel it holds.
    imsave(pair.reference_path, np.stack([grey] * 3, axis=-1), check_contrast=False)
    np.testing.assert_array_equal(harvard.read_harvard_pair(pair)[0], grey / np.float32(255))


def test_the_recorded_split_sorts_pairs_by_the_cases_the_run_trained_and_held_out(tmp_path):
    """evaluate --split val drew the split again from the folder it was given: on another copy of the
    atlas (a case fewer) its "validation" pairs included cases the checkpoint trained on."""
    pairs = harvard.index_harvard(write_fake_harvard(tmp_path))
    metadata = {"training_config": {"data": {"kind": "harvard"}},
                harvard.RECORDED_SPLIT_KEY: {"train": ["2", "16", "25", "extra_sources[0]:21"],
                                             "validation": ["21", "30"]}}
    split = harvard.recorded_split(metadata, pairs)
    assert {p.case for p in split.train} == {2, 16, 25}
    # Case 21 is one subject in CT-MRI and SPECT-MRI: held out in both.
    assert {(p.task, p.case) for p in split.validation} == {("CT-MRI", 21), ("SPECT-MRI", 21), ("PET-MRI", 30)}
    assert {p.case for p in split.unrecorded} == {3, 9, 35, 40, 41}
    assert len(split.train) + len(split.validation) + len(split.unrecorded) == len(pairs)
    # Checkpoints of earlier versions, and runs on other data, record no Harvard split.
    assert harvard.recorded_split({"training_config": metadata["training_config"]}, pairs) is None
    assert harvard.recorded_split({**metadata, "training_config": {"data": {"kind": "folders"}}}, pairs) is None
    with pytest.raises(InputError, match="not the lists of training and validation cases"):
        harvard.recorded_split({**metadata, harvard.RECORDED_SPLIT_KEY: {"train": "2"}}, pairs)
