"""Random misalignment: the ground-truth field undoes the misalignment, respects its limits, never folds."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from napari_unifuse.data.misalign import (
    MISALIGNMENT_REGIMES,
    MildMisalignment,
    NoMisalignment,
    RandomMisalignment,
    RegimeMixture,
    misalignment_from_options,
    warp_array,
)
from napari_unifuse.errors import InputError


def smooth_object(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A blobby object with internal structure, zero near the border (like a head in air)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=float)
    centre = (np.asarray(shape) - 1) / 2
    radius = np.sqrt(sum(((g - c) / (0.3 * n)) ** 2 for g, c, n in zip(grid, centre, shape)))
    texture = ndimage.gaussian_filter(rng.random(shape), 2.0)
    texture = (texture - texture.min()) / np.ptp(texture)
    return np.where(radius < 1.0, 0.3 + 0.7 * texture, 0.0) * np.clip(4 * (1 - radius), 0, 1)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_warp_array_samples_at_x_plus_u():
    image = np.random.default_rng(0).random((20, 30))
    u = np.zeros((2, 20, 30))
    u[0], u[1] = 3.0, -2.0  # sample 3 rows down, 2 columns left
    warped = warp_array(image, u)
    np.testing.assert_allclose(warped[:17, 2:], image[3:, :-2], rtol=1e-6)
    # Outside the image the edge voxel repeats (torch grid_sample padding_mode="border").
    np.testing.assert_allclose(warped[17:, 2:], np.broadcast_to(image[-1:, :-2], (3, 28)), rtol=1e-6)


def test_warp_array_handles_rgb_channel_by_channel():
    rng = np.random.default_rng(1)
    rgb = rng.random((16, 24, 3))
    u = rng.normal(0, 2, size=(2, 16, 24))
    warped = warp_array(rgb, u)
    assert warped.shape == rgb.shape
    for c in range(3):
        np.testing.assert_allclose(warped[..., c], warp_array(rgb[..., c], u))


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((96, 96), None), ((40, 48, 48), (2.0, 1.0, 1.0))],
    ids=["2d", "3d-anisotropic"],
)
def test_ground_truth_field_undoes_the_misalignment(shape, spacing):
    label = smooth_object(shape)
    misalignment = RandomMisalignment().draw(shape, np.random.default_rng(3), spacing)
    moving = misalignment.apply(label)
    u = misalignment.displacement()
    assert u.shape == (len(shape), *shape) and u.dtype == np.float32

    restored = warp_array(moving, u)
    interior = tuple(slice(n // 8, n - n // 8) for n in shape)
    assert ncc(moving[interior], label[interior]) < 0.9, "the pair should actually be misaligned"
    assert ncc(restored[interior], label[interior]) > 0.99
    # Two linear interpolations blur a little; the object's range is [0, 1].
    assert np.abs(restored - label)[interior].mean() < 0.01


def test_displacement_respects_configured_maxima():
    shape = (32, 40, 48)
    lengths = np.asarray(shape, dtype=float)
    rng = np.random.default_rng(4)
    elastic_only = RandomMisalignment(max_rotation_deg=0, max_translation_fraction=0, max_elastic_fraction=0.05)
    translation_only = RandomMisalignment(max_rotation_deg=0, max_translation_fraction=0.1, max_elastic_fraction=0)
    for _ in range(3):
        u = elastic_only.sample(shape, rng)
        assert np.all(np.abs(u).reshape(3, -1).max(axis=1) <= 0.05 * lengths + 1e-4)
        u = translation_only.sample(shape, rng)
        # A pure translation: one constant vector, within its per-axis limits.
        assert np.ptp(u.reshape(3, -1), axis=1).max() < 1e-4
        assert np.all(np.abs(u[:, 0, 0, 0]) <= 0.1 * lengths)

    full = RandomMisalignment(max_rotation_deg=10, max_translation_fraction=0.05, max_elastic_fraction=0.03)
    draw = full.draw(shape, rng)
    assert np.all(np.abs(draw.params["rotation_deg"]) <= 10)
    # Three Euler angles of at most 10 deg compose to at most 30 deg; a rotation by theta moves a
    # point at distance r from the centre by 2 r sin(theta / 2).
    radius = np.linalg.norm((lengths - 1) / 2)
    bound = 2 * radius * np.sin(np.deg2rad(30) / 2) + np.linalg.norm(0.05 * lengths) + np.linalg.norm(0.03 * lengths)
    assert np.linalg.norm(draw.displacement(), axis=0).max() <= bound


def test_same_seed_same_field():
    shape = (24, 32, 32)
    first = RandomMisalignment().sample(shape, np.random.default_rng(7))
    again = RandomMisalignment().sample(shape, np.random.default_rng(7))
    other = RandomMisalignment().sample(shape, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1.0


def _jacobian_determinant(u: np.ndarray) -> np.ndarray:
    """Independent check with SimpleITK (ITK's vector order is x, y, z: reverse our components)."""
    field = sitk.GetImageFromArray(np.moveaxis(u[::-1], 0, -1).astype(np.float64), isVector=True)
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)], ids=["2d", "3d"])
def test_default_fields_never_fold(shape):
    rng = np.random.default_rng(5)
    for _ in range(4):
        determinant = _jacobian_determinant(RandomMisalignment().sample(shape, rng))
        assert determinant.min() > 0.2


