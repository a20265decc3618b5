"""Random misalignment: the ground-truth field undoes the misalignment, respects its limits, never folds."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from napari_unifuse.data.misalign import RandomMisalignment, warp_array
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
