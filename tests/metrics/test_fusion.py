"""Fusion metrics: known values, flat input, scale handling, and independent references.

References used: torchmetrics VIF-P (Q_vif), scikit-image SSIM / PSNR / NMI / Shannon entropy
(Q_ssim, Q_s, Q_psnr, NMI, EN), scikit-learn ``mutual_info_score`` (MI), numpy ``corrcoef`` (Q_cc, Q_scd).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage, signal
from skimage.measure import shannon_entropy
from skimage.metrics import normalized_mutual_information as skimage_nmi
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import mutual_info_score
from torchmetrics.functional.image import visual_information_fidelity

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.errors import InputError
from napari_unifuse.metrics import (
    METRIC_NAMES,
    average_gradient,
    entropy,
    fusion_metrics,
    mutual_information,
    normalized_mutual_information,
    q_abf,
    q_cb,
    q_cc,
    q_psnr,
    q_s,
    q_scd,
    q_ssim,
    q_vif,
    ssim_gains,
)

# Q^{AB/F} of a perfect transfer: strength term saturates at Tg, orientation term at Ta/(1+e^{22·(1−0.8)·−1}).
PERFECT_QABF = 0.9994 * 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))


def test_fusing_an_image_with_itself_gives_the_ideal_values(source_pair):
    levels = np.round(source_pair[0] * 255).astype(np.uint8)
    a = levels / 255  # on grey levels: none near a half level, where the metrics' rounding is their own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fusion_metrics(a, a, a)
    assert set(result) == set(METRIC_NAMES)
    assert result["Q_mse"] == 0
    assert result["Q_cc"] == pytest.approx(1)
    assert result["Q_psnr"] == math.inf
    assert result["Q_ssim"] == pytest.approx(2)
    assert result["Q_vif"] == pytest.approx(2, abs=1e-6)
    assert result["Q_s"] == pytest.approx(1)
    # Exactly PERFECT_QABF only where edges are strong: the references score g_A = g_F by g_F itself.
    assert 0.97 < result["Q_abf"] <= PERFECT_QABF
    assert result["Q_cv"] == pytest.approx(0, abs=1e-9)
    assert result["NMI"] == pytest.approx(2)
    # I(A; A) = H(A): MI of F = A = B is twice the entropy (in nats) of A's grey levels.
    assert result["MI"] == pytest.approx(2 * shannon_entropy(levels, base=math.e))
    assert result["EN"] == pytest.approx(shannon_entropy(levels, base=2))
    assert math.isnan(result["Q_scd"])  # correlations with F − A = 0 are undefined


def test_flat_images_give_documented_values_without_warnings():
    flat = np.zeros((48, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fusion_metrics(flat, flat, flat)
        grey = fusion_metrics(flat + 0.5, flat + 0.5, flat + 0.5)
    # The references' zero-padded Sobel filters see the border of a non-zero flat image as an edge.
    assert grey["Q_abf"] == pytest.approx(PERFECT_QABF)
    assert result["Q_mse"] == 0 and result["Q_psnr"] == math.inf
    assert result["EN"] == 0 and result["AG"] == 0 and result["MI"] == 0
    assert result["Q_ssim"] == pytest.approx(2) and result["Q_s"] == pytest.approx(1)
    assert result["Q_vif"] == 2  # CDDFuse scores a source without variance as 1
    for undefined in ("Q_cc", "Q_scd", "Q_abf", "Q_cv", "NMI"):
        assert math.isnan(result[undefined]), undefined


@pytest.mark.parametrize("level", [0.0, 0.5])
def test_a_flat_fused_image_beside_sources_with_contrast_scores_the_worst_not_undefined(source_pair, level):
    """A black or blank output is a failed fusion: NaN (Q_cc) or −inf (Q_psnr) left it out of
    evaluate's means, so that a method scored better for the pairs it failed on."""
    a, b = source_pair
    flat = np.full_like(a, level)
    assert q_cc(flat, a, b) == 0  # F follows neither source's variation
    psnr = q_psnr(flat, a, b)
    assert np.isfinite(psnr) and psnr < q_psnr(0.5 * (a + b), a, b)
    assert math.isnan(q_cc(flat, flat, b))  # a flat source still leaves its correlation undefined


def test_unit_and_grey_scale_inputs_give_the_same_metrics(source_pair):
    a, b = source_pair
    fused = np.maximum(a, b)
    on_unit = fusion_metrics(fused, a, b)
    on_grey = fusion_metrics(fused * 255, a * 255, b * 255)
    assert on_grey == pytest.approx(on_unit, rel=1e-9, abs=1e-12)