def test_bad_input_raises():
    with pytest.raises(InputError, match="2D or 3D"):
        RandomMisalignment().draw((10,), np.random.default_rng(0))
    with pytest.raises(InputError, match="spacing"):
        RandomMisalignment().draw((10, 10), np.random.default_rng(0), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="does not fit"):
        warp_array(np.zeros((10, 12)), np.zeros((2, 12, 10)))
    with pytest.raises(InputError, match="non-negative"):
        RandomMisalignment(max_rotation_deg=-1)


# ---- regimes -------------------------------------------------------------------------------------
def _affine_residual_fraction(u: np.ndarray) -> float:
    """Share of the field's mean magnitude that a least-squares affine fit does not explain."""
    points = np.indices(u.shape[1:], dtype=float).reshape(u.shape[0], -1)
    design = np.vstack([points, np.ones(points.shape[1])]).T
    flat = u.reshape(u.shape[0], -1).T
    coefficients, *_ = np.linalg.lstsq(design, flat, rcond=None)
    residual = flat - design @ coefficients
    return float(np.linalg.norm(residual, axis=1).mean() / np.linalg.norm(flat, axis=1).mean())


@pytest.mark.parametrize("shape", [(256, 256), (128, 128), (32, 32, 32)])
def test_mild_regime_is_a_small_mostly_non_affine_residual_in_voxels(shape):
    rng = np.random.default_rng(1)
    for _ in range(4):
        u = MildMisalignment().draw(shape, rng).displacement()
        magnitude = np.linalg.norm(u, axis=0)
        assert 1.5 <= magnitude.mean() <= 4.0
        assert np.percentile(magnitude, 95) <= 7.0
        assert _affine_residual_fraction(u) > 0.5


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 32)], ids=["2d", "3d"])
def test_mild_fields_on_a_small_grid_neither_fold_nor_lose_their_inverse(shape):
    """With 2-4 voxels of bumps a few voxels apart (a 32³ training crop), 3 of 6 draws folded and
    the ground truth's inverse missed by up to 6 voxels: the moving image did not match its field."""
    for seed in range(6):
        draw = MildMisalignment().draw(shape, np.random.default_rng(seed))
        u = draw.displacement().astype(np.float64)
        assert _jacobian_determinant(u).min() > 0.2
        # v is u's inverse: following u, then v from where u lands, comes back (away from the border).
        landing = np.indices(shape, dtype=np.float64) + u
        back = np.stack([ndimage.map_coordinates(component, landing, order=3, mode="nearest")
                         for component in draw.inverse_displacement()])
        inside = np.all([(landing[axis] > 2) & (landing[axis] < side - 3) for axis, side in enumerate(shape)], axis=0)
        assert np.abs(u + back)[:, inside].max() < 0.1


def test_a_mild_field_on_a_large_image_shrinks_its_rigid_part_where_that_alone_is_too_large():
    """1° moves the rim of a 1024² image by 9 px: only shrinking the elastic part looped forever."""
    draw = MildMisalignment().draw((1024, 1024), np.random.default_rng(3))
    magnitude = np.linalg.norm(draw.displacement(), axis=0)
    assert magnitude.mean() <= 4.0 and np.percentile(magnitude, 95) <= 7.0
    assert 0 < abs(draw.params["rotation_deg"][0]) < 1.0
    assert draw.params["mean_voxels"] == pytest.approx(magnitude.mean())


