"""Human-visual-system fusion metrics: Chen–Blum Q_CB and Han et al.'s VIF_F.

Both weigh, pixel by pixel, what F keeps of each source, rather than summing two similarities as
Q_ssim does: Q_CB scores the contrast preserved from each source, weighted towards the source with
the larger contrast there; VIF_F takes the visual information of the source F passes *less* of.
They are cited as metrics that penalise one-sided fusion, and they do when each source has
structure the other lacks on a grey background (tested), but not on black-background multimodal
images: Q_CB's relative contrast (a ratio of two blurs) is dominated by the dark background, where
a copy matches its source exactly, and VIF_F credits full contrast of one source over half contrast
of both. On 10 aligned Harvard atlas pairs per task (issue 16), a copy of either source scored
above the average 0.5·(A + B) on Q_CB in 59 of 60 cases, and a copy of the MRI above it on VIF_F in
8 of 10 SPECT–MRI and 4 of 10 PET–MRI pairs (a copy of the CT in 2 of 10 CT–MRI pairs). ``unifuse
evaluate`` therefore checks every metric against copy pipelines; ``fusion_gain.ssim_gains`` is the
metric a copy cannot win.

Not implemented, for the same reason: Yang et al.'s Q_Y takes max(SSIM(F, A), SSIM(F, B)) in every
window where A and B differ (SSIM(A, B) < 0.75, most of a multimodal pair), so a copy scores 1
there (copies scored 1.000 on the Harvard pairs); Haghighat's FMI scores every window where F
equals a source as 1, and a copy beat the average on all three tasks.

Inputs and scale as in ``fusion`` (0–255 grey scale; volumes averaged over axial slices).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_unifuse.metrics._inputs import fusion_metric, mean_over_axial_slices, stretch_to_grey_levels
from napari_unifuse.metrics.fusion import VIF_MIN_SIDE, vif_scale_statistics

# metricChenBlum.m (Z. Liu's imageFusionMetrics; VIFB's metricsQcb.m): the difference-of-Gaussians
# contrast sensitivity function S(r) = exp(−(r/f0)²) − a·exp(−(r/f1)²) ...
_CB_F0, _CB_F1, _CB_A = 15.3870, 1.3456, 0.7622
# ... of the radial frequency r = |k| / 15 for FFT index k ("DoG1": freqspace scaled by size/30);
_CB_FREQUENCY_DIVISOR = 15.0
# local contrast C = (G_2 * I) / (G_4 * I) − 1 with 31×31 Gaussians of σ 2 and 4 px (peak
# 1/(2πσ²), not renormalised after truncation), applied as filter2(..., 'same'), zero padding;
_CB_SIGMAS = (2.0, 4.0)
_CB_GAUSSIAN_RADIUS = 15
# masked contrast C' = k·|C|^p / (h·|C|^q + Z) with k = h = 1, p = 3, q = 2, Z = 1e-4.
_CB_P, _CB_Q, _CB_Z = 3, 2, 1e-4


def _chen_blum_csf(shape: tuple[int, int]) -> np.ndarray:
    """metricChenBlum.m's contrast sensitivity filter on the unshifted FFT grid."""
    k_rows = np.fft.fftfreq(shape[0], d=1.0 / shape[0])
    k_cols = np.fft.fftfreq(shape[1], d=1.0 / shape[1])
    r = np.hypot(*np.meshgrid(k_rows, k_cols, indexing="ij")) / _CB_FREQUENCY_DIVISOR
    return np.exp(-((r / _CB_F0) ** 2)) - _CB_A * np.exp(-((r / _CB_F1) ** 2))


def _chen_blum_gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """``filter2(G, image, 'same')`` with the reference's 31×31 Gaussian G, as two 1D passes."""
    offsets = np.arange(-_CB_GAUSSIAN_RADIUS, _CB_GAUSSIAN_RADIUS + 1)
    # G(x, y) = exp(−(x² + y²) / 2σ²) / (2πσ²) = g(x)·g(y) with g(x) = exp(−x² / 2σ²) / (σ√(2π)).
    weights = np.exp(-(offsets**2) / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))
    rows = ndimage.correlate1d(image, weights, axis=0, mode="constant")
    return ndimage.correlate1d(rows, weights, axis=1, mode="constant")