def test_each_image_keeps_its_own_scale_and_an_ambiguous_one_is_refused(source_pair):
    """One fused value of 1.00002 beside [0, 1] sources, or a uint8 source beside [0, 1] floats,
    read all three as 0–255 (MI 2.6 → 0.2) without a word."""
    a, b = source_pair
    fused = np.maximum(a, b)
    on_unit = fusion_metrics(fused, a, b)
    grey_a = np.round(a * 255).astype(np.uint8)
    mixed = fusion_metrics(fused, grey_a, b)
    assert mixed == pytest.approx(fusion_metrics(fused, grey_a / 255.0, b), rel=1e-9, abs=1e-12)
    assert mixed["MI"] == pytest.approx(on_unit["MI"], rel=0.05)

    overshoot = fused.copy()
    overshoot.flat[0] = 1.00002
    with pytest.raises(InputError, match="clip them to") as refused:
        fusion_metrics(overshoot, a, b)
    assert refused.value.source == "fused"


def test_round_off_below_0_is_tolerated_as_it_is_above_1_and_a_real_negative_refused(source_pair):
    a, b = source_pair
    fused = 0.5 * (a + b)
    fused[0, 0] = 0.0
    undershoot, negative = fused.copy(), fused.copy()
    undershoot[0, 0], negative[0, 0] = -1e-9, -0.01
    assert fusion_metrics(undershoot, a, b) == pytest.approx(fusion_metrics(fused, a, b), rel=1e-12, nan_ok=True)
    with pytest.raises(InputError, match="normalise") as refused:
        fusion_metrics(negative, a, b)
    assert refused.value.source == "fused"


def test_bad_inputs_raise_input_error(source_pair):
    a, b = source_pair
    with pytest.raises(InputError, match="same shape"):
        fusion_metrics(a, b[:-1], b)
    with pytest.raises(InputError, match="normalise"):
        fusion_metrics(a * 1000, a, b)
    with pytest.raises(InputError, match="NaN"):
        fusion_metrics(np.full_like(a, np.nan), a, b)
    with pytest.raises(InputError, match="41"):
        q_vif(a[:32, :32], a[:32, :32], b[:32, :32])
    with pytest.raises(InputError, match="2D"):
        fusion_metrics(a[0], a[0], b[0])


@pytest.mark.parametrize("metric", [fusion_metrics, q_abf, q_ssim, mutual_information, ssim_gains, q_cb])
def test_a_colour_image_is_refused_with_a_pointer_to_its_luma(source_pair, metric):
    """An (y, x, 3) image was scored as y slices 3 pixels wide: numbers of no image, or NaN."""
    a, b = source_pair
    colour = np.round(np.stack([a, b, a], axis=-1) * 255).astype(np.uint8)
    with pytest.raises(InputError, match=r"colour image.*luma.*rgb_to_ycbcr") as refused:
        metric(colour, colour, colour)
    assert refused.value.source == "fused"
    luma = rgb_to_ycbcr(colour)[..., 0]
    assert np.isfinite(q_ssim(luma, luma, luma))


def test_rgba_single_images_and_small_volumes_are_told_apart(source_pair):
    a, b = source_pair
    rgba = np.round(np.stack([a, b, a, np.ones_like(a)], axis=-1) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="colour image") as refused:
        fusion_metrics(np.stack([a] * 4, axis=-1), rgba, rgba)
    assert refused.value.source == "fused"
    for single in (entropy, average_gradient):
        with pytest.raises(InputError, match="colour image"):
            single(rgba)
    # Three slices, and a few slices 3 pixels wide, stay volumes.
    three_slices = fusion_metrics(np.stack([a, b, a]), np.stack([a, a, a]), np.stack([b, b, b]))
    assert np.isfinite(three_slices["Q_ssim"])
    strips = lambda image: np.stack([image[:, 30 + z : 33 + z] for z in range(5)])  # noqa: E731
    thin = fusion_metrics(strips(0.5 * (a + b)), strips(a), strips(b))
    assert np.isfinite(thin["Q_mse"]) and math.isnan(thin["Q_ssim"])  # (5, 64, 3): too narrow for SSIM


def test_slices_too_small_for_a_metric_score_it_nan_and_the_others_as_alone(source_pair):
    """A 32³ pair stopped a whole evaluation on Q_vif's 41×41 minimum."""
    a, b = (image[:32, :32] for image in source_pair)
    fused = np.maximum(a, b)
    result = fusion_metrics(fused, a, b)
    assert math.isnan(result["Q_vif"]) and set(result) == set(METRIC_NAMES)
    assert result["Q_abf"] == q_abf(fused, a, b) and result["MI"] == mutual_information(fused, a, b)
    tiny = fusion_metrics(fused[:1, :1], a[:1, :1], b[:1, :1])
    assert math.isnan(tiny["AG"]) and math.isnan(tiny["Q_ssim"]) and tiny["EN"] == 0.0