def test_a_mild_draw_records_the_maxima_its_field_was_scaled_to():
    """meta.json recorded the unit-scale draw's maxima (1 / 64 of the axis for the elastic part)
    while the applied bumps were several times larger: each recorded maximum bounds what was applied."""
    shape = (64, 48)
    draw = MildMisalignment().draw(shape, np.random.default_rng(5))
    lengths = np.asarray(shape, dtype=float)
    bound = draw.params["max_elastic_fraction"] * lengths
    largest = np.abs(draw.elastic_coefficients).reshape(len(shape), -1).max(axis=1)
    assert np.all(largest <= bound) and np.all(largest > 0.8 * bound)  # 121 uniform draws come near it
    assert np.all(np.abs(draw.params["translation_voxels"]) <= draw.params["max_translation_fraction"] * lengths)
    assert abs(draw.params["rotation_deg"][0]) <= draw.params["max_rotation_deg"]


@pytest.mark.parametrize("weight", [np.inf, np.nan])
def test_non_finite_regime_weights_are_refused_in_one_line(weight):
    """They passed, and the first draw failed with numpy's 'Probabilities contain NaN'."""
    with pytest.raises(InputError, match="finite, non-negative weights") as error:
        RegimeMixture({"mild": weight, "large": 1.0})
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(InputError, match="finite"):
        misalignment_from_options({"regimes": {"mild": str(weight), "large": 1}})


def test_none_regime_is_the_zero_field_and_leaves_the_image_alone():
    image = smooth_object((40, 40))
    draw = NoMisalignment().draw((40, 40), np.random.default_rng(0))
    assert not draw.displacement().any()
    np.testing.assert_allclose(draw.apply(image), image, atol=1e-6)


def test_regime_mixture_draws_each_regime_by_its_weight():
    mixture = misalignment_from_options({"regimes": {"large": 0.5, "mild": 0.3, "none": 0.2}})
    rng = np.random.default_rng(0)
    drawn = [mixture.draw((32, 32), rng).params["regime"] for _ in range(400)]
    shares = {name: drawn.count(name) / len(drawn) for name in MISALIGNMENT_REGIMES}
    assert shares == pytest.approx({"large": 0.5, "mild": 0.3, "none": 0.2}, abs=0.07)


def test_one_regime_and_the_large_regime_keeps_the_config_maxima():
    options = {"regime": "large", "max_rotation_deg": 0.0, "max_translation_fraction": 0.25,
               "max_elastic_fraction": 0.0}
    u = misalignment_from_options(options).draw((40, 40), np.random.default_rng(0)).displacement()
    assert np.ptp(u[0]) < 1e-6 and np.ptp(u[1]) < 1e-6  # a pure translation
    assert np.abs(u).max() <= 0.25 * 40 + 1e-6


@pytest.mark.parametrize("options", [{"regime": "huge"}, {"regimes": {"mild": -1.0}},
                                     {"regime": "mild", "regimes": {"mild": 1.0}}, {"regimes": {}}])
def test_bad_regime_options_are_refused(options):
    with pytest.raises(InputError):
        misalignment_from_options(options)


def test_a_misspelled_option_is_refused_naming_it_and_the_accepted_ones():
    """It used to reach RandomMisalignment(**options): a TypeError traceback from `unifuse train`."""
    with pytest.raises(InputError) as refusal:
        misalignment_from_options({"max_rotaton_deg": 90.0})
    message = str(refusal.value)
    assert "max_rotaton_deg" in message and "max_rotation_deg" in message and "regimes" in message
    assert "\n" not in message


@pytest.mark.parametrize("options", [{"regime": "none", "max_rotation_deg": 90.0},
                                     {"regime": "mild", "control_points": 3},
                                     {"regimes": {"mild": 0.5, "none": 0.5, "large": 0.0}, "max_elastic_fraction": 0.1}])
def test_large_regime_options_in_a_section_that_never_draws_it_are_refused(options):
    with pytest.raises(InputError, match="only shape.* the large regime"):
        misalignment_from_options(options)
