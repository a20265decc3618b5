"""Fusion quality metrics of the UniFuse, BSAFusion and MMIF-AMIN papers, and ``fusion_metrics``.

Every metric compares a fused image F with its two sources A and B (except EN and AG, which look
at F alone). Inputs are numpy arrays of one shape: 2D ``(y, x)`` images or 3D ``(z, y, x)`` volumes,
each read on its own by type and values: [0, 1] floats (the model's range) are multiplied by 255,
integer images and floats past 2 are taken as 0–255 grey levels, floats just above 1 (ambiguous),
negative values (beyond round-off) and values past 255 are an ``InputError`` (see
``_inputs.to_grey_scale``). The 0–255 scale is the one the reference evaluators assume (CDDFuse
reads 8-bit images; VIFB and Liu's MATLAB collection likewise), and it matters for VIF (its noise
variance 2 is in grey levels²), SSIM (its constants scale with the data range) and the histogram
metrics (EN, MI, NMI use 256 levels; values within 0.001 of a half grey level round as that half).

Metrics defined on 2D images (Q_vif, Q_ssim, Q_s here; Q_abf, Q_cv, AG in ``fusion_gradient``)
are computed on each axial slice of a volume and averaged (``mean_over_axial_slices``: slices where
A and B are both constant are skipped whatever F holds there, for AG in ``fusion_metrics`` too).
Metrics that are statistics of the voxel values (Q_mse, Q_cc, Q_psnr, Q_scd, EN, MI, NMI) use all
voxels at once. Colour (y, x, 3 or 4) images are refused: pass their luma.

Flat (constant) images: where a metric divides by a variance or an entropy that is zero, it is
undefined and returns NaN without warnings (Q_cc with a constant source, Q_scd with a constant
image, NMI when an image and F are both constant); a constant F beside sources with contrast
scores Q_cc 0, and a black F a finite Q_psnr (its peak taken as one grey level), so that a failed
fusion counts in a mean rather than dropping out; Q_psnr is +inf when F equals both sources;
Q_vif follows CDDFuse, which scores a constant source as 1. Nothing raises on flat input.

A copy of one source fools most of these: on aligned multimodal pairs F = A scores as well as or
better than the average 0.5·(A + B) on Q_ssim, Q_vif, Q_abf, Q_cv, Q_s, MI, NMI and AG for at
least one of the Harvard atlas tasks (issue 16), since each adds up what F keeps of A and of B and
a copy keeps all of A. Q_mse, Q_psnr and Q_cc ranked a copy below the average there; Q_scd is
undefined (NaN) for an exact copy. Beside these: ``fusion_gain.ssim_gains`` (gain_A, gain_B,
gain_min: SSIM to each source beyond what the other source alone reaches, 0 for a copy),
``fusion_perceptual`` (Chen–Blum Q_CB, Han's VIF_F; also fooled, see there) and
``retention.bone_retention``; ``unifuse evaluate`` marks every metric that a copy pipeline
outscores.

AFM (absolute feature measurement, Zhao et al. 2007), listed by MMIF-AMIN, is not implemented:
none of the papers defines it and no public reference implementation was found to match.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from napari_unifuse.metrics._inputs import (
    FUSION_INPUT_NAMES,
    fusion_metric,
    grey_levels,
    mean_over_axial_slices,
    to_grey_scale,
)
from napari_unifuse.metrics.fusion_gradient import average_gradient_on_grey_scale, q_abf, q_cv

GREY_RANGE = 255.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over all voxels; NaN (undefined) if either image is constant."""
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def _mean_squared_error(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((np.mean((a - fused) ** 2) + np.mean((b - fused) ** 2)) / 2)


@fusion_metric()
def q_mse(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_mse = (MSE(A, F) + MSE(B, F)) / 2 (CDDFuse ``Evaluator.MSE``), reported on the [0, 1] scale.

    Lower is better. CDDFuse computes it on 0–255 images; we divide by 255² because UniFuse's tables
    (Q_mse 0.006–0.06 for fusion, ~1e-4 for alignment) are only plausible on [0, 1] intensities.
    """
    return _mean_squared_error(fused, a, b) / GREY_RANGE**2


def _correlation_with_fused(source: np.ndarray, fused: np.ndarray) -> float:
    """r(source, F); 0 for a flat F beside a source with contrast, NaN only for a flat source.

    A flat (black, blank) F follows none of the source's variation: scored NaN, a failed fusion
    was left out of ``unifuse evaluate``'s means, which then rose for the method that failed.
    """
    if np.ptp(fused) == 0 and np.ptp(source) > 0:
        return 0.0
    return _pearson(source, fused)


@fusion_metric()
def q_cc(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_cc = (r(A, F) + r(B, F)) / 2 with Pearson's r over all voxels (CDDFuse ``Evaluator.CC``).

    A flat F scores 0 beside sources with contrast (the references divide by its zero variance);
    NaN only where a source is flat.
    """
    return (_correlation_with_fused(a, fused) + _correlation_with_fused(b, fused)) / 2


# Q_psnr's peak is at least one grey level: a black F's peak 0 gave −inf, which ``unifuse evaluate``
# left out of its means as undefined (a method scored better for the pairs it failed on).
_PSNR_MIN_PEAK = 1.0


@fusion_metric()
def q_psnr(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_psnr = 10·log10(max(F)² / Q_mse) in dB (CDDFuse ``Evaluator.PSNR``; scale-free).

    +inf when F equals both sources (no error), like ``skimage.metrics.peak_signal_noise_ratio``.
    The peak is taken as at least one grey level (1/255 of [0, 1]), so that a black F scores a
    finite worst value (CDDFuse: −inf); an F that reaches one grey level scores as there.
    """
    error = _mean_squared_error(fused, a, b)
    if error == 0:
        return float("inf")
    peak = max(float(fused.max()), _PSNR_MIN_PEAK)
    return float(10 * np.log10(peak**2 / error))


@fusion_metric()
def q_scd(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_scd = r(A, F − B) + r(B, F − A), the sum of the correlations of differences.

    Aslantas & Bendes 2015, as in CDDFuse ``Evaluator.SCD``. Undefined (NaN) when F − A or F − B is
    constant, e.g. for F = A = B.
    """
    return _pearson(a, fused - b) + _pearson(b, fused - a)


def _vif_filter(image: np.ndarray, size: int) -> np.ndarray:
    """``convolve2d(image, fspecial('gaussian', size, size / 5), 'valid')``, the VIF reference's window.

    The 2D Gaussian is the outer product of two normalised 1D ones, so two 1D passes give the same
    result (to round-off) ~size/2 times faster. (The reference zeroes window weights below
    eps·max; at these sizes the smallest weight is e^-5.5 of the largest, so none are.)
    """
    half = (size - 1) // 2
    weights = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * (size / 5) ** 2))
    weights /= weights.sum()
    blurred = ndimage.correlate1d(ndimage.correlate1d(image, weights, axis=0), weights, axis=1)
    return blurred[half:-half, half:-half]


# Below this a variance or a noise estimate counts as zero (the VIF references' 1e-10).
_VIF_EPS = 1e-10


def vif_scale_statistics(
    reference: np.ndarray, distorted: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sheikh & Bovik's pixel-domain VIF channel model of one 2D pair, per scale (four scales).

    Yields the ``'valid'`` maps ``(gain, reference_variance, noise_variance)`` of distorted =
    gain · reference + noise, with the references' special cases (flat reference: gain 0, all of
    the distorted variance is noise; flat distorted: gain and noise 0; negative gain: 0, all
    noise; noise floored at 1e-10). CDDFuse ``Evaluator.compare_viff`` and Han's
    ``VIFF_Public.m`` (``ComVidVindG``) compute exactly these maps before they differ.
    """
    for scale in range(1, 5):
        size = 2 ** (4 - scale + 1) + 1
        if scale > 1:
            reference = _vif_filter(reference, size)[::2, ::2]
            distorted = _vif_filter(distorted, size)[::2, ::2]
        mu1 = _vif_filter(reference, size)
        mu2 = _vif_filter(distorted, size)
        sigma1_sq = np.maximum(_vif_filter(reference * reference, size) - mu1 * mu1, 0)
        sigma2_sq = np.maximum(_vif_filter(distorted * distorted, size) - mu2 * mu2, 0)
        sigma12 = _vif_filter(reference * distorted, size) - mu1 * mu2

        gain = sigma12 / (sigma1_sq + _VIF_EPS)
        noise = sigma2_sq - gain * sigma12
        flat_reference = sigma1_sq < _VIF_EPS
        gain[flat_reference] = 0
        noise[flat_reference] = sigma2_sq[flat_reference]
        sigma1_sq[flat_reference] = 0
        flat_distorted = sigma2_sq < _VIF_EPS
        gain[flat_distorted] = 0
        noise[flat_distorted] = 0
        negative = gain < 0
        noise[negative] = sigma2_sq[negative]
        gain[negative] = 0
        yield gain, sigma1_sq, np.maximum(noise, _VIF_EPS)


def _pixel_vif(reference: np.ndarray, distorted: np.ndarray) -> float:
    """Sheikh & Bovik's pixel-domain VIF (four scales, noise variance 2) of one 2D image pair.

    A transcription of CDDFuse ``Evaluator.compare_viff``; a reference without any variance (which
    makes the ratio 0/0) scores 1, as there.
    """
    noise_variance = 2.0
    numerator = denominator = 0.0
    for gain, sigma1_sq, noise in vif_scale_statistics(reference, distorted):
        numerator += np.sum(np.log10(1 + gain * gain * sigma1_sq / (noise + noise_variance)))
        denominator += np.sum(np.log10(1 + sigma1_sq / noise_variance))
    return float(numerator / denominator) if denominator > 0 else 1.0


# Four dyadic scales with 'valid' filtering need 41 pixels per side (torchmetrics checks the same).
VIF_MIN_SIDE = 41


@fusion_metric(min_side=VIF_MIN_SIDE)
def q_vif(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_vif = VIF(A → F) + VIF(B → F), pixel-domain VIF summed over both sources.

    CDDFuse ``Evaluator.VIFF`` (the metric UniFuse reports; it can exceed 1). This is Sheikh & Bovik's
    VIF-P, not Han et al.'s VIFF. Matches ``torchmetrics.functional.image.visual_information_fidelity``
    (tested). Slices must be at least 41×41.
    """
    return mean_over_axial_slices(lambda f, s1, s2: _pixel_vif(s1, f) + _pixel_vif(s2, f), fused, a, b)


def ssim_2d(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two 0–255 2D images as Q_ssim takes it (skimage defaults, data range 255)."""
    return float(structural_similarity(x, y, data_range=GREY_RANGE))


# skimage's default SSIM window is 7×7.
SSIM_MIN_SIDE = 7


@fusion_metric(min_side=SSIM_MIN_SIDE)
def q_ssim(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q_ssim = SSIM(F, A) + SSIM(F, B), so 2 at best (CDDFuse ``Evaluator.SSIM``, as UniFuse reports).

    skimage's ``structural_similarity`` with its defaults (7×7 uniform window) and an explicit
    ``data_range=255``. (CDDFuse passed no data range; older scikit-image then took 2 for float input.)
    """
    return mean_over_axial_slices(lambda f, s1, s2: ssim_2d(f, s1) + ssim_2d(f, s2), fused, a, b)


# Wang et al.'s ssim_index.m: 11×11 Gaussian window, sigma 1.5, K = (0.01, 0.03), L = 255.
_WANG_RADIUS = 5
_WANG_C1 = (0.01 * GREY_RANGE) ** 2
_WANG_C2 = (0.03 * GREY_RANGE) ** 2


def _wang_filter(image: np.ndarray) -> np.ndarray:
    """``filter2(fspecial('gaussian', 11, 1.5), image, 'valid')``."""
    blurred = ndimage.gaussian_filter(image, sigma=1.5, radius=_WANG_RADIUS)
    return blurred[_WANG_RADIUS:-_WANG_RADIUS, _WANG_RADIUS:-_WANG_RADIUS]


def _wang_ssim_map(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSIM map of ``ssim_index.m`` ('valid' size) and the local variances of x and y."""
    mu_x, mu_y = _wang_filter(x), _wang_filter(y)
    var_x = _wang_filter(x * x) - mu_x**2
    var_y = _wang_filter(y * y) - mu_y**2
    cov = _wang_filter(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _WANG_C1) * (2 * cov + _WANG_C2)) / (
        (mu_x**2 + mu_y**2 + _WANG_C1) * (var_x + var_y + _WANG_C2)
    )
    return ssim_map, var_x, var_y


# A local variance E[x²] − E[x]² of a window on a flat background is not 0 but round-off of
# either sign, a few eps times the squared intensity (measured up to 5e-16·peak²). Below this
# fraction of the squared peak of the two sources a variance is taken as 0: far above round-off,
# and a standard deviation of 1e-5 of the peak (0.003 grey levels on 0–255) is no structure.
# Comparing two round-offs set λ to 0 or 1 at random (Q_s 0.53 → 0.71 when a background moved
# from 0.25 to 0.2500001).
_FLAT_VARIANCE_FRACTION = 1e-10


def _piella_2d(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    _, var_a, var_b = _wang_ssim_map(a, b)
    flat_below = _FLAT_VARIANCE_FRACTION * max(np.abs(a).max(), np.abs(b).max()) ** 2
    # Zeroing round-off also drops its negative values, so λ stays within [0, 1].
    var_a, var_b = (np.where(variance > flat_below, variance, 0.0) for variance in (var_a, var_b))
    both_flat = (var_a + var_b) == 0
    # metricPeilla.m adds 0.5 to both variances where both vanish, i.e. weighs A and B equally there.
    weight_a = np.where(both_flat, 0.5, var_a / np.where(both_flat, 1.0, var_a + var_b))
    ssim_fa = _wang_ssim_map(fused, a)[0]
    ssim_fb = _wang_ssim_map(fused, b)[0]
    return float(np.mean(weight_a * ssim_fa + (1 - weight_a) * ssim_fb))


@fusion_metric(min_side=2 * _WANG_RADIUS + 1)
def q_s(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Piella & Heijmans' fusion quality index Q_s (ICIP 2003): mean of λ·SSIM(F, A) + (1 − λ)·SSIM(F, B).

    λ = σ_A² / (σ_A² + σ_B²) per window (local saliency = variance). Follows Z. Liu's
    ``metricPeilla.m`` (imageFusionMetrics, case 1) with Wang's ``ssim_index.m`` maps (11×11
    Gaussian window, σ = 1.5, K = (0.01, 0.03), L = 255, 'valid' region). Slices must be ≥ 11×11.
    Where both sources are flat, λ = 0.5 as there; unlike there, a local variance below 1e-10 of the
    squared peak (round-off on a flat background) counts as flat, not only an exact 0.
    """
    return mean_over_axial_slices(_piella_2d, fused, a, b)


def _entropies(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Shannon entropies H(x), H(y), H(x, y) in nats of two uint8 grey-level images."""
    joint = np.bincount(x.ravel().astype(np.int64) * 256 + y.ravel(), minlength=256 * 256).reshape(256, 256)
    p_joint = joint / joint.sum()

    def entropy_of(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(0.0 - np.sum(p * np.log(p)))

    return entropy_of(p_joint.sum(axis=1)), entropy_of(p_joint.sum(axis=0)), entropy_of(p_joint)


def _mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    h_x, h_y, h_xy = _entropies(x, y)
    return h_x + h_y - h_xy


@fusion_metric()
def mutual_information(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """MI = I(F; A) + I(F; B) in nats over the 256 grey levels (CDDFuse ``Evaluator.MI``).

    CDDFuse calls scikit-learn's ``mutual_info_score`` on the rounded grey levels; we compute the same
    from the joint histogram (tested against scikit-learn).
    """
    f, a_levels, b_levels = (grey_levels(image) for image in (fused, a, b))
    return _mutual_information(f, a_levels) + _mutual_information(f, b_levels)


@fusion_metric()
def normalized_mutual_information(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """NMI = 2·[I(A; F) / (H(A) + H(F)) + I(B; F) / (H(B) + H(F))], in [0, 2].

    Hossny et al., "Comments on 'Information measure for performance of image fusion'" (2008), the NMI
    MMIF-AMIN cites; 256 grey levels. Undefined (NaN) if a source and F are both constant.
    """
    f = grey_levels(fused)
    total = 0.0
    for source in (a, b):
        h_source, h_fused, h_joint = _entropies(grey_levels(source), f)
        if h_source + h_fused == 0:
            return float("nan")
        total += (h_source + h_fused - h_joint) / (h_source + h_fused)
    return 2 * total


def _entropy_on_grey_scale(image: np.ndarray) -> float:
    counts = np.bincount(grey_levels(image).ravel(), minlength=256)
    p = counts[counts > 0] / image.size
    return float(0.0 - np.sum(p * np.log2(p)))  # 0.0 - … avoids returning -0.0


def entropy(image: object) -> float:
    """EN: Shannon entropy in bits of the image's 256-level grey histogram (CDDFuse ``Evaluator.EN``).

    Uses all voxels of a volume. Scaling as for the fusion metrics (a [0, 1] image is multiplied by 255).
    """
    return _entropy_on_grey_scale(to_grey_scale(("image",), image)[0])


def average_gradient(image: object) -> float:
    """AG of one image; see ``fusion_gradient.average_gradient_on_grey_scale`` for the definition.

    A volume's AG averages the slices where the image itself is not constant; ``fusion_metrics``
    averages a fused volume's AG over the slices where its sources are not.
    """
    return average_gradient_on_grey_scale(to_grey_scale(("image",), image, min_side=2)[0])


# Any: fusion_metric's wrappers carry .min_side and .on_grey_scale, which Callable cannot say.
_PAIRWISE_METRICS: dict[str, Any] = {
    "Q_mse": q_mse,
    "Q_cc": q_cc,
    "Q_psnr": q_psnr,
    "Q_scd": q_scd,
    "Q_vif": q_vif,
    "Q_ssim": q_ssim,
    "Q_abf": q_abf,
    "Q_cv": q_cv,
    "Q_s": q_s,
    "MI": mutual_information,
    "NMI": normalized_mutual_information,
}
METRIC_NAMES = (*_PAIRWISE_METRICS, "EN", "AG")
"""Keys of ``fusion_metrics``. Lower is better for Q_mse and Q_cv, higher for all others."""


def fusion_metrics(fused: object, source_a: object, source_b: object) -> dict[str, float]:
    """Every fusion metric of the three papers for one fused image (or volume) and its two sources.

    Each input is read on its own intensity scale ([0, 1] or 0–255, see the module docstring).
    Returns ``{name: value}`` with the keys of ``METRIC_NAMES``; a metric whose windows do not fit
    the slices (Q_vif needs 41×41, Q_ssim and Q_s their windows) is NaN, so that small images are
    scored on the metrics that apply rather than not at all.
    """
    fused_grey, a_grey, b_grey = to_grey_scale(FUSION_INPUT_NAMES, fused, source_a, source_b)
    side = min(fused_grey.shape[-2:])
    results = {name: metric.on_grey_scale(fused_grey, a_grey, b_grey) if side >= metric.min_side else float("nan")
               for name, metric in _PAIRWISE_METRICS.items()}
    results["EN"] = _entropy_on_grey_scale(fused_grey)
    # AG needs a neighbour; it scores F alone, on the slices the sources select, as the metrics above.
    results["AG"] = average_gradient_on_grey_scale(fused_grey, a_grey, b_grey) if side >= 2 else float("nan")
    return results