def test_q_vif_matches_torchmetrics(source_pair):
    a, b = source_pair
    rng = np.random.default_rng(1)
    fused = np.clip(0.5 * (a + b) + rng.normal(0, 0.03, a.shape), 0, 1)

    def torchmetrics_vif(reference: np.ndarray) -> float:
        as_tensor = lambda image: torch.from_numpy(image * 255)[None, None]  # noqa: E731
        return float(visual_information_fidelity(as_tensor(fused), as_tensor(reference)))

    assert q_vif(fused, a, b) == pytest.approx(torchmetrics_vif(a) + torchmetrics_vif(b), rel=1e-9)


def test_q_ssim_is_the_sum_of_skimage_ssims(source_pair):
    a, b = source_pair
    fused = 0.6 * a + 0.4 * b
    expected = sum(structural_similarity(fused * 255, s * 255, data_range=255) for s in (a, b))
    assert q_ssim(fused, a, b) == pytest.approx(expected)
    assert 1 < expected < 2  # a good fusion exceeds 1, as in UniFuse's tables


def test_q_s_reduces_to_wang_ssim_when_both_sources_agree(source_pair):
    a, b = source_pair
    # λ·SSIM(F,A) + (1−λ)·SSIM(F,A) = SSIM(F,A): Wang's Gaussian SSIM over the 'valid' region.
    _, ssim_map = structural_similarity(
        b * 255, a * 255, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
    )
    assert q_s(b, a, a) == pytest.approx(ssim_map[5:-5, 5:-5].mean())
    assert q_s(a, a, b) == pytest.approx(q_s(a, b, a))  # symmetric in the sources
    assert q_s(a, a, b) > q_s(np.flipud(a), a, b)


def _q_s_by_the_formula(fused: np.ndarray, a: np.ndarray, b: np.ndarray, equal_weights: bool = False) -> float:
    """Piella's Q_s written out on 0–255 images: Wang's 11×11 Gaussian window (σ 1.5) as an explicit
    kernel, 'valid' correlation, λ = σ²_A / (σ²_A + σ²_B), or ½ everywhere with ``equal_weights``."""
    offsets = np.arange(-5, 6)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    kernel /= kernel.sum()
    mean = lambda image: signal.correlate2d(image, kernel, mode="valid")  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def ssim_and_variances(x, y):
        mu_x, mu_y = mean(x), mean(y)
        var_x, var_y, cov = mean(x * x) - mu_x**2, mean(y * y) - mu_y**2, mean(x * y) - mu_x * mu_y
        ssim = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        return ssim, var_x, var_y

    fused, a, b = (image * 255 for image in (fused, a, b))
    _, var_a, var_b = ssim_and_variances(a, b)
    weight_a = 0.5 if equal_weights else var_a / (var_a + var_b)
    return float(np.mean(weight_a * ssim_and_variances(fused, a)[0] + (1 - weight_a) * ssim_and_variances(fused, b)[0]))


def test_q_s_weighs_each_window_by_the_sources_local_variances(source_pair):
    a, b = source_pair  # textured everywhere: no window is flat, λ varies from window to window
    fused = np.clip(0.7 * a + 0.3 * b + 0.05 * np.flipud(a), 0, 1)
    assert q_s(fused, a, b) == pytest.approx(_q_s_by_the_formula(fused, a, b), rel=1e-9)
    assert q_s(fused, a, b) != pytest.approx(_q_s_by_the_formula(fused, a, b, equal_weights=True), rel=1e-3)


def test_q_s_weighs_windows_flat_in_both_sources_alike_whatever_their_round_off():
    """λ compared the round-off of two flat backgrounds' variances: Q_s 0.53 → 0.71 when A's
    background moved from 0.25 to 0.2500001."""
    b = np.full((64, 64), 0.1)
    b[10:30, 30:50] = 0.6
    scores = []
    for background in (0.25, 0.2500001):
        a = np.full((64, 64), background)
        a[20:40, 20:40] = 0.9
        scores.append(q_s((a + b) / 2, a, b))
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_q_psnr_matches_skimage_when_sources_agree(source_pair):
    a, _ = source_pair
    fused = np.clip(a + 0.05, 0, 1)
    expected = peak_signal_noise_ratio(a * 255, fused * 255, data_range=fused.max() * 255)
    assert q_psnr(fused, a, a) == pytest.approx(expected)


def test_q_cc_and_q_scd_match_numpy_correlations(source_pair):
    a, b = source_pair
    fused = np.sqrt(a * b)
    r = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
    assert q_cc(fused, a, b) == pytest.approx((r(a, fused) + r(b, fused)) / 2)
    assert q_scd(fused, a, b) == pytest.approx(r(a, fused - b) + r(b, fused - a))


