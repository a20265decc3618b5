"""Pair builder: degrade the aligned label, then misalign; the field brings moving back onto the label."""

import json

import matplotlib
import numpy as np
import pytest

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.data.degrade import make_degradation
from napari_unifuse.data.metal import HU_MAX
from napari_unifuse.data.misalign import RandomMisalignment, regime_misalignment, warp_array
from napari_unifuse.data.pairs import TASKS, DegradedLabel, degrade_label, make_pair
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, normalize_intensity

NO_MOTION = RandomMisalignment(max_rotation_deg=0, max_translation_fraction=0, max_elastic_fraction=0)


@pytest.fixture(scope="module")
def slices():
    return make_brain_phantom_slices((64, 64), modalities=("t1", "t2", "ct", "pet"))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def interior(array: np.ndarray, ndim: int = 2) -> np.ndarray:
    return array[tuple(slice(n // 8, n - n // 8) for n in array.shape[:ndim])]


def test_task_table_covers_the_paper_and_clean_variants():
    assert TASKS["t1-t2-motion"].degradation == "motion"
    assert TASKS["mri-ct-metal"].degradation == "metal"
    assert {TASKS[t].degradation for t in ("ct-pet-lowdose", "mri-pet-lowdose", "mri-spect-lowdose")} == {"lowdose"}
    assert all(f"{name.rsplit('-', 1)[0]}-none" in TASKS for name in TASKS)


def test_motion_pair_is_degraded_misaligned_and_recorded(slices):
    pair = make_pair(slices["t1"], slices["t2"], "t1-t2-motion", rng=3)
    assert pair.degradation == "motion" and pair.class_index == 1
    assert pair.moving.array.shape == pair.label.array.shape == (64, 64)
    assert pair.displacement.shape == (2, 64, 64)
    assert pair.reference is slices["t1"]
    np.testing.assert_array_equal(pair.label.array, slices["t2"].array)
    assert ncc(interior(pair.moving.array), interior(pair.label.array)) < 0.9
    params = json.loads(json.dumps(pair.params))  # meta.json-ready
    assert params["seed"] == 3 and params["task"] == "t1-t2-motion"
    assert params["degradation"]["name"] == "motion" and "rotation_deg" in params["misalignment"]


def test_clean_pair_is_undone_by_the_displacement(slices):
    pair = make_pair(slices["t1"], slices["t2"], "t1-t2-none", rng=4)
    assert pair.class_index == 0
    # Sharp 64-pixel anatomy: cubic resampling both ways keeps the round trip close.
    restored = warp_array(pair.moving.array, pair.displacement, order=3)
    assert ncc(interior(restored), interior(pair.label.array)) > 0.99


def test_degradation_comes_before_misalignment(slices):
    label = slices["pet"]
    # With no misalignment the moving image is exactly the degraded label...
    pair = make_pair(slices["ct"], label, "ct-pet-lowdose", rng=5, misalignment=NO_MOTION)
    expected = make_degradation("lowdose", 0.5)(label.array, np.random.default_rng(5))
    np.testing.assert_allclose(pair.moving.array, expected, atol=1e-6)
    # ...and with one, the field maps the moving image back onto the *degraded* label.
    pair = make_pair(slices["ct"], label, "ct-pet-lowdose", rng=5)
    restored = warp_array(pair.moving.array, pair.displacement)
    assert ncc(interior(restored), interior(expected)) > ncc(interior(restored), interior(label.array)) > 0.9


def test_a_label_degraded_beforehand_gives_the_same_pair(slices):
    """make_pair's two halves: degrade_label, then make_pair(degraded=...) with the same generator,
    is make_pair in one call (training degrades a whole image this way, then crops it)."""
    whole = make_pair(slices["t1"], slices["t2"], "t1-t2-motion", rng=np.random.default_rng(8), severity=0.6)
    generator = np.random.default_rng(8)
    degraded = degrade_label(slices["t2"], "t1-t2-motion", generator, severity=0.6)
    split = make_pair(slices["t1"], slices["t2"], "t1-t2-motion", rng=generator, degraded=degraded)
    np.testing.assert_array_equal(split.moving.array, whole.moving.array)
    np.testing.assert_array_equal(split.displacement, whole.displacement)
    assert split.params["degradation"] == whole.params["degradation"]
    with pytest.raises(InputError, match="does not belong"):
        make_pair(slices["ct"], slices["pet"], "ct-pet-lowdose", rng=0, degraded=degraded)
    cropped = DegradedLabel(degraded.array[:32], degraded.degradation)
    with pytest.raises(InputError, match="does not belong"):
        make_pair(slices["t1"], slices["t2"], "t1-t2-motion", rng=0, degraded=cropped)


def test_colour_pet_degrades_luma_and_carries_chroma(slices):
    rgb = matplotlib.colormaps["hot"](np.clip(slices["pet"].array, 0, 1))[..., :3].astype(np.float32)
    label = ImageVolume(rgb, slices["pet"].geometry, {"modality": "pet"}, is_rgb=True)
    pair = make_pair(slices["t1"], label, "mri-pet-lowdose", rng=6, misalignment=NO_MOTION)
    assert pair.moving.is_rgb and pair.moving.array.shape == (64, 64, 3)
    moving, clean = rgb_to_ycbcr(pair.moving.array), rgb_to_ycbcr(rgb)
    assert np.abs(moving[..., 0] - clean[..., 0]).mean() > 0.01  # luma got the noise
    # Chroma is carried over (up to gamut clipping where noisy luma leaves the RGB cube).
    assert np.median(np.abs(moving[..., 1:] - clean[..., 1:])) < 0.01

    pair = make_pair(slices["t1"], label, "mri-pet-none", rng=6)
    restored = warp_array(pair.moving.array, pair.displacement, order=3)
    assert ncc(interior(restored), interior(rgb)) > 0.99


def test_a_colour_label_as_read_from_a_png_gives_the_pair_of_its_float_copy(slices):
    """io.read_image gives an 8-bit RGB PET as uint8 in 0-255: read as if it were [0, 1], the
    degraded PET came out a saturated white blob."""
    rgb = matplotlib.colormaps["hot"](np.clip(slices["pet"].array, 0, 1))[..., :3]
    as_read = ImageVolume((rgb * 255).round().astype(np.uint8), slices["pet"].geometry, {"modality": "pet"},
                          is_rgb=True)
    as_float = ImageVolume(as_read.array / np.float32(255), as_read.geometry, as_read.metadata, is_rgb=True)
    from_png = make_pair(slices["t1"], as_read, "mri-pet-lowdose", rng=6, misalignment=NO_MOTION)
    from_float = make_pair(slices["t1"], as_float, "mri-pet-lowdose", rng=6, misalignment=NO_MOTION)
    np.testing.assert_allclose(from_png.moving.array, from_float.moving.array, atol=1e-5)


def test_same_seed_same_pair_in_3d():
    volumes = make_brain_phantoms((32, 32, 32), modalities=("ct", "pet"))
    first = make_pair(volumes["ct"], volumes["pet"], "ct-pet-lowdose", rng=7)
    again = make_pair(volumes["ct"], volumes["pet"], "ct-pet-lowdose", rng=7)
    assert first.displacement.shape == (3, 32, 32, 32)
    np.testing.assert_array_equal(first.moving.array, again.moving.array)
    np.testing.assert_array_equal(first.displacement, again.displacement)
    assert first.params == again.params


def test_bad_input_raises(slices):
    with pytest.raises(InputError, match="unknown task"):
        make_pair(slices["t1"], slices["t2"], "t1-t2-blur", rng=0)
    elsewhere = ImageVolume(slices["t2"].array, Geometry(np.ones(2), np.zeros(2), np.eye(2)))
    with pytest.raises(InputError, match="reference grid"):
        make_pair(slices["t1"], elsewhere, "t1-t2-none", rng=0)


def test_what_the_window_clipped_off_is_carried_into_the_moving_image(slices):
    """A hot lesion above the normalisation window survives in the moving image, undegraded."""
    label = slices["pet"]
    beyond_window = np.zeros_like(label.array)
    beyond_window[30:34, 30:34] = 2.5
    pair = make_pair(slices["ct"], label, "ct-pet-lowdose", rng=5, misalignment=NO_MOTION, beyond_window=beyond_window)
    degraded = make_degradation("lowdose", 0.5)(label.array, np.random.default_rng(5))
    np.testing.assert_allclose(pair.moving.array, degraded + beyond_window, atol=1e-6)
    np.testing.assert_array_equal(pair.label.array, label.array)

    rgb = ImageVolume(np.stack([label.array] * 3, axis=-1), label.geometry, is_rgb=True)
    with pytest.raises(InputError, match="grey-level"):
        make_pair(slices["ct"], rgb, "ct-pet-none", rng=5, beyond_window=beyond_window)


def test_metal_kept_beyond_a_ct_window_leaves_the_model_input_bit_identical(slices):
    """synth keeps the simulated metal above the window (3071 HU, not the window top); the [0, 1]
    image, the drawn parameters and the draws after them stay exactly those the model trains on."""
    label, mapping = normalize_intensity(slices["ct"], "ct")
    plain_rng, keeping_rng = np.random.default_rng(4), np.random.default_rng(4)
    plain = degrade_label(label, "metal", plain_rng)
    keeping = degrade_label(label, "metal", keeping_rng, keep_beyond_window=True)
    assert plain.beyond_window is None
    np.testing.assert_array_equal(keeping.array, plain.array)
    assert keeping.array.dtype == plain.array.dtype == np.float32
    assert keeping.degradation.last_params == plain.degradation.last_params
    assert keeping_rng.random() == plain_rng.random()
    in_hu = mapping.inverse(keeping.array + keeping.beyond_window)
    for metal_object in keeping.degradation.last_params["objects"]:
        assert in_hu[tuple(metal_object["centre_voxel"])] == pytest.approx(HU_MAX, abs=0.5)
    assert not keeping.beyond_window[(plain.array > 0.0) & (plain.array < 1.0)].any()

    unmoved = regime_misalignment("none")
    model_input = make_pair(slices["t1"], label, "metal", rng=4, misalignment=unmoved)
    np.testing.assert_allclose(model_input.moving.array, plain.array, atol=1e-6)
    written = make_pair(slices["t1"], label, "metal", rng=4, misalignment=unmoved,
                        beyond_window=np.zeros_like(label.array))
    np.testing.assert_allclose(written.moving.array, keeping.array + keeping.beyond_window, atol=1e-6)


def test_a_coronal_ct_gets_its_metal_streaks_in_its_axial_planes():
    """The slice axis comes from the geometry: a coronally stored copy of a CT (its axial planes
    along array axis 1) is scanned in the same world planes as the axial original, not in coronal ones."""
    hu = make_brain_phantoms((10, 24, 20), modalities=("ct",))["ct"].array
    axial = ImageVolume(hu, Geometry(np.full(3, 6.0), np.zeros(3), np.eye(3)))
    coronal = ImageVolume(np.ascontiguousarray(hu.transpose(1, 0, 2)), axial.geometry.transposed((1, 0, 2)))
    assert coronal.geometry.world_axis_order() == (1, 0, 2)
    expected = degrade_label(axial, "metal", np.random.default_rng(2), 0.8)
    degraded = degrade_label(coronal, "metal", np.random.default_rng(2), 0.8)
    assert degraded.degradation.last_params["slice_axis"] == 1
    np.testing.assert_array_equal(degraded.array, expected.array.transpose(1, 0, 2))


def test_the_none_regime_leaves_the_degraded_label_where_it_is(slices):
    pair = make_pair(slices["t1"], slices["t2"], "t1-t2-motion", rng=3, misalignment=regime_misalignment("none"))
    assert not pair.displacement.any()
    expected = degrade_label(slices["t2"], "t1-t2-motion", np.random.default_rng(3)).array
    np.testing.assert_allclose(pair.moving.array, expected, atol=1e-6)
    with pytest.raises(InputError, match="unknown misalignment regime"):
        regime_misalignment("huge")
