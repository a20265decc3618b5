"""A label is scored in the moving image's units wherever it reaches and as the moving image's background
beyond; a label in much smaller units, a segmentation of many ids and a grey label beside a colour moving
image are told apart from a clean moving image."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.classes import DEGRADATION_CLASSES
from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.engine.labels import label_in_model_units, label_on_grid, label_units_warnings
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping, resample_to_reference

CT_WINDOW = IntensityMapping("window", "ct", -1000.0, 2000.0)
EIGHT_BIT = IntensityMapping("scale8bit", "auto", 0.0, 255.0)
GRID = Geometry(np.ones(2), np.zeros(2), np.eye(2))


def head_ct(shape=(40, 36)) -> np.ndarray:
    """A head in HU: a 1000 HU skull ring around 40 HU brain, in -1000 HU air."""
    yy, xx = np.indices(shape)
    radius = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    return np.select([radius < 11, radius < 14], [40.0, 1000.0], -1000.0).astype(np.float32)


def result_for(aligned: ImageVolume, mapping: IntensityMapping) -> FusionResult:
    return FusionResult(
        fused=ImageVolume(np.zeros(aligned.spatial_shape, np.float32), aligned.geometry), aligned=aligned,
        displacement=np.zeros((aligned.ndim, *aligned.spatial_shape), np.float32), class_names=DEGRADATION_CLASSES,
        class_probs={}, slice_class_probs=np.zeros((1, len(DEGRADATION_CLASSES))), output_extension="nii.gz",
        provenance={"intensity_mappings": dict.fromkeys(("reference", "moving"), mapping.to_dict())})


def test_a_ct_label_on_a_smaller_grid_reads_as_air_where_it_does_not_reach():
    """The 20 rows beyond the label read as 0 HU, water (0.33 in the CT window), not air (0): the
    moving image, padded after its normalisation, reads as air there."""
    ct = head_ct()
    result = result_for(ImageVolume(ct, GRID), CT_WINDOW)
    cropped = ImageVolume(ct[:20], GRID, source="label.nii.gz")  # rows 20-39 lie beyond it
    units = label_in_model_units(result, cropped)
    np.testing.assert_array_equal(units[20:], 0.0)
    np.testing.assert_array_equal(units[:20], CT_WINDOW.apply(ct[:20]))


def test_a_label_reaching_the_whole_grid_off_it_scores_as_before():
    """Where the label reaches every voxel, what it is padded with is never read: the same numbers."""
    ct = head_ct()
    result = result_for(ImageVolume(ct, GRID), CT_WINDOW)
    finer = Geometry(np.full(2, 0.5), np.full(2, -0.5), np.eye(2))  # 2x finer, reaching past the grid
    label = ImageVolume(np.kron(ct, np.ones((3, 3), np.float32))[:82, :74], finer, source="fine.nii.gz")
    expected = CT_WINDOW.apply(resample_to_reference(label, result.aligned).array)
    np.testing.assert_array_equal(label_in_model_units(result, label), expected)


def test_the_label_on_the_grid_holds_the_moving_images_background_beyond_its_reach():
    """The workbench's |aligned - label| map reads it in the moving image's units."""
    ct = head_ct()
    on_grid = label_on_grid(ImageVolume(ct[:20], GRID), ImageVolume(ct, GRID), CT_WINDOW, moving_is_rgb=False)
    np.testing.assert_array_equal(on_grid.array[20:], -1000.0)
    np.testing.assert_array_equal(on_grid.array[:20], ct[:20])


def mr(scale: float, shape=(40, 36), seed=0) -> np.ndarray:
    """A smooth MR-like image with noise, its values up to about ``scale``."""
    yy, xx = np.indices(shape)
    tissue = np.clip(1.3 - np.hypot(yy - 20, xx - 18) / 12, 0, 1) * (0.6 + 0.4 * np.sin(xx / 4) ** 2)
    return (scale * (tissue + 0.02 * np.random.default_rng(seed).standard_normal(shape))).astype(np.float32)


@pytest.mark.parametrize(("label", "moving"), [
    (mr(0.35), mr(337.0, seed=1)),  # scaled to [0, 1] beside the scanner's units
    (np.round(mr(255.0)).clip(0, 255).astype(np.uint8), (257 * np.round(mr(255.0, seed=1)).clip(0, 255)).astype(np.uint16)),
], ids=["unit-scaled-label", "8-bit-label-beside-16-bit"])
def test_a_label_in_much_smaller_units_than_the_moving_image_is_said(label, moving):
    """Mapped to a faint image by the moving image's window: SSIM 0.59 -> 0.04, without a word."""
    moving_image = ImageVolume(moving, GRID)
    window = IntensityMapping("percentile", "mr", *np.percentile(moving, [0.5, 99.5]))
    warnings = label_units_warnings(ImageVolume(label, GRID, source="small.nii.gz"), moving_image, window)
    assert len(warnings) == 1
    assert warnings[0].startswith("small.nii.gz (the label): the label's values reach ")
    assert "much smaller units than the moving image" in warnings[0]


def test_a_clean_label_beside_its_degraded_moving_image_needs_no_word():
    noise = 15.0 * np.random.default_rng(2).standard_normal((40, 36))
    label, moving = mr(337.0), 1.1 * mr(337.0, seed=1) + noise  # brighter, noisier (low dose)
    window = IntensityMapping("percentile", "mr", *np.percentile(moving, [0.5, 99.5]))
    assert label_units_warnings(ImageVolume(label, GRID), ImageVolume(moving, GRID), window) == []


