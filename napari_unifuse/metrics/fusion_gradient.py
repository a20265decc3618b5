"""Edge- and frequency-based fusion metrics: Q_abf (Xydeas–Petrović), Q_cv (Chen–Varshney), AG.

Inputs and scale as in ``napari_unifuse.metrics.fusion`` (0–255 grey scale; volumes are averaged
over axial slices). All three are defined on 2D images.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from napari_unifuse.metrics._inputs import fusion_metric, mean_over_axial_slices, stretch_to_grey_levels

# Sobel kernels of metricsQabf.m (VIFB) / CDDFuse Evaluator.Qabf, applied with conv2(..., 'same').
_SOBEL_ROWS = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
_SOBEL_COLUMNS = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])

# Xydeas & Petrović's sigmoid constants (strength g and orientation α), as in both references.
_TG, _KG, _DG = 0.9994, -15.0, 0.5
_TA, _KA, _DA = 0.9879, -22.0, 0.8


# An edge whose s_x is at most this fraction of its strength g is vertical (α = π/2), as where s_x = 0.
# α = arctan(s_y / s_x) jumps from +π/2 to −π/2 as s_x crosses 0, and Q_abf takes those two (one
# line) as opposite: with float round-off in a vertical edge's s_x, F = A + 1e-9 noise scored
# Q_abf 0.611 against F = A's 0.975, and one average fusion, computed twice, 0.3746 and 0.3750.
# 1e-4 (within 1e-4 rad of vertical) is far above float32 round-off of the 0–255 Sobel sums and
# below the smallest non-zero |s_x| / g of grey-level images (1 / 1443), which thus score as before.
_VERTICAL_FRACTION = 1e-4


def _edge_strength_orientation(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel edge strength g and orientation α = arctan(s_y / s_x), with α = π/2 where s_x is 0
    (to within ``_VERTICAL_FRACTION`` of g)."""
    s_x = signal.convolve2d(image, _SOBEL_COLUMNS, mode="same")
    s_y = signal.convolve2d(image, _SOBEL_ROWS, mode="same")
    strength = np.hypot(s_x, s_y)
    vertical = np.abs(s_x) <= _VERTICAL_FRACTION * strength
    orientation = np.where(vertical, np.pi / 2, np.arctan(s_y / np.where(vertical, 1.0, s_x)))
    return strength, orientation


def _edge_preservation(
    strength_s: np.ndarray, orientation_s: np.ndarray, strength_f: np.ndarray, orientation_f: np.ndarray
) -> np.ndarray:
    """Q^{SF}: how much of the source's edge strength and orientation survives in F, per pixel."""
    # Relative strength: the smaller over the larger. Where both are equal the references take g_F
    # itself (not 1); we keep that quirk so the values match theirs.
    relative = np.where(
        strength_s > strength_f,
        strength_f / np.where(strength_s > strength_f, strength_s, 1.0),
        np.where(strength_s == strength_f, strength_f, strength_s / np.where(strength_f > 0, strength_f, 1.0)),
    )
    alignment = 1 - np.abs(orientation_s - orientation_f) / (np.pi / 2)
    q_strength = _TG / (1 + np.exp(_KG * (relative - _DG)))
    q_orientation = _TA / (1 + np.exp(_KA * (alignment - _DA)))
    return q_strength * q_orientation


