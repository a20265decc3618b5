"""Structural matching: its pieces against independent references (scipy, direct loops, exact
rigid motions) and the whole on cross-modal phantom pairs misaligned by a known field."""

import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.data.misalign import RandomMisalignment
from napari_unifuse.data.phantoms import make_brain_phantom_slices, make_brain_phantoms
from napari_unifuse.errors import Cancelled
from napari_unifuse.model import matching
from napari_unifuse.model.correlation import local_distance
from napari_unifuse.model.matching import (
    affine_displacement,
    fit_rigid,
    mind,
    mutual_information,
    pyramid_factors,
    structural_matching,
)
from napari_unifuse.model.smoothing import gaussian_blur
from napari_unifuse.model.warp import compose, warp


@pytest.mark.parametrize(("shape", "sigma"), [((23, 31), 1.5), ((9, 11, 13), 1.0), ((7, 5, 6), 0.5)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    images = np.random.default_rng(0).random((2, 3, *shape))  # a batch of two three-channel images
    ours = gaussian_blur(torch.from_numpy(images), sigma).numpy()
    # Same truncation (radius ceil(3 sigma)) and edge handling (replicate = scipy's "nearest").
    expected = ndimage.gaussian_filter(images, [0, 0, *[sigma] * len(shape)], mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_gaussian_blur_passes_gradients_back():
    # The matching's MI refinement and the dense refinement optimise through blurred images.
    image = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gaussian_blur(x, 1.0), (image,))


@pytest.mark.parametrize(("shape", "radius"), [((6, 7), 2), ((4, 5, 3), 1)])
def test_local_distance_matches_direct_loop(shape, radius):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 2, 3, *shape))
    result = local_distance(torch.from_numpy(a), torch.from_numpy(b), radius, outside=-1.0).numpy()
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(shape)))
    for k, offset in enumerate(offsets):
        for x in np.ndindex(*shape):
            y = tuple(xi + di for xi, di in zip(x, offset))
            inside = all(0 <= yi < size for yi, size in zip(y, shape))
            expected = ((a[(..., *x)] - b[(..., *y)]) ** 2).mean(axis=1) if inside else -1.0
            np.testing.assert_allclose(result[(slice(None), k, *x)], expected, atol=1e-12)


def test_mind_ignores_affine_intensity_changes():
    """MIND describes structure, so I and 2 - 3·I (inverted contrast) get the same descriptor."""
    image = torch.rand(1, 1, 24, 24, dtype=torch.float64)
    descriptor, _ = mind(image, distance=2, patch_sigma=1.0)
    inverted, _ = mind(2.0 - 3.0 * image, distance=2, patch_sigma=1.0)
    torch.testing.assert_close(descriptor, inverted)
    assert descriptor.shape == (1, 4, 24, 24) and descriptor.amax(dim=1).eq(1).all()


def test_mutual_information_matches_scikit_learn_on_the_foreground():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(4)
    a = rng.random((40, 40))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    a[:10] = b[:10] = 0.0  # shared background: left out
    ours = mutual_information(*(torch.from_numpy(x)[None, None] for x in (a, b)))
    foreground = (a > 0.02) | (b > 0.02)
    bins = [np.round(x[foreground] * 31).astype(int) for x in (a, b)]
    assert float(ours) == pytest.approx(mutual_info_score(*bins), rel=1e-9)


