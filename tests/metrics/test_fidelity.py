"""Fidelity maps on constructed cases: a pasted blob, a removed edge, identical inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.metrics.fidelity import STEP_THRESHOLD, edge_strength, fidelity_maps, in_plane_axes

LESION = (40, 95)  # in the moving image only, clear of every other edge


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.float32)


def sources(shape=(128, 128), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A "reference" (head outline + inner ring) and a "moving" image (head + a bright lesion),
    smoothed like a scanner's point-spread function, with a little noise."""
    rng = np.random.default_rng(seed)
    head = disc(shape, (64, 64), 50)
    reference = 0.5 * head + 0.3 * disc(shape, (64, 64), 20) - 0.3 * disc(shape, (64, 64), 14)
    moving = 0.4 * head + 0.5 * disc(shape, LESION, 5)
    smooth = [ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.005, shape) for image in (reference, moving)]
    return tuple(np.clip(image, 0, 1).astype(np.float32) for image in smooth)


def test_edge_strength_reads_a_step_edge_as_its_height():
    step = np.zeros((40, 40), np.float32)
    step[:, 20:] = 0.6
    # Sampled between the voxels either side of the step, the peak reads a little under h.
    assert edge_strength(step).max() == pytest.approx(0.6, rel=0.1)


def test_identical_inputs_give_zero_maps():
    reference, _ = sources()
    maps = fidelity_maps(reference, reference, reference, reference)
    assert maps.invented.max() == 0.0
    assert maps.lost.max() == 0.0
    assert maps.restoration_change.max() == 0.0


def test_an_average_fusion_of_sources_with_separate_edges_is_not_flagged():
    reference, moving = sources()
    maps = fidelity_maps(reference, moving, moving, 0.5 * (reference + moving))
    assert maps.invented.max() < 0.2 * maps.thresholds["invented"]
    assert maps.lost.max() <= maps.thresholds["lost"]


def test_an_average_keeps_same_polarity_edges_and_loses_opposite_polarity_ones():
    """Half of each edge survives an average only where the sources' edges agree in polarity; a
    step up in one and down in the other (bone on CT and T1) cancels to their difference."""
    columns = np.arange(64)
    step_up = np.tile((columns >= 32) * 0.8 + 0.1, (64, 1)).astype(np.float32)
    step_down = np.tile((columns < 32) * 0.6 + 0.2, (64, 1)).astype(np.float32)
    for other, lost_anywhere in ((0.5 * step_up + 0.2, False), (step_down, True)):
        maps = fidelity_maps(step_up, other, other, 0.5 * (step_up + other))
        flagged = maps.lost > maps.thresholds["lost"]
        assert flagged.any() == lost_anywhere
        assert not flagged[:, np.r_[:28, 36:64]].any()  # only at the edge


def test_a_three_slice_volume_stored_slices_last_is_a_volume_not_a_colour_image():
    reference, moving, fused = (np.ascontiguousarray(np.transpose(image, (1, 2, 0)))
                                for image in thick_slice_pair(slices=3))
    maps = fidelity_maps(reference, moving, moving, fused, spacing=(1.5, 1.5, 7.5))
    assert maps.invented.shape == (40, 40, 3)
    assert (maps.invented[..., 2] > maps.thresholds["invented"]).any()


def test_a_blob_pasted_into_the_fused_image_is_invented_there_and_nowhere_else():
    reference, moving = sources()
    fused = np.maximum(reference, moving)
    blob = disc(reference.shape, (64, 30), 4)  # inside the head, in neither source
    fused = np.clip(fused + 0.4 * ndimage.gaussian_filter(blob, 1.0), 0, 1)
    maps = fidelity_maps(reference, moving, moving, fused)
    flagged = maps.invented > maps.thresholds["invented"]
    near_blob = ndimage.binary_dilation(blob > 0, iterations=4)
    assert flagged[near_blob].sum() > 20
    assert not flagged[~near_blob].any()
    assert maps.lost.max() <= maps.thresholds["lost"]


def test_a_source_edge_removed_from_the_fused_image_is_lost():
    reference, moving = sources()
    lesion = disc(reference.shape, LESION, 5)
    without_lesion = np.where(ndimage.binary_dilation(lesion > 0, iterations=3), 0.4, moving)
    fused = np.maximum(reference, ndimage.gaussian_filter(without_lesion, 1.0))
    maps = fidelity_maps(reference, moving, moving, fused)
    flagged = maps.lost > maps.thresholds["lost"]
    near_lesion = ndimage.binary_dilation(lesion > 0, iterations=4)
    assert flagged[near_lesion].sum() > 20
    assert not flagged[~near_lesion].any()
    assert maps.invented.max() <= maps.thresholds["invented"]


def test_restoration_change_is_the_altered_area_in_window_units():
    reference, moving = sources()
    restored = moving.copy()
    restored[10:20, 10:20] += 0.3
    maps = fidelity_maps(reference, moving, restored, np.maximum(reference, restored))
    assert maps.restoration_change[15, 15] == pytest.approx(0.3, rel=0.05)
    assert maps.restoration_change[60:, 60:].max() == 0.0
    assert maps.thresholds["restoration_change"] == STEP_THRESHOLD