def test_shifting_the_fused_image_lowers_correlation_and_mutual_information(source_pair):
    a, b = source_pair
    shifts = (0, 2, 6)
    cc = [q_cc(np.roll(a, s, axis=1), a, a) for s in shifts]
    mi = [mutual_information(np.roll(a, s, axis=1), a, a) for s in shifts]
    assert cc[0] > cc[1] > cc[2]
    assert mi[0] > mi[1] > mi[2]


def test_mutual_information_matches_scikit_learn(source_pair):
    grey_a, grey_b = (np.round(image * 255) for image in source_pair)
    a, b = grey_a / 255, grey_b / 255
    fused = 0.5 * (a + b)  # on half grey levels (to round-off), which round to even
    levels = [np.round(image).astype(np.uint8).ravel() for image in (0.5 * (grey_a + grey_b), grey_a, grey_b)]
    expected = mutual_info_score(levels[0], levels[1]) + mutual_info_score(levels[0], levels[2])
    assert mutual_information(fused, a, b) == pytest.approx(expected)


def test_histogram_metrics_of_an_average_do_not_depend_on_float_round_off_at_half_grey_levels():
    """A quarter of an 8-bit average's pixels lie on k + 0.5; round-off sent each up or down at
    random (EN 7.54 in float64, 7.65 in float32)."""
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(2))
    exact_levels = np.round((a.astype(float) + b) / 2).astype(np.uint8)  # exact halves, rounded to even
    expected_mi = mutual_info_score(exact_levels.ravel(), a.ravel()) + mutual_info_score(exact_levels.ravel(), b.ravel())
    expected_en = shannon_entropy(exact_levels, base=2)
    average = (a / 255 + b / 255) / 2
    for fused in (average, average.astype(np.float32), average + 1e-9 * rng.standard_normal(average.shape)):
        fused = np.clip(fused, 0, 1)
        assert mutual_information(fused, a, b) == pytest.approx(expected_mi, rel=1e-12)
        assert entropy(fused) == pytest.approx(expected_en, rel=1e-12)


def test_nmi_matches_skimage_normalized_mutual_information():
    rng = np.random.default_rng(2)
    # Full-range uint8 images so skimage's 256 bins over [min, max] are exactly the grey levels.
    a = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    b = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    fused = np.where(rng.random((48, 48)) < 0.5, a, b).astype(np.uint8)
    fused[0, :2], a[0, :2], b[0, :2] = (0, 255), (0, 255), (0, 255)
    # skimage's Y = (H(X) + H(F)) / H(X, F), so I / (H(X) + H(F)) = 1 − 1/Y.
    y = [skimage_nmi(s, fused, bins=256) for s in (a, b)]
    assert normalized_mutual_information(fused, a, b) == pytest.approx(2 * ((1 - 1 / y[0]) + (1 - 1 / y[1])))


def test_entropy_known_values():
    half_and_half = np.zeros((16, 16), dtype=np.uint8)
    half_and_half[:, 8:] = 200
    assert entropy(half_and_half) == pytest.approx(1.0)
    all_levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert entropy(all_levels) == pytest.approx(8.0)
    rng = np.random.default_rng(3)
    levels = np.round(ndimage.gaussian_filter(rng.random((40, 40)), 1) * 255).astype(np.uint8)
    assert entropy(levels / 255) == pytest.approx(shannon_entropy(levels, base=2))


def test_volumes_average_the_2d_metrics_over_non_empty_axial_slices(source_pair):
    a, b = source_pair
    fused = 0.5 * (a + b)
    volume = lambda image: np.stack([image, np.flipud(image), np.zeros_like(image)])  # noqa: E731
    per_slice = [q_ssim(fused, a, b), q_ssim(np.flipud(fused), np.flipud(a), np.flipud(b))]
    assert q_ssim(volume(fused), volume(a), volume(b)) == pytest.approx(np.mean(per_slice))


@pytest.mark.parametrize("metric", [q_vif, q_ssim, q_s, q_abf])
def test_slices_blank_in_both_sources_are_left_out_whatever_the_fused_volume_holds_there(source_pair, metric):
    """Faint noise a method leaves where both sources are blank made those slices count, with a
    near-perfect score (Q_vif 0.43 → 0.95): the slices averaged must be the sources' choice."""
    a, b = source_pair
    blank = np.zeros_like(a)
    volume_a, volume_b = np.stack([a, blank, a, blank]), np.stack([b, blank, b, blank])
    fused = 0.5 * (volume_a + volume_b)
    noisy = fused.copy()
    noisy[[1, 3]] = np.random.default_rng(1).uniform(0.0, 0.008, size=(2, *a.shape))
    assert metric(noisy, volume_a, volume_b) == pytest.approx(metric(fused[[0, 2]], volume_a[[0, 2]],
                                                                       volume_b[[0, 2]]))