def _rotation(spatial_dims: int, degrees: float) -> torch.Tensor:
    angle = np.deg2rad(degrees)
    rotation = np.eye(spatial_dims)
    rotation[-2:, -2:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return torch.from_numpy(rotation)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rigid_fit_recovers_a_known_motion_despite_outliers(spatial_dims):
    rng = np.random.default_rng(2)
    positions = torch.from_numpy(rng.uniform(0, 64, size=(1, spatial_dims, 200)))
    rotation = _rotation(spatial_dims, 12.0)
    translation = torch.arange(1.0, spatial_dims + 1.0, dtype=torch.float64) * 3
    targets = rotation @ positions + translation[:, None]
    # A fifth of the matches are wrong by up to 30 voxels (what block matching does in flat areas).
    wrong = torch.from_numpy(rng.random(200) < 0.2)
    targets[..., wrong] += torch.from_numpy(rng.uniform(-30, 30, size=(1, spatial_dims, int(wrong.sum()))))
    matrix = fit_rigid(positions, targets, torch.ones(1, 200, dtype=torch.float64), scale=4.0)[0]
    torch.testing.assert_close(matrix[:, :spatial_dims], rotation, atol=2e-3, rtol=0)
    torch.testing.assert_close(matrix[:, spatial_dims], translation, atol=0.2, rtol=0)


def test_affine_displacement_moves_points_as_the_matrix_does():
    matrix = torch.cat([_rotation(2, 30.0), torch.tensor([[2.0], [-5.0]], dtype=torch.float64)], dim=1)
    field = affine_displacement(matrix[None], (5, 7))[0]
    point = torch.tensor([3.0, 4.0], dtype=torch.float64)
    expected = matrix[:, :2] @ point + matrix[:, 2] - point
    torch.testing.assert_close(field[:, 3, 4], expected)


def test_composing_translations_adds_them():
    first = torch.zeros(1, 2, 16, 16)
    first[:, 0], first[:, 1] = 2.0, -1.0
    second = torch.zeros(1, 2, 16, 16)
    second[:, 0], second[:, 1] = -0.5, 3.0
    torch.testing.assert_close(compose(first, second), first + second)


def test_composition_equals_warping_twice():
    """warp(warp(I, first), second) = warp(I, compose(first, second)) for smooth fields, up to
    interpolation error: far closer than adding the two fields."""
    torch.manual_seed(0)
    image = gaussian_blur(torch.rand(1, 1, 48, 48, dtype=torch.float64), 3.0)
    first = gaussian_blur(torch.randn(1, 2, 48, 48, dtype=torch.float64), 6.0) * 20
    second = gaussian_blur(torch.randn(1, 2, 48, 48, dtype=torch.float64), 6.0) * 20
    twice = warp(warp(image, first, padding_mode="border"), second, padding_mode="border")
    once = warp(image, compose(first, second), padding_mode="border")
    added = warp(image, first + second, padding_mode="border")
    interior = (..., slice(8, -8), slice(8, -8))
    error, naive = ((twice - result)[interior].abs().mean() for result in (once, added))
    assert error < 0.3 * naive  # measured: 0.22


def _errors(reference: np.ndarray, label: np.ndarray, misalignment: RandomMisalignment, seed: int,
            search_range: int) -> tuple[float, float]:
    """Mean end-point error inside the head (voxels) of no motion and of structural matching, for
    ``label`` misaligned by a draw of ``misalignment`` against ``reference``."""
    draw = misalignment.draw(reference.shape, np.random.default_rng(seed))
    truth, moving = draw.displacement(), draw.apply(label)
    estimate = structural_matching(torch.from_numpy(moving)[None, None].float(),
                                   torch.from_numpy(reference)[None, None].float(), step=4,
                                   search_range=search_range)[0].numpy()
    head = reference > 0.05
    return (float(np.linalg.norm(truth, axis=0)[head].mean()),
            float(np.linalg.norm(estimate - truth, axis=0)[head].mean()))


@pytest.mark.parametrize(("moving_modality", "seed"), [("ct", 0), ("pet", 1), ("t2", 2)])
def test_recovers_a_cross_modal_misalignment_in_2d(moving_modality, seed):
    """A T1 reference and a CT / PET / T2 slice moved by up to 15°, 16 px and a 4-px elastic
    warp: the estimate removes most of the misalignment inside the head."""
    slices = make_brain_phantom_slices((128, 128), ("t1", moving_modality))
    reference, label = (slices[name].array for name in ("t1", moving_modality))
    label = (label - label.min()) / (label.max() - label.min())
    identity, matched = _errors(reference, label, RandomMisalignment(
        max_translation_fraction=0.125, max_elastic_fraction=0.03), seed, search_range=32)
    assert identity > 6.0
    assert matched < 0.35 * identity


def test_recovers_a_misalignment_in_3d():
    volumes = make_brain_phantoms((48, 48, 48), ("t1", "t2"))
    reference, label = volumes["t1"].array, volumes["t2"].array
    identity, matched = _errors(reference, label / label.max(), RandomMisalignment(
        max_rotation_deg=8.0, max_translation_fraction=0.12, max_elastic_fraction=0.0), 3, search_range=8)
    assert identity > 2.5
    assert matched < 0.35 * identity


def test_identical_images_need_no_motion():
    image = torch.from_numpy(make_brain_phantom_slices((96, 96), ("t1",))["t1"].array)[None, None]
    estimate = structural_matching(image, image, step=4, search_range=16)
    assert estimate.abs().max() < 0.5


def test_a_flat_image_gives_no_motion():
    """Nothing to match (a blank slice, a constant tile): the field stays zero instead of jumping
    to the first offset of the window."""
    reference = torch.from_numpy(make_brain_phantom_slices((64, 64), ("t1",))["t1"].array)[None, None]
    for moving, fixed in ((torch.zeros_like(reference), reference), (reference, torch.full_like(reference, 0.3))):
        assert structural_matching(moving, fixed, step=4, search_range=16).abs().max() < 0.01


@pytest.mark.parametrize(("spatial", "spacing", "expected"), [
    ((160, 160, 160), None, (2, 2, 2)),          # clinical size: one halving reaches 80³
    ((64, 80, 64), None, (1, 1, 1)),             # small enough as it is
    ((24, 256, 256), (5.0, 1.0, 1.0), (1, 4, 4)),  # thick slices: in-plane only, ~isotropic
    ((1, 64, 64), (1.0, 1.0, 1.0), (1, 1, 1)),   # a one-slice volume is never pooled along z
    ((4, 4, 200), None, (1, 1, 1)),              # needle: nothing large enough to pool
])
def test_pyramid_pools_towards_isotropic_level_voxels_within_the_budget(spatial, spacing, expected):
    assert pyramid_factors(spatial, spacing) == expected


def test_the_pyramid_level_matches_a_large_volume_like_the_full_grid():
    """A 3D pair pooled to its level (forced by a small voxel budget) recovers the misalignment as
    well as matching on the full grid does."""
    volumes = make_brain_phantoms((48, 48, 48), ("t1", "t2"))
    reference, label = volumes["t1"].array, volumes["t2"].array / volumes["t2"].array.max()
    draw = RandomMisalignment(max_rotation_deg=6.0, max_translation_fraction=0.12,
                              max_elastic_fraction=0.0).draw(reference.shape, np.random.default_rng(3))
    truth, moving = draw.displacement(), draw.apply(label)
    pair = [torch.from_numpy(x)[None, None].float() for x in (moving, reference)]
    head = reference > 0.05
    identity = float(np.linalg.norm(truth, axis=0)[head].mean())
    with mock.patch.object(matching, "_LEVEL_MAX_VOXELS", 24**3):
        assert pyramid_factors((48, 48, 48)) == (2, 2, 2)
        estimate = structural_matching(*pair, step=4, search_range=8)[0].numpy()
    assert np.linalg.norm(estimate - truth, axis=0)[head].mean() < 0.35 * identity


@pytest.mark.parametrize("shape", [(1, 64, 64), (64, 64, 1), (2, 2, 2), (32, 32, 2), (4, 4, 200)])
def test_thin_volumes_are_matched_in_plane_or_not_at_all(shape):
    """A one-slice volume is matched as a 2D image (no motion across the slice); volumes too thin
    along two axes for a block of cells get no motion instead of a pooling error."""
    image = np.zeros(shape, dtype=np.float32)
    image[tuple(slice(size // 4, max(size // 4 + 1, 3 * size // 4)) for size in shape)] = 1.0
    reference = torch.from_numpy(image)[None, None]
    moving = torch.roll(reference, 3, dims=2 + int(np.argmax(shape)))
    field = structural_matching(moving, reference, step=4, search_range=8)
    assert field.shape == (1, 3, *shape) and torch.isfinite(field).all()
    thin = [axis for axis, size in enumerate(shape) if size < 12]
    for axis in thin:
        assert field[0, axis].abs().max() == 0
    if len(thin) == 1:  # matched in-plane: the shift is found inside the square
        inside = reference[0, 0] > 0
        longest = int(np.argmax(shape))
        assert abs(float(field[0, longest][inside].mean()) - 3.0) < 1.0


@pytest.mark.parametrize("shape", [(64, 64), (24, 24, 3)], ids=["blocks", "in-plane"])
def test_the_matching_checks_for_a_cancel_at_every_step_and_stops_at_the_next_one(shape, cancel_after):
    """The matching and its MI refinement (90 Adam steps) call ``check_cancelled`` throughout, in
    2-D and slice by slice; what it raises stops them there, before any further step."""
    generator = torch.Generator().manual_seed(0)
    moving, reference = (gaussian_blur(torch.rand(1, 1, *shape, generator=generator), 2.0) for _ in range(2))
    uncancelled: list[int] = []
    structural_matching(moving, reference, step=4, search_range=8, check_cancelled=cancel_after(uncancelled, 10_000))
    assert len(uncancelled) >= 90

    for allowed in (1, len(uncancelled) // 2):  # during the block matching, during the MI refinement
        cancelled: list[int] = []
        with pytest.raises(Cancelled):
            structural_matching(moving, reference, step=4, search_range=8,
                                check_cancelled=cancel_after(cancelled, allowed))
        assert len(cancelled) == allowed + 1
