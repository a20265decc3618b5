"""normalize_intensity: modality defaults, provenance and the inverse map."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_unifuse.data.degrade import MetalArtifact
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, IntensityMapping, normalize_intensity, read_image
from napari_unifuse.io.normalize import CT_WINDOW_HU, PERCENTILES, WITHOUT_FILE


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


# ---- modality detection: CT's signature in HU, not a threshold any negative values cross --------


def _head_on_noise(rng, brain_range: tuple[float, float], noise_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """A disc of brain values on a zero background with noise about zero in the image's own units: a PET in
    Bq/ml with filtered back-projection's undershoot, or a phase-corrected real-valued MR."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, 64),) * 2, indexing="ij"))
    brain = (grid**2).sum(0) < 0.5
    clean = np.where(brain, rng.uniform(*brain_range, brain.shape), 0.0)
    return (clean + rng.normal(0, noise_sd, brain.shape)).astype(np.float32), brain


@pytest.mark.parametrize(("brain_range", "noise_sd"), [((3800.0, 30000.0), 1500.0), ((400.0, 3600.0), 300.0)],
                         ids=["pet_fbp_undershoot", "real_valued_mr"])
def test_negative_values_in_other_units_are_not_read_as_ct_and_the_guess_is_warned_about(rng, brain_range,
                                                                                          noise_sd):
    image, brain = _head_on_noise(rng, brain_range, noise_sd)
    assert np.percentile(image, 1) < -500  # what used to pass for HU air

    normalized, mapping = normalize_intensity(_volume(image))

    assert mapping.modality == "mr" and mapping.method == "percentile"
    assert np.mean(normalized.array[brain] == 1.0) < 0.02  # the brain keeps its contrast, not saturated
    assert "give the modality" in mapping.warning and "air peak" in mapping.reason
    assert normalized.metadata["intensity_mapping"]["warning"] == mapping.warning
    assert IntensityMapping.from_dict(json.loads(json.dumps(mapping.to_dict()))) == mapping  # provenance keeps it


def _nifti_roundtrip(tmp_path, array: np.ndarray, slope_inter: tuple[float, float] | None = None) -> ImageVolume:
    image = nib.Nifti1Image(array, np.eye(4))
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, tmp_path / "ct.nii.gz")
    return read_image(tmp_path / "ct.nii.gz")


def _phantom_ct_hu() -> np.ndarray:
    """The bundled samples' CT (their phantom), in HU: air -1000, brain, skull."""
    return make_brain_phantom_slices((64, 64), ("ct",))["ct"].array


def _scanner_ct(padding: float) -> np.ndarray:
    """The phantom as a scanner writes it: int16, the corners outside the round field of view filled with
    ``padding``, a metal implant clipped at the top of the 12-bit scale (3071)."""
    hu = _phantom_ct_hu()
    grid = np.stack(np.meshgrid(*(np.arange(64) - 31.5,) * 2, indexing="ij"))
    hu = np.where((grid**2).sum(0) < 30**2, hu, padding)
    hu[30:33, 20:23] = 3071
    return np.round(hu).astype(np.int16)


@pytest.mark.parametrize("layout", ["int16_pad3024_metal", "int16_pad1024_metal", "uint16_scl_inter",
                                    "sample_phantom", "sample_metal_artefact"])
def test_real_ct_layouts_are_still_read_as_ct(tmp_path, rng, layout):
    if layout == "int16_pad3024_metal":
        volume = _nifti_roundtrip(tmp_path, _scanner_ct(-3024.0))
    elif layout == "int16_pad1024_metal":
        volume = _nifti_roundtrip(tmp_path, _scanner_ct(-1024.0))
    elif layout == "uint16_scl_inter":  # stored HU + 1024, the header's intercept takes it back
        volume = _nifti_roundtrip(tmp_path, (_scanner_ct(-1024.0) + 1024).astype(np.uint16), (1.0, -1024.0))
    elif layout == "sample_phantom":
        volume = _volume(_phantom_ct_hu())
    else:  # the metal sample's moving image: the phantom re-scanned with an implant (streaks, noise)
        volume = _volume(MetalArtifact(voxel_size_mm=3.4, clip_to_window=False)(_phantom_ct_hu(), rng))
    assert "modality" not in volume.metadata  # nothing but the values to go by

    mapping = normalize_intensity(volume)[1]

    assert (mapping.modality, mapping.method, mapping.lower, mapping.upper) == ("ct", "window", *CT_WINDOW_HU)
    assert mapping.warning == "" and "signature" in mapping.reason


