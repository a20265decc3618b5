"""Each UniFuse loss on a case whose answer is known in closed form or from an independent library."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_unifuse.training import losses


def _infonce(positive: float, negatives: list[float], temperature: float) -> float:
    """Eq. 5 written out for given cosine similarities."""
    numerator = math.exp(positive / temperature)
    return -math.log(numerator / (numerator + sum(math.exp(s / temperature) for s in negatives)))


def _smooth_image(shape, seed):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2.0)


# --- SSIM -------------------------------------------------------------------------------------


def test_ssim_matches_skimage_on_2d_images():
    a = _smooth_image((48, 56), 0)
    b = np.clip(a + 0.05 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    expected = structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    got = losses.ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None]).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert expected < 0.99  # the case is not trivially identical


def test_ssim_matches_skimage_on_a_3d_volume():
    a = _smooth_image((20, 24, 22), 2)
    b = 0.7 * a + 0.1
    expected = structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    got = losses.ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None]).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_ssim_loss_is_zero_for_identical_images_and_positive_otherwise():
    x = torch.rand(2, 1, 32, 32)
    assert losses.ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.ssim_loss(x, torch.rand(2, 1, 32, 32)).item() > 0.5


# --- Sobel and the fusion terms ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(17, 23), (9, 11, 13)])
def test_sobel_magnitude_matches_scipy(shape):
    x = np.random.default_rng(3).random(shape)
    expected = sum(np.abs(ndimage.sobel(x, axis=a, mode="nearest")) for a in range(x.ndim))
    got = losses.sobel_magnitude(torch.tensor(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_gradient_loss_is_zero_when_fused_carries_the_sharper_gradients():
    # Reference: an edge in the left half; moving: a weaker edge in the right half. A fused image
    # containing both full-strength structures has exactly max(|∇R|, |∇D|) everywhere.
    reference = torch.zeros(1, 1, 32, 32)
    reference[..., 8:, :8] = 1.0
    moving = torch.zeros(1, 1, 32, 32)
    moving[..., 24:, 20:] = 0.5
    fused = reference + moving
    assert losses.gradient_loss(fused, moving, reference).item() == pytest.approx(0.0, abs=1e-7)
    # Dropping the moving image's edge loses exactly its Sobel magnitude.
    expected = losses.sobel_magnitude(moving).mean().item()
    assert losses.gradient_loss(reference, moving, reference).item() == pytest.approx(expected, rel=1e-6)


def test_intensity_loss_is_the_mean_gap_to_the_pixelwise_maximum():
    reference = torch.tensor([[[[0.2, 0.8], [0.5, 0.0]]]])
    moving = torch.tensor([[[[0.6, 0.1], [0.5, 0.3]]]])
    assert losses.intensity_loss(torch.maximum(reference, moving), moving, reference).item() == 0.0
    fused = torch.zeros_like(reference)
    assert losses.intensity_loss(fused, moving, reference).item() == pytest.approx((0.6 + 0.8 + 0.5 + 0.3) / 4)


def test_structure_loss_sums_both_ssim_terms():
    images = [_smooth_image((40, 40), seed) for seed in (4, 5, 6)]
    fused, moving, reference = images

    def skimage_ssim(a, b):
        return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, use_sample_covariance=False)

    expected = (1 - skimage_ssim(fused, moving)) + (1 - skimage_ssim(fused, reference))
    fused_t, moving_t, reference_t = (torch.tensor(image)[None, None] for image in images)
    assert losses.structure_loss(fused_t, moving_t, reference_t).item() == pytest.approx(expected, abs=1e-6)


def _two_source_pair(shape=(48, 48)):
    """Each source holds a bright structure that the other lacks, on shared anatomy."""
    anatomy = torch.tensor(_smooth_image(shape, 7))
    reference, moving = anatomy.clone(), 0.5 * anatomy
    reference[8:20, 8:20] = 1.0
    moving[28:40, 28:40] = 1.0
    return reference[None, None], moving[None, None]


def test_balance_loss_is_the_worse_sources_ssim_loss():
    reference, moving = _two_source_pair()
    for fused in (reference, moving, (reference + moving) / 2):
        expected = max(losses.ssim_loss(fused, moving).item(), losses.ssim_loss(fused, reference).item())
        assert losses.balance_loss(fused, moving, reference).item() == pytest.approx(expected, abs=1e-6)


def test_balance_loss_ranks_a_copy_of_either_source_below_a_fusion_of_both():
    reference, moving = _two_source_pair()
    average = losses.balance_loss((reference + moving) / 2, moving, reference).item()
    for copy in (reference, moving):
        assert losses.balance_loss(copy, moving, reference).item() > average + 0.05


def test_color_loss_masks_grayscale_samples():
    target = torch.full((2, 2, 24, 24), 0.5, dtype=torch.float64)
    fused = target.clone()
    fused[1] += 0.25  # only the grayscale sample is wrong
    is_color = torch.tensor([1.0, 0.0])
    assert losses.color_loss(fused, target, is_color).item() == pytest.approx(0.0, abs=1e-6)
    # Constant offset 0.25 on a colour sample: L1 = 0.25 plus the SSIM luminance term.
    offset_ssim = ((2 * 0.5 * 0.75 + 1e-4) / (0.5**2 + 0.75**2 + 1e-4))
    got = losses.color_loss(fused, target, torch.tensor([0.0, 1.0])).item()
    assert got == pytest.approx(0.25 + 1 - offset_ssim, abs=1e-5)


def test_restoration_loss_is_zero_only_for_a_perfect_restoration():
    label = torch.rand(1, 1, 24, 24)
    assert losses.restoration_loss(label, label).item() == pytest.approx(0.0, abs=1e-6)
    shifted = label + 0.1
    expected = 0.1 + losses.ssim_loss(shifted, label).item()
    assert losses.restoration_loss(shifted, label).item() == pytest.approx(expected, rel=1e-5)


# --- L_ce, L_moda, L_reg ----------------------------------------------------------------------


def test_classification_loss_is_cross_entropy_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 3])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 3)) + math.log(4)) / 2
    assert losses.classification_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_with_orthogonal_features_matches_eq5():
    # 8 positions, each feature a distinct basis vector: sim(positive) = 1, sim(negatives) = 0.
    tokens = torch.eye(8)[None].repeat(2, 1, 1)
    k = 5
    got = losses.contrastive_loss(tokens, tokens, num_negatives=k, temperature=0.1)
    assert got.item() == pytest.approx(_infonce(1.0, [0.0] * k, 0.1), rel=1e-5)


def test_contrastive_loss_with_identical_features_everywhere_is_log_one_plus_k():
    tokens = torch.ones(1, 6, 4)
    k = 7
    got = losses.contrastive_loss(tokens, tokens, num_negatives=k, temperature=0.1)
    assert got.item() == pytest.approx(math.log(1 + k), rel=1e-6)


def test_contrastive_loss_with_two_positions_uses_the_other_one_as_negative():
    # Two positions, so every negative is the other position: sims are fixed by construction.
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    angle = math.radians(60)
    candidates = torch.tensor([[[math.cos(angle), math.sin(angle)], [-1.0, 0.0]]])
    # Anchor 0: positive cos60 = 0.5, negative (-1, 0) -> -1.  Anchor 1: positive 0, negative sin60.
    expected = (_infonce(0.5, [-1.0] * 3, 0.1) + _infonce(0.0, [math.sin(angle)] * 3, 0.1)) / 2
    got = losses.contrastive_loss(anchors, candidates, num_negatives=3, temperature=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_loss_accepts_spatial_feature_maps():
    maps = torch.randn(2, 16, 4, 4, 4)
    loss = losses.contrastive_loss(maps, maps, num_negatives=4, max_anchors=10)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Matching features score far better than unrelated ones.
    assert loss < losses.contrastive_loss(maps, torch.randn_like(maps), num_negatives=4, max_anchors=10)


def test_registration_loss_is_zero_for_equal_fields_and_squared_offset_norm_for_a_shift():
    field = torch.randn(2, 3, 6, 7, 8)
    assert losses.registration_loss(field, field).item() == 0.0
    offset = torch.tensor([0.5, -1.0, 2.0]).reshape(1, 3, 1, 1, 1)
    assert losses.registration_loss(field + offset, field).item() == pytest.approx(0.25 + 1 + 4, rel=1e-6)


def test_smoothness_loss_of_a_linear_field():
    # u_x = 0.3 * y: the only non-zero derivative is ∂u_x/∂y = 0.3.
    y = torch.arange(10.0).reshape(10, 1).expand(10, 12)
    field = torch.stack([torch.zeros(10, 12), 0.3 * y])[None]
    assert losses.smoothness_loss(field).item() == pytest.approx(0.09, rel=1e-5)
    assert losses.smoothness_loss(torch.ones(1, 2, 5, 5) * 4).item() == 0.0


def test_losses_backpropagate_in_3d():
    fused = torch.rand(1, 1, 12, 12, 12, requires_grad=True)
    reference = torch.rand(1, 1, 12, 12, 12)
    moving = torch.rand(1, 1, 12, 12, 12)
    total = (
        losses.structure_loss(fused, moving, reference)
        + losses.intensity_loss(fused, moving, reference)
        + losses.gradient_loss(fused, moving, reference)
    )
    total.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
