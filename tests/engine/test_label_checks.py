"""A run's label is checked as its moving image is: the reader's notes, values made usable, a picture's
place in space, a one-slice label beside a 2-D reference, and a label in other units than the moving image."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.labels import checked_label, label_units_warnings
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping

EIGHT_BIT = IntensityMapping("scale8bit", "auto", 0.0, 255.0)


def disc(shape=(32, 28), source: str | None = "label.nii.gz", scale=200.0, dtype=np.float32) -> ImageVolume:
    """A bright disc with a soft rim on a black background, in 1 mm pixels from the origin."""
    yy, xx = np.indices(shape)
    array = scale * np.clip(1.2 - np.hypot(yy - 14, xx - 12) / 8, 0.0, 1.0)
    return ImageVolume(array.astype(dtype), Geometry(np.ones(2), np.zeros(2), np.eye(2)), source=source)


def test_the_readers_notes_on_a_label_file_are_its_warnings_naming_it_the_label():
    """A NaN-holding or ill-headed label was altered by its reader and scored without a word."""
    notes = ["non-finite values: 12 NaN voxels set to 0", "the NIfTI header's qform and sform disagree"]
    label = disc()
    label = ImageVolume(label.array, label.geometry, source=label.source, metadata={"warnings": notes})
    _, warnings = checked_label(label, disc(source="reference.nii.gz"))
    assert warnings == [f"label.nii.gz (the label): {note}" for note in notes]


def test_a_label_with_nan_and_infinity_in_memory_is_made_usable_and_said():
    """A layer made in napari reaches the checks without a reader: NaN gave NaN metrics, unsaid."""
    array = disc(source=None).array.copy()
    array[0, :3], array[5, 5] = np.nan, np.inf
    label, warnings = checked_label(ImageVolume(array, disc().geometry), disc(source=None))
    assert np.isfinite(label.array).all() and label.array[5, 5] == np.nanmax(array[np.isfinite(array)])
    assert warnings == ["label: non-finite values: 3 NaN voxels set to 0, 1 +inf voxels set to the maximum 200"]


def test_a_label_of_no_finite_voxel_is_refused_naming_it():
    label = ImageVolume(np.full((32, 28), np.nan, np.float32), disc().geometry, source="truth.nii.gz")
    with pytest.raises(InputError) as refused:
        checked_label(label, disc(source="reference.nii.gz"))
    assert refused.value.source == "truth.nii.gz" and refused.value.problem.startswith("the label: every voxel")


def test_a_constant_label_is_said_the_ncc_to_it_is_undefined():
    label = ImageVolume(np.full((32, 28), 7.0, np.float32), disc().geometry, source="flat.nii.gz")
    _, warnings = checked_label(label, disc(source="reference.nii.gz"))
    assert len(warnings) == 1
    assert warnings[0].startswith("flat.nii.gz (the label): the label is constant (7 everywhere): the NCC to a "
                                  "constant image is undefined (NaN)")


def test_a_label_picture_of_another_size_gets_the_moving_pictures_placement_warning():
    _, warnings = checked_label(disc((26, 24), source="crop.png"), disc(source="reference.png"))
    assert warnings == ["crop.png (the label): the two pictures differ in size (28×32 pixels and 24×26 pixels): "
                        "they are laid over each other from their top-left pixel, 1 pixel = 1 mm; if one was "
                        "cropped or zoomed, check the overlay, or give two pictures of the same size"]


def test_a_scanner_label_beside_a_picture_reference_is_said_to_be_placed_by_a_guess():
    _, warnings = checked_label(disc(source="label.nii.gz"), disc(source="reference.png"))
    assert len(warnings) == 1
    assert warnings[0].startswith("label.nii.gz (the label): reference.png is a picture without position or pixel "
                                  "size, label.nii.gz a scanner image with both")


def test_a_one_slice_label_beside_a_2d_reference_is_its_slice():
    """`unifuse evaluate` scored it, `unifuse fuse --label` refused it as 3D beside 2D."""
    flat = disc(source="reference.nii.gz")
    stored = ImageVolume(flat.array[None], Geometry(np.ones(3), np.zeros(3), np.eye(3)), source="label.nii.gz")
    label, warnings = checked_label(stored, flat)
    assert label.ndim == 2 and warnings == []
    np.testing.assert_array_equal(label.array, flat.array)
    assert label.on_grid_of(flat)


def test_a_label_in_the_moving_images_units_needs_no_word():
    label, _ = checked_label(disc(dtype=np.uint8), disc(source="reference.png"))
    assert label_units_warnings(label, disc(dtype=np.uint8), EIGHT_BIT) == []


def test_a_16_bit_label_beside_an_8_bit_moving_image_is_said_to_be_clipped_by_its_window():
    """Clipped by the moving image's 8-bit window to a mask, without a word."""
    label = disc(source="label16.png", scale=200.0 * 257, dtype=np.uint16)
    warnings = label_units_warnings(label, disc(dtype=np.uint8), EIGHT_BIT)
    assert len(warnings) == 1
    assert warnings[0].startswith("label16.png (the label): 100 % of the label's voxels above its background lie "
                                  "outside the moving image's intensity window [0, 255] and are clipped")


def test_a_window_clipping_only_the_brightest_tail_needs_no_word():
    """A percentile window clips a clean label's brightest voxels: a few percent, not a change of units."""
    label = disc()
    window = IntensityMapping("percentile", "mr", 0.0, float(np.percentile(label.array[label.array > 0], 90)))
    assert label_units_warnings(label, disc(), window) == []


@pytest.mark.parametrize("mapping", [EIGHT_BIT, None], ids=["grey-moving", "label-scored-on-its-own"])
def test_a_segmentation_given_as_label_is_said_to_be_scored_as_intensities(mapping):
    ids = np.digitize(disc().array, [30.0, 100.0, 170.0]).astype(np.uint8)  # 0..3, inside the 8-bit window
    label = ImageVolume(ids, disc().geometry, source="seg.png")
    warnings = label_units_warnings(label, disc(dtype=np.uint8), mapping)
    assert warnings == ["seg.png (the label): the label holds only 4 distinct whole numbers (0, 1, 2, 3), as a "
                        "segmentation does, but the label metrics compare the aligned image's intensities with its "
                        "values; give the clean moving image aligned to the reference, an intensity image in the "
                        "moving image's units"]


def test_a_constant_moving_image_does_not_put_the_blame_on_the_labels_units():
    """A label in the right units was said to be 100 % outside the window [0, 1] of an all-zero moving image."""
    blank = ImageVolume(np.zeros((32, 28), np.float32), disc().geometry, source="blank.nii.gz")
    placeholder = IntensityMapping("percentile", "mr", 0.0, 1.0)  # io.normalize's window of a constant image
    assert label_units_warnings(disc(), blank, placeholder) == []


def test_a_mask_beside_a_mask_is_not_taken_for_a_segmentation():
    mask = ImageVolume((disc().array > 100).astype(np.uint8), disc().geometry, source="mask.png")
    assert label_units_warnings(mask, mask, IntensityMapping("scale8bit", "auto", 0.0, 255.0)) == []