def test_hu_air_without_soft_tissue_is_read_as_ct_with_a_warning():
    ramp = np.linspace(-1000, 1500, 64, dtype=np.float32)  # air to bone, barely any soft tissue
    air_and_bone = np.concatenate([np.full((64, 64), -1000.0, np.float32), np.tile(ramp, (64, 1))])
    mapping = normalize_intensity(_volume(air_and_bone))[1]
    assert mapping.modality == "ct" and "little of the rest is soft tissue" in mapping.warning


# ---- percentile windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["mr", "pet"])
def test_a_small_object_in_a_large_empty_field_is_windowed_over_itself(rng, modality):
    head = rng.gamma(4.0, 500.0, (16, 16)).astype(np.float32)
    field = np.zeros((256, 256), np.float32)  # the head is 0.39 % of the pixels
    field[120:136, 120:136] = head

    normalized, mapping = normalize_intensity(_volume(field), modality=modality)

    assert mapping.lower == 0.0
    assert mapping.upper == pytest.approx(np.percentile(head, mapping.percentiles[1]))
    assert np.mean(normalized.array[120:136, 120:136] == 1.0) < 0.01  # not a white blob
    assert "above the background value 0" in mapping.reason


def test_a_non_constant_image_never_gets_a_degenerate_window():
    mostly_one_value = np.full(1000, 7.0, np.float32)
    mostly_one_value[:3], mostly_one_value[3] = 0.0, 10.0  # both percentiles land on the 7s
    normalized, mapping = normalize_intensity(_volume(mostly_one_value.reshape(25, 40)), modality="mr")
    assert (mapping.lower, mapping.upper) == (0.0, 10.0)
    assert sorted(np.unique(normalized.array)) == pytest.approx([0.0, 0.7, 1.0])


def test_a_constant_image_maps_to_zero():
    normalized, mapping = normalize_intensity(_volume(np.full((5, 5), 3.0, np.float32)), modality="pet")
    assert (mapping.lower, mapping.upper) == (3.0, 4.0) and not normalized.array.any()


def _sample_slices() -> dict[str, np.ndarray]:
    slices = make_brain_phantom_slices((64, 64), ("t1", "t2", "pet"))
    return {name: image.array for name, image in slices.items()}


@pytest.mark.parametrize("name", ["t1", "t2", "pet", "mr_gamma", "pet_exponential"])
def test_ordinary_images_keep_the_whole_image_percentile_window_bitwise(rng, name):
    images = {**_sample_slices(), "mr_gamma": rng.gamma(2.0, 100.0, (16, 16, 16)),
              "pet_exponential": rng.exponential(3.0, (20, 20, 20))}
    image = images[name].astype(np.float32)
    modality = "pet" if name.startswith("pet") else "mr"
    mapping = normalize_intensity(_volume(image), modality=modality)[1]
    lower, upper = np.percentile(image, PERCENTILES[modality])
    assert (mapping.lower, mapping.upper) == (float(lower), float(upper))
    assert mapping.reason == "chosen by the caller"