def _masked_contrast(image: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """C' of one image: CSF-filtered, local band-pass contrast through the masking curve."""
    # The filter is symmetric in frequency, so the result is real up to round-off.
    filtered = np.fft.ifft2(np.fft.fft2(image) * csf).real
    fine, coarse = (_chen_blum_gaussian(filtered, sigma) for sigma in _CB_SIGMAS)
    contrast = np.abs(fine / coarse - 1)
    return contrast**_CB_P / (contrast**_CB_Q + _CB_Z)


def _contrast_preservation(source: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """Q_SF: the smaller masked contrast over the larger, per pixel."""
    return np.where(source < fused, source / fused, fused / source)


def _q_cb_2d(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(fused) == 0 and np.ptp(a) > 0 and np.ptp(b) > 0:
        # A flat F has no contrast: C'_F = 0, so min/max(C'_S, C'_F) = 0 wherever a source has some,
        # and Q = 0 (as VIF_F's 0). The reference divides 0 by 0 in C = G_2 * F / G_4 * F − 1 and
        # gives NaN, which mean_over_axial_slices would drop for this method only: a volume with
        # blank fused slices scored above one without them.
        return 0.0
    csf = _chen_blum_csf(fused.shape)
    # 0/0 only arises on a flat source (no contrast anywhere): the result is then NaN, as documented.
    with np.errstate(divide="ignore", invalid="ignore"):
        contrast_f, contrast_a, contrast_b = (
            _masked_contrast(stretch_to_grey_levels(image), csf) for image in (fused, a, b)
        )
        saliency_a = contrast_a**2 / (contrast_a**2 + contrast_b**2)
        quality = (saliency_a * _contrast_preservation(contrast_a, contrast_f)
                   + (1 - saliency_a) * _contrast_preservation(contrast_b, contrast_f))
    return float(np.mean(quality))


@fusion_metric()
def q_cb(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Chen & Blum's Q_CB (Image and Vision Computing 27, 2009): perceptual contrast preserved, in [0, 1].

    Follows Z. Liu's ``metricChenBlum.m`` (imageFusionMetrics; VIFB's ``metricsQcb.m`` is the same
    code): each image stretched to 0–255 on its own; filtered with the DoG contrast sensitivity
    function (f0 15.3870, f1 1.3456, a 0.7622, "DoG1" frequency scale size/30); local contrast
    C = |G_2 * I / G_4 * I − 1| (31×31 Gaussians, σ 2 and 4, zero padding); masked contrast
    C' = C³ / (C² + 1e-4); per pixel Q = λ_A·min/max(C'_A, C'_F) + λ_B·min/max(C'_B, C'_F) with
    λ_A = C'_A² / (C'_A² + C'_B²) = 1 − λ_B; the mean of Q over the image. 1 for F = A = B; 0 for a
    flat F, which keeps no contrast (the reference divides 0 by 0 there); NaN for a flat source,
    where the reference divides 0 by 0 whatever F is, so a volume's mean skips those slices for every
    method alike. Ranks copies high: see the module docstring.
    """
    return mean_over_axial_slices(_q_cb_2d, fused, a, b)


# VIFF_Public.m (Han et al.'s code): visual noise variance 0.005·255², scale weights [1, 0, 0.15, 1]
# normalised, and C = 1e-7 added to each pixel's information (so flat input scores 1, not 0/0).
_VIFF_NOISE_VARIANCE = 0.005 * 255.0**2
_VIFF_SCALE_WEIGHTS = np.array([1.0, 0.0, 0.15, 1.0]) / 2.15
_VIFF_PIXEL_OFFSET = 1e-7


def _vif_f_2d(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    fidelity = []
    for (gain_a, variance_a, noise_a), (gain_b, variance_b, noise_b) in zip(
        vif_scale_statistics(a, fused), vif_scale_statistics(b, fused), strict=True
    ):
        # Per pixel, the source whose signal F passes with the smaller gain (ties: B, as there).
        from_a = gain_a < gain_b
        gain = np.where(from_a, gain_a, gain_b)
        variance = np.where(from_a, variance_a, variance_b)
        noise = np.where(from_a, noise_a, noise_b)
        with_distortion = np.log10(1 + gain**2 * variance / (noise + _VIFF_NOISE_VARIANCE))
        without_distortion = np.log10(1 + variance / _VIFF_NOISE_VARIANCE)
        fidelity.append(np.sum(with_distortion + _VIFF_PIXEL_OFFSET)
                        / np.sum(without_distortion + _VIFF_PIXEL_OFFSET))
    return float(np.dot(_VIFF_SCALE_WEIGHTS, fidelity))


@fusion_metric(min_side=VIF_MIN_SIDE)
def vif_f(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Han et al.'s VIF_F (Information Fusion 14, 2013): visual information fidelity for fusion.

    Follows the authors' ``VIFF_Public.m``: Sheikh & Bovik's four-scale pixel VIF channel model of
    each source → F (``fusion.vif_scale_statistics``), visual noise variance σ_N² = 0.005·255²; per
    pixel and scale the source with the smaller gain g supplies the information with distortion
    log10(1 + g²σ_S² / (σ_V² + σ_N²)) and without it log10(1 + σ_S² / σ_N²); each scale scores
    Σ(with + 1e-7) / Σ(without + 1e-7), and the scales are weighted [1, 0, 0.15, 1] / 2.15.
    1 for F = A = B up to the 1e-10 noise floor; slices need ≥ 41×41 pixels. A copy of a source
    can outscore an average fusion: see the module docstring.
    """
    return mean_over_axial_slices(_vif_f_2d, fused, a, b)