def parcellation(shape=(48, 44), ids=tuple(range(2, 64))) -> np.ndarray:
    """A segmentation of many ids (FreeSurfer's run 2-63 and beyond), each in patches several voxels wide."""
    yy, xx = np.indices(shape)
    inside = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2) < 20
    patch = (yy // 5) * 9 + (xx // 5)
    return np.where(inside, np.asarray(ids)[patch % len(ids)], 0).astype(np.int32)


def test_a_segmentation_of_many_ids_is_said_to_be_scored_as_intensities():
    """aseg holds ~45 ids, aparc+aseg ~110: past the 16 ids of a few classes, scored without a word."""
    ids = np.unique(parcellation())
    label = ImageVolume(parcellation(), GRID, source="aseg.nii.gz")
    moving = ImageVolume(mr(337.0, shape=(48, 44)), GRID)
    window = IntensityMapping("percentile", "mr", *np.percentile(moving.array, [0.5, 99.5]))
    warnings = label_units_warnings(label, moving, window)
    assert len(warnings) == 1
    assert ids.size > 16 and warnings[0].startswith(f"aseg.nii.gz (the label): the label holds {ids.size} distinct "
                                                    f"whole numbers ({', '.join(map(str, ids[:8]))}, ...) in flat patches")
    assert "as a segmentation does" in warnings[0]


def test_an_8_bit_picture_of_many_grey_values_is_not_taken_for_a_segmentation():
    picture = np.round(mr(255.0, shape=(48, 44))).clip(0, 255).astype(np.uint8)
    label = ImageVolume(picture, GRID)
    assert label_units_warnings(label, ImageVolume(picture, GRID), EIGHT_BIT) == []


def test_a_segmentation_beside_a_segmentation_is_not_taken_for_one():
    """A moving image of flat patches itself: the label is in its units."""
    seg = ImageVolume(parcellation(), GRID)
    mapping = IntensityMapping("percentile", "mr", 0.0, 63.0)
    assert label_units_warnings(seg, seg, mapping) == []


def test_a_coarse_label_taken_onto_a_finer_grid_by_nearest_neighbour_is_not_taken_for_a_segmentation():
    """A 4 mm moving image's clean label on a 1 mm grid holds its values in 4x4 blocks, as flat as a
    segmentation; so is the moving image there, and the label is in its units."""
    yy, xx = np.indices((16, 16))
    coarse = np.round(20 + 3 * yy + 7 * xx + 0.2 * yy * xx).astype(np.float32)  # many whole numbers, no plateau
    moving = ImageVolume(coarse, Geometry(np.full(2, 4.0), np.full(2, 1.5), np.eye(2)))
    label = ImageVolume(np.kron(coarse, np.ones((4, 4), np.float32)), GRID)  # nearest neighbour onto 1 mm
    window = IntensityMapping("percentile", "mr", float(coarse.min()), float(coarse.max()))
    assert label_units_warnings(label, moving, window) == []


def test_a_moving_layer_with_nan_voxels_does_not_make_its_label_seem_in_smaller_units():
    """A layer made in napari may hold NaN, which the engine fills; its range read NaN ("nan from nan")."""
    picture = np.round(mr(255.0, shape=(48, 44))).clip(0, 255).astype(np.float32)
    with_nan = picture.copy()
    with_nan[:3, :3] = np.nan
    assert label_units_warnings(ImageVolume(picture, GRID), ImageVolume(with_nan, GRID), EIGHT_BIT) == []


def pet_rgb(shape=(40, 36)) -> np.ndarray:
    """A pseudo-coloured uint8 PET: hot red-yellow blob on black."""
    heat = np.clip(mr(1.0, shape), 0, 1)
    return np.stack([255 * heat, 255 * heat**2, 80 * heat**4], axis=-1).round().astype(np.uint8)


def test_a_grey_label_beside_a_colour_moving_image_is_scored_as_its_luma():
    """An 8-bit grey picture of the RGB PET (PIL's convert("L")) was clipped by the luma's [0, 1]
    window and said to be "a 16-bit label beside an 8-bit moving image": SSIM 0.81 for the same image."""
    colour = pet_rgb()
    luma = rgb_to_ycbcr(colour)[..., 0]
    grey = np.round(255 * luma).astype(np.uint8)  # what convert("L") makes
    moving = ImageVolume(colour, GRID, is_rgb=True)
    luma_window = IntensityMapping("luma", "rgb", float(luma.min()), float(luma.min()) + 1.0)
    label = ImageVolume(grey, GRID, source="grey.png")
    assert label_units_warnings(label, moving, luma_window) == []
    units = label_in_model_units(result_for(moving, luma_window), label)
    np.testing.assert_allclose(units, luma_window.apply(luma), atol=0.5 / 255)


def test_a_segmentation_beside_a_colour_moving_image_is_still_said_to_be_one():
    """Its ids are read as stored, not as the luma a grey picture beside a colour image is taken for."""
    ids = np.digitize(mr(1.0), [0.2, 0.5, 0.8]).astype(np.uint8)  # 0..3
    moving = ImageVolume(pet_rgb(), GRID, is_rgb=True)
    warnings = label_units_warnings(ImageVolume(ids, GRID, source="seg.png"), moving,
                                    IntensityMapping("luma", "rgb", 0.0, 1.0))
    assert len(warnings) == 1 and warnings[0].startswith("seg.png (the label): the label holds only 4 distinct whole")
