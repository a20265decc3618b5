"""Q_CB and VIF_F against statement-by-statement transcriptions of their MATLAB references.

References: Z. Liu's ``metricChenBlum.m`` (imageFusionMetrics; VIFB ``metricsQcb.m``) and Han et
al.'s ``VIFF_Public.m``. The transcriptions use ``freqspace``/``fftshift``, full 2D kernels with
``scipy.signal.correlate2d`` (MATLAB ``filter2``) and per-pixel loops for the case analysis, so
they share no code path with the implementation (FFT grid frequencies, separable filters,
vectorised masks, the shared VIF channel model).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, signal
from skimage.draw import disk

from napari_unifuse.metrics import q_cb, vif_f


def normalize1(data: np.ndarray) -> np.ndarray:
    return np.round((data - data.min()) / (data.max() - data.min()) * 255)


def matlab_chen_blum(im1: np.ndarray, im2: np.ndarray, fim: np.ndarray) -> float:
    """metricChenBlum.m, transcribed."""
    im1, im2, fim = normalize1(im1), normalize1(im2), normalize1(fim)
    f0, f1, a = 15.3870, 1.3456, 0.7622
    k, h, p, q, z = 1, 1, 3, 2, 0.0001
    hang, lie = im1.shape
    HH, LL = hang / 30, lie / 30  # noqa: N806 (the MATLAB names)
    freq = lambda n: (np.arange(n) - n // 2) * (2 / n)  # noqa: E731  (MATLAB freqspace)
    u, v = np.meshgrid(freq(lie), freq(hang))
    u, v = LL * u, HH * v
    r = np.sqrt(u**2 + v**2)
    sd = np.exp(-((r / f0) ** 2)) - a * np.exp(-((r / f1) ** 2))

    def csf(image):
        return np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(image)) * sd))

    def gaussian2d(sigma):
        x, y = np.meshgrid(np.arange(-15, 16), np.arange(-15, 16))
        return np.exp(-(x * x + y * y) / (2 * sigma * sigma)) / (2 * math.pi * sigma * sigma)

    g1, g2 = gaussian2d(2), gaussian2d(4)

    def masked_contrast(image):
        c = np.abs(signal.correlate2d(image, g1, mode="same") / signal.correlate2d(image, g2, mode="same") - 1)
        return k * c**p / (h * c**q + z)

    c1p, c2p, cfp = (masked_contrast(csf(image)) for image in (im1, im2, fim))
    total = 0.0
    for i in range(hang):
        for j in range(lie):
            q1f = c1p[i, j] / cfp[i, j] if c1p[i, j] < cfp[i, j] else cfp[i, j] / c1p[i, j]
            q2f = c2p[i, j] / cfp[i, j] if c2p[i, j] < cfp[i, j] else cfp[i, j] / c2p[i, j]
            ramda1 = c1p[i, j] ** 2 / (c1p[i, j] ** 2 + c2p[i, j] ** 2)
            ramda2 = c2p[i, j] ** 2 / (c1p[i, j] ** 2 + c2p[i, j] ** 2)
            total += ramda1 * q1f + ramda2 * q2f
    return total / (hang * lie)


def fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    x, y = np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2)
    window = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    window[window < np.finfo(float).eps * window.max()] = 0
    return window / window.sum()


def com_vid_vind_g(ref: np.ndarray, dist: np.ndarray, sq: float) -> tuple[list, list, list]:
    """VIFF_Public.m's ComVidVindG, transcribed (the flat/negative cases pixel by pixel)."""
    nums, dens, gains = [], [], []
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        win = fspecial_gaussian(n, n / 5)
        filter2 = lambda image: signal.correlate2d(image, win, mode="valid")  # noqa: E731, B023
        if scale > 1:
            ref, dist = filter2(ref)[::2, ::2], filter2(dist)[::2, ::2]
        mu1, mu2 = filter2(ref), filter2(dist)
        sigma1_sq = filter2(ref * ref) - mu1 * mu1
        sigma2_sq = filter2(dist * dist) - mu2 * mu2
        sigma12 = filter2(ref * dist) - mu1 * mu2
        g = np.zeros_like(mu1)
        sv_sq = np.zeros_like(mu1)
        for i in range(mu1.shape[0]):
            for j in range(mu1.shape[1]):
                s1, s2 = max(sigma1_sq[i, j], 0.0), max(sigma2_sq[i, j], 0.0)
                gij = sigma12[i, j] / (s1 + 1e-10)
                sv = s2 - gij * sigma12[i, j]
                if s1 < 1e-10:
                    gij, sv, s1 = 0.0, s2, 0.0
                if s2 < 1e-10:
                    gij, sv = 0.0, 0.0
                if gij < 0:
                    sv, gij = s2, 0.0
                if sv <= 1e-10:
                    sv = 1e-10
                g[i, j], sv_sq[i, j], sigma1_sq[i, j] = gij, sv, s1
        gains.append(g)
        nums.append(np.log10(1 + g**2 * sigma1_sq / (sv_sq + sq)))
        dens.append(np.log10(1 + sigma1_sq / sq))
    return nums, dens, gains


