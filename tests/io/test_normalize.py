"""normalize_intensity: modality defaults, provenance and the inverse map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping, normalize_intensity


def _volume(array, **metadata):
    return ImageVolume(array, Geometry.identity(array.ndim), metadata)


def test_ct_is_detected_from_hounsfield_air_and_round_trips(rng):
    hu = rng.uniform(-1000, 2000, (10, 12, 14)).astype(np.float32)
    hu[0] = -1024  # air below the window
    normalized, mapping = normalize_intensity(_volume(hu))
    assert mapping.modality == "ct" and mapping.method == "window"
    assert normalized.array.dtype == np.float32
    assert normalized.array.min() == 0.0 and normalized.array.max() <= 1.0
    inside = hu > mapping.lower
    np.testing.assert_allclose(mapping.inverse(normalized.array)[inside], hu[inside], atol=1e-3)
    assert normalized.metadata["intensity_mapping"] == mapping.to_dict()


def test_mr_uses_percentiles_and_round_trips_inside_them(rng):
    mr = rng.gamma(2.0, 100.0, (16, 16, 16)).astype(np.float32)
    normalized, mapping = normalize_intensity(_volume(mr))
    assert mapping.modality == "mr" and mapping.percentiles == (0.5, 99.5)
    low, high = np.percentile(mr, [0.5, 99.5])
    assert mapping.lower == pytest.approx(low) and mapping.upper == pytest.approx(high)
    assert np.mean(normalized.array == 1.0) == pytest.approx(0.005, abs=0.002)  # the clipped tail
    inside = (mr >= low) & (mr <= high)
    np.testing.assert_allclose(mapping.inverse(normalized.array)[inside], mr[inside], rtol=1e-5, atol=1e-3)


def test_pet_from_metadata_keeps_zero_and_clips_only_the_hottest(rng):
    pet = rng.exponential(3.0, (20, 20, 20)).astype(np.float32)
    _, mapping = normalize_intensity(_volume(pet, modality="pet"))
    assert mapping.percentiles == (0.0, 99.9) and "metadata" in mapping.reason
    assert mapping.lower == pytest.approx(pet.min())


def test_eight_bit_images_are_divided_by_255(rng):
    png = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    normalized, mapping = normalize_intensity(ImageVolume(png, Geometry.identity(2), is_rgb=True), modality="ct")
    np.testing.assert_allclose(normalized.array, png / 255.0, atol=1e-7)
    np.testing.assert_array_equal(np.round(mapping.inverse(normalized.array)).astype(np.uint8), png)


def pet_like_with_grey_background(rng) -> np.ndarray:
    """Uptake blob on a grey surround (no voxel at 0), with a few voxels far hotter than the rest."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, 64),) * 2, indexing="ij"))
    uptake = 60.0 + 150.0 * np.exp(-3 * (grid**2).sum(0)) + rng.uniform(0, 5, (64, 64))
    uptake[30:32, 30:32] = 255.0
    return uptake


def test_eight_bit_pet_with_a_grey_background_round_trips_with_the_background_at_zero(rng):
    pet = np.round(pet_like_with_grey_background(rng)).astype(np.uint8)
    normalized, mapping = normalize_intensity(_volume(pet), modality="pet")
    assert normalized.array.min() == 0.0  # the grey surround reaches the model as background
    assert normalized.array.max() < 1.0  # nothing clipped
    np.testing.assert_allclose(np.diff(normalized.array, axis=1), np.diff(pet.astype(float), axis=1) / 255.0,
                               atol=1e-6)  # the export's contrast is kept
    np.testing.assert_array_equal(np.round(mapping.inverse(normalized.array)).astype(np.uint8), pet)


def test_pet_window_keeps_the_background_and_scaled_returns_what_apply_clipped(rng):
    pet = pet_like_with_grey_background(rng).astype(np.float32)
    normalized, mapping = normalize_intensity(_volume(pet), modality="pet")
    background = pet < 66.0
    assert np.all(normalized.array[background] < 0.05)  # the surround is the window's bottom, not clipped
    hottest = pet == 255.0
    assert np.all(normalized.array[hottest] == 1.0) and mapping.upper < 255.0  # the 99.9th percentile clips
    clipped = mapping.scaled(pet) - normalized.array
    np.testing.assert_array_equal(clipped != 0, pet > mapping.upper)  # only above the window, never the surround
    np.testing.assert_allclose(mapping.inverse(normalized.array + clipped), pet, rtol=1e-5)


def test_mapping_survives_json_and_rejects_unknown_modalities(rng):
    _, mapping = normalize_intensity(_volume(rng.normal(size=(6, 6, 6)).astype(np.float32)), modality="t1")
    restored = IntensityMapping.from_dict(json.loads(json.dumps(mapping.to_dict())))
    assert restored == mapping
    with pytest.raises(InputError, match="unknown modality 'xray'"):
        normalize_intensity(_volume(np.zeros((3, 3), np.float32)), modality="xray")