def _q_abf_2d(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    g_a, alpha_a = _edge_strength_orientation(a)
    g_b, alpha_b = _edge_strength_orientation(b)
    g_f, alpha_f = _edge_strength_orientation(fused)
    total_weight = np.sum(g_a + g_b)
    if total_weight == 0:  # no edges in either source: nothing to transfer, undefined
        return float("nan")
    transferred_a = _edge_preservation(g_a, alpha_a, g_f, alpha_f) * g_a
    transferred_b = _edge_preservation(g_b, alpha_b, g_f, alpha_f) * g_b
    return float(np.sum(transferred_a + transferred_b) / total_weight)


@fusion_metric()
def q_abf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Q^{AB/F} (Xydeas & Petrović 2000): edge information transferred from A and B to F, in [0, 1).

    Follows VIFB's ``metricsQabf.m`` and CDDFuse ``Evaluator.Qabf``: Sobel filters with zero padding,
    Tg 0.9994, kg −15, Dg 0.5, Ta 0.9879, ka −22, Da 0.8, weights g^L with L = 1. NaN if neither
    source has any edge.
    """
    return mean_over_axial_slices(_q_abf_2d, fused, a, b)


# metricChen.m's constants: 16×16 regions, saliency exponent 5.
_CV_WINDOW = 16
_CV_ALPHA = 5


def _block_reduce(values: np.ndarray, reduce: str) -> np.ndarray:
    """MATLAB ``blkproc(values, [16 16], fun)``: zero-pad to whole blocks, reduce each block."""
    rows = -(-values.shape[0] // _CV_WINDOW) * _CV_WINDOW
    cols = -(-values.shape[1] // _CV_WINDOW) * _CV_WINDOW
    padded = np.zeros((rows, cols))
    padded[: values.shape[0], : values.shape[1]] = values
    blocks = padded.reshape(rows // _CV_WINDOW, _CV_WINDOW, cols // _CV_WINDOW, _CV_WINDOW)
    return blocks.sum(axis=(1, 3)) if reduce == "sum" else blocks.mean(axis=(1, 3))


def _mannos_sakrison_filter(shape: tuple[int, int]) -> np.ndarray:
    """metricChen.m's contrast sensitivity filter on the unshifted FFT grid.

    The MATLAB code scales ``freqspace`` by size/8, i.e. a radial frequency r = |k| / 4 for FFT
    index k, then applies θ(r) = 2.6·(0.0192 + 0.144 r)·exp(−(0.144 r)^1.1) (Mannos & Sakrison).
    """
    k_rows = np.fft.fftfreq(shape[0], d=4.0 / shape[0])
    k_cols = np.fft.fftfreq(shape[1], d=4.0 / shape[1])
    r = np.hypot(*np.meshgrid(k_rows, k_cols, indexing="ij"))
    return 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))


def _q_cv_2d(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    fused, a, b = (stretch_to_grey_levels(image) for image in (fused, a, b))
    csf = _mannos_sakrison_filter(fused.shape)
    saliencies, distortions = [], []
    for source in (a, b):
        strength, _ = _edge_strength_orientation(source)
        saliencies.append(_block_reduce(strength**_CV_ALPHA, "sum"))
        # The filter is symmetric in frequency, so the filtered difference is real (up to round-off).
        filtered = np.fft.ifft2(np.fft.fft2(source - fused) * csf).real
        distortions.append(_block_reduce(filtered**2, "mean"))
    total_saliency = np.sum(saliencies[0] + saliencies[1])
    if total_saliency == 0:  # neither source has edges: undefined
        return float("nan")
    return float(np.sum(saliencies[0] * distortions[0] + saliencies[1] * distortions[1]) / total_saliency)


@fusion_metric()
def q_cv(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Chen & Varshney's Q_cv (Information Fusion 2007): saliency-weighted perceptual distortion. Lower is better.

    Follows Z. Liu's ``metricChen.m`` (imageFusionMetrics; VIFB's ``metricsQcv.m`` is the same code):
    each image stretched to 0–255; 16×16 regions (``blkproc``, zero-padded); saliency Σ g^5 of the
    Sobel strength; differences filtered with the Mannos–Sakrison CSF; Q = Σ λ_A D_A + λ_B D_B / Σ λ.
    We keep the real part of the filtered difference (the imaginary part is round-off). 0 for F = A = B;
    NaN if neither source has edges.
    """
    return mean_over_axial_slices(_q_cv_2d, fused, a, b)


def _average_gradient_2d(image: np.ndarray) -> float:
    d_rows, d_cols = np.gradient(image)
    rows, cols = image.shape
    return float(np.sum(np.sqrt((d_rows**2 + d_cols**2) / 2)) / ((rows - 1) * (cols - 1)))


def average_gradient_on_grey_scale(image: np.ndarray, *sources: np.ndarray) -> float:
    """AG of a 0–255 image: Σ sqrt((∂x² + ∂y²) / 2) / ((rows − 1)(cols − 1)).

    VIFB's ``metricsAvg_gradient.m``: MATLAB ``gradient`` (central differences, one-sided at the
    border; ``np.gradient`` is the same). CDDFuse divides by rows·cols instead (≈3 % lower at 64²).
    A volume's AG is averaged over the axial slices where a source is not constant (the image's
    own, without sources), so that a fused image's AG averages the slices the other fusion metrics
    do: counting the sources' blank slices where the fused image has one stray grey level halved it.
    """
    return mean_over_axial_slices(lambda scored, *_: _average_gradient_2d(scored), image, *sources)