def matlab_viff(im1: np.ndarray, im2: np.ndarray, imf: np.ndarray) -> float:
    """VIFF_Public.m (grey images), transcribed."""
    sq, c = 0.005 * 255 * 255, 1e-7
    p = np.array([1, 0, 0.15, 1]) / 2.15
    n1, d1, g1 = com_vid_vind_g(im1, imf, sq)
    n2, d2, g2 = com_vid_vind_g(im2, imf, sq)
    f = []
    for i in range(4):
        z12, m12 = n2[i].copy(), d2[i].copy()
        rows, cols = g1[i].shape
        for r in range(rows):
            for s in range(cols):
                if g1[i][r, s] < g2[i][r, s]:
                    z12[r, s], m12[r, s] = n1[i][r, s], d1[i][r, s]
        f.append(np.sum(z12 + c) / np.sum(m12 + c))
    return float(np.sum(np.array(f) * p))


@pytest.fixture
def non_square_pair(make_phantom):
    """Two 48×60 textured sources: not square, so row and column frequencies must not be swapped."""
    rng = np.random.default_rng(7)
    a = np.clip(make_phantom((48, 60), 0) + rng.normal(0, 0.02, (48, 60)), 0, 1)
    b = np.clip(make_phantom((48, 60), 1) + rng.normal(0, 0.02, (48, 60)), 0, 1)
    return a, b


def test_q_cb_matches_the_matlab_reference(non_square_pair):
    a, b = non_square_pair
    for fused in (0.5 * (a + b), np.maximum(a, b), a):
        assert q_cb(fused, a, b) == pytest.approx(matlab_chen_blum(a * 255, b * 255, fused * 255), rel=1e-9)


def test_vif_f_matches_the_matlab_reference(non_square_pair):
    a, b = non_square_pair
    for fused in (0.5 * (a + b), np.maximum(a, b), b):
        assert vif_f(fused, a, b) == pytest.approx(matlab_viff(a * 255, b * 255, fused * 255), rel=1e-9)


def test_fusing_an_image_with_itself_scores_one_and_flat_input_is_documented(source_pair):
    a, _ = source_pair
    assert q_cb(a, a, a) == pytest.approx(1.0)
    assert vif_f(a, a, a) == pytest.approx(1.0, abs=1e-6)
    flat = np.full((48, 48), 0.5)
    assert math.isnan(q_cb(flat, flat, flat))  # no contrast anywhere: 0/0 in the reference
    assert vif_f(flat, flat, flat) == pytest.approx(1.0)  # the 1e-7 per-pixel offset


def test_both_drop_when_the_fused_image_is_blurred(source_pair):
    a, b = source_pair
    sharp = np.maximum(a, b)
    blurred = ndimage.gaussian_filter(sharp, 2)
    assert q_cb(sharp, a, b) > q_cb(blurred, a, b)
    assert vif_f(sharp, a, b) > vif_f(blurred, a, b)


def complementary_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two sources each showing two discs the other lacks, on a grey, independently textured background."""
    rng = np.random.default_rng(8)
    sources = []
    for centres in (((16, 16), (48, 48)), ((16, 48), (48, 16))):
        image = np.full((64, 64), 0.2)
        for centre in centres:
            image[disk(centre, 8, shape=image.shape)] = 0.8
        texture = ndimage.gaussian_filter(rng.normal(size=image.shape), 1.5) * 0.03
        sources.append(np.clip(ndimage.gaussian_filter(image + texture, 1), 0, 1))
    return sources[0], sources[1]


@pytest.mark.parametrize("metric", [q_cb, vif_f])
def test_a_copy_scores_below_the_average_when_each_source_has_structure_the_other_lacks(metric):
    a, b = complementary_pair()
    average = metric(0.5 * (a + b), a, b)
    assert metric(a, a, b) < average and metric(b, a, b) < average


def test_a_copy_can_outscore_the_average_on_black_background_multimodal_images(source_pair):
    # Shared anatomy in two contrasts on black, like the Harvard pairs: Q_CB's relative contrast is
    # dominated by the dark background, where a copy matches its source exactly, and VIF_F credits
    # full contrast of one source over half contrast of both. Why `unifuse evaluate` checks every
    # metric against copy pipelines instead of trusting these two.
    a, b = source_pair
    average = 0.5 * (a + b)
    assert min(q_cb(a, a, b), q_cb(b, a, b)) > q_cb(average, a, b) + 0.1
    assert vif_f(b, a, b) > vif_f(average, a, b)
