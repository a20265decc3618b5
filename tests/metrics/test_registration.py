"""Registration metrics: image similarity to the label, Jacobian determinant, folding and SDlogJ.

References: SimpleITK ``DisplacementFieldJacobianDeterminant`` (det J) and Learn2Reg's evaluation
code (``evaluation/utils.py`` + ``evaluation.py``, transcribed below: zero-padded central differences
via ``scipy.ndimage.correlate``, 2-voxel crop, SDlogJ = std(log(clip(det J + 3, 1e-9, 1e9)))).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_unifuse.errors import InputError
from napari_unifuse.metrics import (
    end_point_error,
    folding_percentage,
    jacobian_determinant,
    jacobian_regularity,
    registration_metrics,
    sd_log_jacobian,
)
from napari_unifuse.metrics import registration as registration_module


def test_identical_images_score_perfectly(source_pair):
    a, _ = source_pair
    result = registration_metrics(a, a)
    assert result == pytest.approx({"mse": 0.0, "ncc": 1.0, "ssim": 1.0})


def test_shifts_lower_ncc_and_ssim_and_raise_mse(source_pair):
    a, _ = source_pair
    results = [registration_metrics(np.roll(a, shift, axis=0), a) for shift in (0, 1, 3, 6)]
    for better, worse in zip(results, results[1:], strict=False):
        assert better["ncc"] > worse["ncc"]
        assert better["ssim"] > worse["ssim"]
        assert better["mse"] < worse["mse"]


def test_values_match_numpy_and_skimage_without_a_mask(source_pair):
    a, b = source_pair
    result = registration_metrics(b, a)
    assert result["mse"] == pytest.approx(np.mean((a - b) ** 2))
    assert result["ncc"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert result["ssim"] == pytest.approx(structural_similarity(b, a, data_range=1.0))


def test_the_mask_restricts_every_metric(source_pair):
    a, _ = source_pair
    corrupted = a.copy()
    corrupted[:, 40:] = 0.0  # wrong only outside the mask
    mask = np.zeros(a.shape, dtype=bool)
    mask[:, :30] = True
    assert registration_metrics(corrupted, a, mask) == pytest.approx({"mse": 0.0, "ncc": 1.0, "ssim": 1.0})
    assert registration_metrics(corrupted, a)["mse"] > 0


def test_volumes_are_scored_in_3d(make_phantom):
    label = np.stack([make_phantom((24, 24), 0, blur=1.0 + 0.1 * z) for z in range(8)])
    result = registration_metrics(np.roll(label, 1, axis=0), label)
    assert 0 < result["ssim"] < 1 and 0 < result["ncc"] < 1


def test_volumes_scored_in_thin_slabs_score_as_a_whole(monkeypatch):
    rng = np.random.default_rng(5)
    label = ndimage.gaussian_filter(rng.random((23, 19, 17)), 1.5)
    aligned = np.roll(label, 1, axis=1) + 0.01 * rng.random(label.shape)
    mask = ndimage.gaussian_filter(rng.random(label.shape), 2) > 0.5
    whole = [registration_metrics(aligned, label), registration_metrics(aligned, label, mask)]
    assert whole[0]["ssim"] == pytest.approx(structural_similarity(aligned, label, data_range=1.0), abs=1e-12)
    monkeypatch.setattr(registration_module, "_SLAB_VOXELS", 1)  # cores of 12 planes: the 17 interior planes in two slabs
    sliced = [registration_metrics(aligned, label), registration_metrics(aligned, label, mask)]
    for by_slabs, at_once in zip(sliced, whole, strict=True):
        assert by_slabs == pytest.approx(at_once, rel=1e-12, abs=1e-12)
        assert by_slabs["ncc"] == at_once["ncc"] and by_slabs["mse"] == at_once["mse"]


@pytest.mark.parametrize("shape", [(6, 24, 24), (2, 24, 24), (24, 5)])
def test_an_image_too_small_for_the_ssim_window_gets_nan_ssim_and_the_other_metrics(shape):
    """As fusion_metrics scores a metric whose window does not fit: NaN for it, not an error that
    loses MSE and NCC too (``unifuse fuse --label`` on a 6-slice volume failed after the fusion)."""
    rng = np.random.default_rng(0)
    label = rng.random(shape)
    aligned = label + 0.1 * rng.random(shape)
    result = registration_metrics(aligned, label)
    assert np.isnan(result["ssim"])
    assert result["mse"] == pytest.approx(np.mean((aligned - label) ** 2))
    assert result["ncc"] == pytest.approx(np.corrcoef(aligned.ravel(), label.ravel())[0, 1])


def test_bad_registration_inputs_raise_input_error(source_pair):
    a, b = source_pair
    with pytest.raises(InputError, match="mask"):
        registration_metrics(a, b, mask=np.zeros((3, 3), dtype=bool))
    with pytest.raises(InputError, match="no voxels"):
        registration_metrics(a, b, mask=np.zeros(a.shape, dtype=bool))
    with pytest.raises(InputError, match="same shape"):
        registration_metrics(a, b[1:])


def test_grey_level_images_need_their_data_range_rather_than_scoring_as_unit_intensities(source_pair):
    """uint8 images scored with the [0, 1] data range gave SSIM 0.38 for 0.43, and an MSE in grey levels²."""
    a, b = (np.round(image * 255).astype(np.uint8) for image in source_pair)
    with pytest.raises(InputError, match="data_range=255") as refused:
        registration_metrics(a, b)
    assert refused.value.source == "aligned"
    given = registration_metrics(a, b, data_range=255)
    assert given["ssim"] == pytest.approx(structural_similarity(b, a, data_range=255))
    assert registration_metrics(a / 255, b / 255)["ssim"] == pytest.approx(given["ssim"])
    mask = np.ones(a.shape, dtype=np.uint8)  # whole numbers in [0, 1] are unit intensities
    assert registration_metrics(mask, mask)["mse"] == 0


def identity_grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij"))


@pytest.mark.parametrize("shape", [(9, 11), (7, 9, 8)])
def test_identity_field_has_unit_determinant_and_no_folding(shape):
    u = np.zeros((len(shape), *shape))
    np.testing.assert_allclose(jacobian_determinant(u), 1.0)
    assert folding_percentage(u) == 0
    assert sd_log_jacobian(u) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("shape", [(9, 11), (7, 9, 8)])
def test_uniform_scaling_has_determinant_scale_to_the_ndim(shape):
    u = 0.2 * identity_grid(shape)  # x → 1.2·x
    np.testing.assert_allclose(jacobian_determinant(u), 1.2 ** len(shape))
    assert sd_log_jacobian(u) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("shape", [(12, 15), (6, 7, 8)])
def test_jacobian_determinant_matches_numpy_det_of_the_stacked_matrices(shape):
    rng = np.random.default_rng(3)
    u = np.stack([ndimage.gaussian_filter(rng.normal(0, 3, shape), 1) for _ in shape])
    matrices = np.empty((*shape, len(shape), len(shape)))
    for component in range(len(shape)):
        for axis, derivative in enumerate(np.gradient(u[component])):
            matrices[..., component, axis] = derivative + (component == axis)
    np.testing.assert_allclose(jacobian_determinant(u), np.linalg.det(matrices), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth", [2, 5, 9])
def test_jacobian_of_a_volume_in_slabs_is_bitwise_the_whole_computation(monkeypatch, depth):
    rng = np.random.default_rng(6)
    u = np.stack([ndimage.gaussian_filter(rng.normal(0, 4, (depth, 7, 6)), 1) for _ in range(3)]).astype(np.float32)
    whole = jacobian_determinant(u)
    monkeypatch.setattr(registration_module, "_SLAB_VOXELS", 1)  # cores of 4 planes, the last one shorter
    np.testing.assert_array_equal(jacobian_determinant(u), whole)
    np.testing.assert_array_equal(whole, jacobian_determinant(u.astype(np.float64)))


def test_regularity_from_one_determinant_map_equals_the_per_field_figures():
    rng = np.random.default_rng(4)
    u = np.stack([ndimage.gaussian_filter(rng.normal(0, 8, (12, 13, 14)), 1) for _ in range(3)])
    regularity = jacobian_regularity(jacobian_determinant(u))
    assert regularity.folding_percentage == folding_percentage(u) > 0
    assert regularity.sd_log_jacobian == sd_log_jacobian(u) > 0


def test_a_mirrored_slab_folds_the_expected_percentage():
    shape = (20, 6, 6)
    # φ_z has slope −1 between z = 8 and 12 and +1 elsewhere. Central differences average the two
    # neighbouring slopes, so det J = ∂φ_z/∂z ≤ 0 on z = 8…12 (at z = 8 and 12 it is exactly 0):
    # 5 of the 16 slices left after Learn2Reg's 2-voxel crop.
    slopes = np.where((np.arange(shape[0] - 1) >= 8) & (np.arange(shape[0] - 1) < 12), -1.0, 1.0)
    phi_z = np.concatenate([[0.0], np.cumsum(slopes)])
    u = np.zeros((3, *shape))
    u[0] = (phi_z - np.arange(shape[0]))[:, None, None]
    assert folding_percentage(u) == pytest.approx(100 * 5 / 16)


def test_jacobian_matches_simpleitk_on_a_smooth_random_field():
    rng = np.random.default_rng(7)
    shape = (10, 12, 14)  # three different sizes so a swapped axis cannot pass
    u = np.stack([ndimage.gaussian_filter(rng.normal(0, 6, shape), 2) for _ in range(3)])
    # ITK wants the vector components in x, y, z order; the image axes reverse on the way in and out.
    itk_field = sitk.GetImageFromArray(np.moveaxis(u[::-1], 0, -1), isVector=True)
    itk_determinant = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(itk_field))
    interior = (slice(1, -1),) * 3  # ITK's boundary handling differs from np.gradient's one-sided ends
    np.testing.assert_allclose(jacobian_determinant(u)[interior], itk_determinant[interior], rtol=1e-4, atol=1e-5)


def learn2reg_jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """MDL-UzL/L2R evaluation/utils.py ``jacobian_determinant`` for a (1, 3, H, W, D) field."""
    kernels = [np.array([-0.5, 0, 0.5]).reshape(shape) for shape in ((1, 3, 1, 1), (1, 1, 3, 1), (1, 1, 1, 3))]
    grad_disp = np.concatenate(
        [
            np.stack([ndimage.correlate(disp[:, c], kernel, mode="constant", cval=0.0) for c in range(3)], axis=1)
            for kernel in kernels
        ],
        0,
    )
    jacobian = (grad_disp + np.eye(3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    return np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))


def test_folding_and_sdlogj_match_learn2reg_on_a_rough_field():
    rng = np.random.default_rng(8)
    u = np.stack([ndimage.gaussian_filter(rng.normal(0, 8, (12, 10, 11)), 1) for _ in range(3)])
    reference = learn2reg_jacobian_determinant(u[np.newaxis])
    assert (reference <= 0).any(), "the test field should fold somewhere"
    assert folding_percentage(u) == pytest.approx(100 * np.mean(reference <= 0))
    assert sd_log_jacobian(u) == pytest.approx(np.log(np.clip(reference + 3, 1e-9, 1e9)).std())


def test_a_grid_too_thin_for_learn2regs_border_crop_has_undefined_regularity():
    """A 4-pixel-tall picture fuses; its folding and SDlogJ are undefined, not an error that fails the pair."""
    regularity = jacobian_regularity(jacobian_determinant(np.zeros((2, 4, 30))))
    assert np.isnan(regularity.folding_percentage) and np.isnan(regularity.sd_log_jacobian)
    assert folding_percentage(np.zeros((2, 5, 30))) == 0.0


def test_bad_displacement_fields_raise_input_error():
    with pytest.raises(InputError, match="shape"):
        jacobian_determinant(np.zeros((3, 8, 8)))  # 3 components for a 2D field
    with pytest.raises(InputError, match="NaN"):
        jacobian_determinant(np.full((2, 6, 6), np.nan))


def test_end_point_error_over_the_grid_and_inside_a_mask():
    truth = np.zeros((2, 6, 8))
    truth[0, :3] = 3.0  # the top half moves 3 voxels along y, the bottom half stays
    estimate = np.zeros_like(truth)
    estimate[1, :3] = 4.0  # the top half estimated 4 voxels along x: |(-3, 4)| = 5 there
    assert end_point_error(estimate, truth) == pytest.approx(2.5)
    top = np.zeros((6, 8), dtype=bool)
    top[:3] = True
    assert end_point_error(estimate, truth, top) == pytest.approx(5.0)
    assert end_point_error(estimate, truth, ~top) == 0.0
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(2, 3, 5, 6, 7))
    assert end_point_error(u, v) == pytest.approx(np.sqrt(((u - v) ** 2).sum(axis=0)).mean())


def test_end_point_error_in_mm_weighs_each_component_by_its_voxel_size():
    truth = np.zeros((3, 4, 5, 6))
    estimate = truth.copy()
    estimate[0] = 1.0  # one voxel off across 3 mm slices ...
    estimate[2, :2] = 2.0  # ... and, in half the volume, two 0.5 mm voxels off along x
    assert end_point_error(estimate, truth) == pytest.approx((1.0 + np.sqrt(5.0)) / 2)
    assert end_point_error(estimate, truth, spacing=(3.0, 0.8, 0.5)) == pytest.approx((3.0 + np.sqrt(10.0)) / 2)
    half = np.zeros((4, 5, 6), dtype=bool)
    half[2:] = True
    assert end_point_error(estimate, truth, half, (3.0, 0.8, 0.5)) == pytest.approx(3.0)
    rng = np.random.default_rng(4)
    u, v = rng.normal(size=(2, 2, 7, 9))
    sizes = np.array([2.5, 0.7])[:, None, None]
    assert end_point_error(u, v, spacing=(2.5, 0.7)) == pytest.approx(np.linalg.norm((u - v) * sizes, axis=0).mean())
    for wrong in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, np.nan, 1.0)):
        with pytest.raises(InputError, match="voxel sizes"):
            end_point_error(estimate, truth, spacing=wrong)


def test_end_point_error_refuses_mismatched_inputs():
    with pytest.raises(InputError, match="true field"):
        end_point_error(np.zeros((2, 6, 6)), np.zeros((2, 6, 7)))
    with pytest.raises(InputError, match="mask shape"):
        end_point_error(np.zeros((2, 6, 6)), np.zeros((2, 6, 6)), np.ones((5, 6), dtype=bool))
    with pytest.raises(InputError, match="no voxels"):
        end_point_error(np.zeros((2, 6, 6)), np.zeros((2, 6, 6)), np.zeros((6, 6), dtype=bool))


@pytest.mark.parametrize("shape", [(64, 64), (9, 11, 13)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_field_of_constant_determinant_has_an_sdlogj_of_exactly_zero(shape, dtype):
    """The identity's SDlogJ read 2.22e-16 (the float rounding of a mean) in evaluation.md."""
    for field in (np.zeros((len(shape), *shape), dtype), np.full((len(shape), *shape), 3.7, dtype)):  # + a shift
        assert sd_log_jacobian(field) == 0.0
        assert jacobian_regularity(jacobian_determinant(field)).sd_log_jacobian == 0.0
