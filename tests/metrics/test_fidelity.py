"""Fidelity maps on constructed cases: a pasted blob, a removed edge, identical inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_unifuse.metrics.fidelity import STEP_THRESHOLD, edge_strength, fidelity_maps

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