def test_noise_raises_the_edge_threshold_so_grain_is_not_flagged():
    reference, moving = sources()
    noisy = np.clip(moving + np.random.default_rng(1).normal(0, 0.08, moving.shape), 0, 1).astype(np.float32)
    fused = ndimage.gaussian_filter(np.maximum(reference, noisy), 0.7)  # a denoised-looking fusion
    maps = fidelity_maps(reference, noisy, noisy, fused)
    assert maps.thresholds["invented"] > STEP_THRESHOLD
    assert (maps.invented > maps.thresholds["invented"]).mean() < 1e-3


def test_volumes_are_measured_slice_by_slice():
    reference, moving = sources()
    volume = np.stack([reference] * 4)
    fused = volume.copy()
    fused[2] = np.clip(fused[2] + 0.4 * disc(reference.shape, (64, 30), 4), 0, 1)
    maps = fidelity_maps(volume, np.stack([moving] * 4), np.stack([moving] * 4), fused)
    flagged = (maps.invented > maps.thresholds["invented"]).reshape(4, -1).any(axis=1)
    assert flagged.tolist() == [False, False, True, False]


def test_a_narrow_grey_scale_image_is_not_mistaken_for_colour(recwarn):
    """skimage's noise estimate guesses that an image 3 voxels wide on its last axis is RGB and
    warns; a user fusing a thin strip would see that warning on the console."""
    rng = np.random.default_rng(0)
    strip = rng.normal(0.5, 0.05, (40, 3)).astype(np.float32)
    fidelity_maps(strip, strip[::-1], strip[::-1], strip)
    assert not [warning for warning in recwarn if "on the last axis" in str(warning.message)]


def test_the_plane_is_the_two_axes_of_finest_spacing_wherever_they_are_stored():
    assert in_plane_axes((7.5, 1.5, 1.5), 3) == (1, 2)
    assert in_plane_axes((1.5, 7.5, 1.5), 3) == (0, 2)
    assert in_plane_axes((1.5, 1.5, 7.5), 3) == (0, 1)
    # Isotropic (up to header rounding) keeps axes 1 and 2, as before spacing was taken into account.
    assert in_plane_axes(None, 3) == in_plane_axes((1.0, 1.0, 1.0), 3) == (1, 2)
    assert in_plane_axes((1.0, 1.0, 1.0000001), 3) == (1, 2)
    assert in_plane_axes((3.0, 0.5), 2) == (0, 1)


def thick_slice_pair(slices: int = 6, side: int = 40) -> tuple[np.ndarray, ...]:
    """Reference, moving and a fused volume with a pasted blob, stored thick slices first (axis 0):
    every slice differs from the next, so the gradient across the slices is strong everywhere."""
    reference_2d, moving_2d = sources((side, side))
    scale = np.linspace(0.6, 1.0, slices, dtype=np.float32)[:, None, None]
    reference = reference_2d[None] * scale
    moving = moving_2d[None] * scale[::-1]
    fused = np.maximum(reference, moving)
    fused[2] = np.clip(fused[2] + 0.4 * ndimage.gaussian_filter(disc((side, side), (20, 12), 4), 1.0), 0, 1)
    return reference, moving, fused


@pytest.mark.parametrize("order", [(1, 2, 0), (0, 2, 1)])
def test_a_thick_slice_volume_has_the_same_maps_whichever_axis_stores_its_slices(order):
    reference, moving, fused = thick_slice_pair()
    spacing = np.array([7.5, 1.5, 1.5])
    slices_first = fidelity_maps(reference, moving, moving, fused, spacing=spacing)
    stored = [np.ascontiguousarray(np.transpose(image, order)) for image in (reference, moving, fused)]
    stored_otherwise = fidelity_maps(stored[0], stored[1], stored[1], stored[2], spacing=spacing[list(order)])
    assert stored_otherwise.thresholds == pytest.approx(slices_first.thresholds)
    for name in ("invented", "lost", "restoration_change"):
        np.testing.assert_allclose(getattr(stored_otherwise, name), np.transpose(getattr(slices_first, name), order),
                                   atol=1e-6)
    assert (slices_first.invented[2] > slices_first.thresholds["invented"]).any()


def test_an_isotropic_volume_or_one_stored_thick_slices_first_is_measured_across_axes_1_and_2():
    reference, moving, fused = thick_slice_pair()
    unchanged = fidelity_maps(reference, moving, moving, fused)
    for spacing in ((1.0, 1.0, 1.0), (7.5, 1.5, 1.5), (1.5, 1.5, 1.5000001)):
        maps = fidelity_maps(reference, moving, moving, fused, spacing=spacing)
        for name in ("invented", "lost", "restoration_change"):
            np.testing.assert_array_equal(getattr(maps, name), getattr(unchanged, name))
    # A step along axis 0 only is no edge across axes 1 and 2, and a full one where axis 0 is in-plane.
    step = np.zeros((6, 8, 8), np.float32)
    step[3:] = 0.6
    assert edge_strength(step).max() == 0.0
    assert edge_strength(step, spacing=(1.0, 1.0, 4.0)).max() == pytest.approx(0.6, rel=0.1)