@pytest.mark.parametrize("modality", ["auto", "mr", "pet", "ct"])
def test_nan_and_infinite_voxels_of_an_array_given_directly_take_no_part_in_the_window(rng, modality):
    # An in-memory array skips the readers' NaN replacement: one NaN voxel once made the window NaN.
    image = (rng.random((32, 32)) * 100).astype(np.float32)
    image[0, :3] = (np.nan, np.inf, -np.inf)  # a first row of non-finite values, the rest finite
    image[0, 3:] = np.nan
    normalized, mapping = normalize_intensity(_volume(image), modality=modality)
    expected = normalize_intensity(_volume(image[1:]), modality=modality)[1]
    assert (mapping.lower, mapping.upper, mapping.modality) == (expected.lower, expected.upper, expected.modality)
    assert np.isfinite([mapping.lower, mapping.upper]).all()
    assert np.isnan(normalized.array[0, 0]) and normalized.array[0, 1:3].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(normalized.array[1:], expected.apply(image[1:]))


def test_an_image_without_a_finite_voxel_is_refused():
    with pytest.raises(InputError, match="every voxel is NaN or infinite"):
        normalize_intensity(_volume(np.full((4, 4), np.nan, np.float32)), modality="mr")


@pytest.mark.parametrize("modality", ["auto", "mr", "t2"])
def test_an_eight_bit_scanner_volume_takes_its_modalitys_rule_as_its_float_copy_does(rng, modality):
    # A quantised MR in a NIfTI (values 2-38) divided by 255 reached the model at 0-0.14; the picture
    # rule is for PNG/JPG exports, and a given modality was ignored.
    quantised = rng.integers(2, 39, (12, 16, 16)).astype(np.uint8)
    as_stored = ImageVolume(quantised, Geometry.identity(3), {}, "mr.nii.gz")
    as_floats = ImageVolume(quantised.astype(np.float32), Geometry.identity(3), {}, "mr.nii.gz")
    _, mapping = normalize_intensity(as_stored, modality)
    _, expected = normalize_intensity(as_floats, modality)
    assert (mapping.method, mapping.modality, mapping.lower, mapping.upper) == (
        "percentile", "mr", expected.lower, expected.upper)


@pytest.mark.parametrize("source, metadata", [("mr.png", {}), ("mr.JPG", {}), (None, {}),
                                              ("a napari layer's name", {WITHOUT_FILE: True})])
def test_eight_bit_pictures_keep_the_picture_rule_whatever_the_modality(rng, source, metadata):
    picture = rng.integers(2, 39, (16, 16)).astype(np.uint8)
    for modality in ("auto", "mr", "pet"):
        _, mapping = normalize_intensity(ImageVolume(picture, Geometry.identity(2), metadata, source), modality)
        assert (mapping.method, mapping.lower, mapping.upper) == ("scale8bit", 2.0, 257.0)


@pytest.mark.parametrize("metadata, modality", [({}, "ct"), ({"modality": "CT"}, "auto")])
def test_an_eight_bit_ct_volume_is_a_windowed_picture_not_hounsfield_units(rng, metadata, modality):
    ct_picture = rng.integers(0, 256, (6, 16, 16)).astype(np.uint8)
    _, mapping = normalize_intensity(ImageVolume(ct_picture, Geometry.identity(3), metadata, "ct.nii.gz"), modality)
    assert (mapping.method, mapping.modality, mapping.upper - mapping.lower) == ("scale8bit", "ct", 255.0)
    assert "cannot hold Hounsfield units" in mapping.reason


def test_values_past_float32s_range_saturate_instead_of_becoming_infinite():
    image = np.full((4, 4), 50.0)
    image[0, 0], image[0, 1] = 1e39, -1e39  # finite in float64, past float32's largest magnitude
    mapping = IntensityMapping("percentile", "mr", 50.0, 100.0)
    scaled = mapping.scaled(image)
    restored = mapping.inverse(scaled)
    assert np.isfinite(scaled).all() and np.isfinite(restored).all()
    assert restored[0, 0] == np.finfo(np.float32).max and restored[0, 1] == -np.finfo(np.float32).max
    np.testing.assert_array_equal(restored[1:], 50.0)
