"""Q_abf, Q_cv and AG against values computed by hand and against loop-by-loop MATLAB transcriptions.

References: VIFB ``metricsQabf.m`` and ``metricsAvg_gradient.m``; Z. Liu's ``metricChen.m`` (Q_cv).
The transcriptions below follow the MATLAB code statement by statement (per-pixel loops,
``freqspace``/``fftshift``, ``blkproc``) so that they share no code path with the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, signal

from napari_unifuse.metrics import average_gradient, fusion_metrics, q_abf, q_cv

TG, KG, DG, TA, KA, DA = 0.9994, -15, 0.5, 0.9879, -22, 0.8
ORIENTATION_TERM_ALIGNED = TA / (1 + math.exp(KA * (1 - DA)))


def step_image(shape=(12, 12), level=200.0) -> np.ndarray:
    image = np.zeros(shape)
    image[:, shape[1] // 2 :] = level
    return image


def test_q_abf_of_a_perfect_copy_is_tg_times_the_aligned_orientation_term():
    a = step_image()
    # B is flat (no edges, zero weight); F = A keeps every edge (strength ≥ 200 ⇒ strength term = Tg).
    assert q_abf(a, a, np.zeros_like(a)) == pytest.approx(TG * ORIENTATION_TERM_ALIGNED, rel=1e-12)


def test_q_abf_of_a_half_contrast_copy_halves_the_strength_term():
    a = step_image()
    # g_F / g_A = 0.5 = Dg, so the strength sigmoid sits at its midpoint Tg / 2; orientations agree.
    assert q_abf(a / 2, a, np.zeros_like(a)) == pytest.approx(TG / 2 * ORIENTATION_TERM_ALIGNED, rel=1e-12)


def matlab_qabf(str_a: np.ndarray, str_b: np.ndarray, str_f: np.ndarray) -> float:
    """VIFB metricsQabf.m, transcribed loop by loop (conv2 'same' is scipy's convolve2d 'same')."""
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=float)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=float)

    def strength_and_angle(p):
        sx, sy = signal.convolve2d(p, h3, mode="same"), signal.convolve2d(p, h1, mode="same")
        g = np.sqrt(sx**2 + sy**2)
        angle = np.zeros_like(p)
        for i in range(p.shape[0]):
            for j in range(p.shape[1]):
                angle[i, j] = math.pi / 2 if sx[i, j] == 0 else math.atan(sy[i, j] / sx[i, j])
        return g, angle

    def transfer(g_s, a_s, g_f, a_f):
        q = np.zeros_like(g_s)
        for i in range(g_s.shape[0]):
            for j in range(g_s.shape[1]):
                if g_s[i, j] > g_f[i, j]:
                    gaf = g_f[i, j] / g_s[i, j]
                elif g_s[i, j] == g_f[i, j]:
                    gaf = g_f[i, j]
                else:
                    gaf = g_s[i, j] / g_f[i, j]
                aaf = 1 - abs(a_s[i, j] - a_f[i, j]) / (math.pi / 2)
                q[i, j] = TG / (1 + math.exp(KG * (gaf - DG))) * TA / (1 + math.exp(KA * (aaf - DA)))
        return q

    g_a, a_a = strength_and_angle(str_a)
    g_b, a_b = strength_and_angle(str_b)
    g_f, a_f = strength_and_angle(str_f)
    numerator = np.sum(transfer(g_a, a_a, g_f, a_f) * g_a + transfer(g_b, a_b, g_f, a_f) * g_b)
    return float(numerator / np.sum(g_a + g_b))


def test_q_abf_matches_the_matlab_reference_on_random_images():
    rng = np.random.default_rng(4)
    a, b = (np.round(rng.random((9, 11)) * 255) for _ in range(2))
    fused = np.round(0.5 * (a + b))
    fused[2, 3] = a[2, 3]  # a few exact ties g_A = g_F exercise the references' tie rule
    assert q_abf(fused, a, b) == pytest.approx(matlab_qabf(a, b, fused), rel=1e-12)
    average = 0.5 * (a + b)  # half grey levels: Sobel sums in steps of 0.5, all told from 0 as there
    assert q_abf(average, a, b) == pytest.approx(matlab_qabf(a, b, average), rel=1e-12)


def test_q_abf_of_an_edge_along_the_rows_does_not_flip_with_float_round_off():
    # s_x of an edge along the rows is 0; round-off makes it ±tiny, which turned its orientation
    # from π/2 to −π/2, "opposite" to the source's (F = A + 1e-9 noise: 0.975 -> 0.611).
    a = np.zeros((32, 32))
    a[16:] = 0.6
    b = np.zeros_like(a)
    b[:, 16:] = 0.3
    fused = 0.7 * a + 0.3 * b
    noise = 1e-9 * np.random.default_rng(0).standard_normal(a.shape)
    exact = q_abf(fused, a, b)
    assert q_abf(np.clip(fused + noise, 0, 1), a, b) == pytest.approx(exact, rel=1e-6)
    assert q_abf(fused.astype(np.float32), a.astype(np.float32), b.astype(np.float32)) == pytest.approx(exact, rel=1e-6)


def test_q_abf_drops_when_the_fused_image_loses_edges(source_pair):
    a, b = source_pair
    sharp = np.maximum(a, b)
    assert q_abf(sharp, a, b) > q_abf(ndimage.gaussian_filter(sharp, 2), a, b)


def matlab_metric_chen(im1: np.ndarray, im2: np.ndarray, fim: np.ndarray) -> float:
    """Z. Liu's metricChen.m, transcribed: normalize1, freqspace + fftshift filtering, blkproc loops."""

    def normalize1(data):
        return np.round((data - data.min()) / (data.max() - data.min()) * 255)

    im1, im2, fim = normalize1(im1), normalize1(im2), normalize1(fim)
    flt1 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=float)
    flt2 = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=float)

    def strength(image):  # filter2 is correlation
        return np.hypot(signal.correlate2d(image, flt1, mode="same"), signal.correlate2d(image, flt2, mode="same"))

    hang, lie = im1.shape

    def blkproc(values, fun):
        out = np.zeros((-(-hang // 16), -(-lie // 16)))
        padded = np.zeros((out.shape[0] * 16, out.shape[1] * 16))
        padded[:hang, :lie] = values
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = fun(padded[16 * i : 16 * i + 16, 16 * j : 16 * j + 16])
        return out

    ramda1 = blkproc(strength(im1), lambda x: np.sum(x**5))
    ramda2 = blkproc(strength(im2), lambda x: np.sum(x**5))
    freq = lambda n: (np.arange(n) - n // 2) * (2 / n)  # noqa: E731  (MATLAB freqspace)
    u, v = np.meshgrid(freq(lie), freq(hang))
    u, v = lie / 8 * u, hang / 8 * v
    r = np.sqrt(u**2 + v**2)
    theta_m = 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))

    def filtered(difference):
        return np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(difference)) * theta_m))

    d1 = blkproc(np.real(filtered(im1 - fim)), lambda x: np.mean(x**2))
    d2 = blkproc(np.real(filtered(im2 - fim)), lambda x: np.mean(x**2))
    return float(np.sum(ramda1 * d1 + ramda2 * d2) / np.sum(ramda1 + ramda2))


def test_q_cv_matches_the_matlab_reference_on_a_non_square_image(make_phantom):
    rng = np.random.default_rng(5)
    # 40×24 is not a multiple of the 16-pixel regions and not square, so padding and axes matter.
    a = make_phantom((40, 24), 0) + rng.normal(0, 0.02, (40, 24))
    b = make_phantom((40, 24), 1) + rng.normal(0, 0.02, (40, 24))
    fused = 0.5 * (a + b)
    a, b, fused = (np.clip(image, 0, 1) for image in (a, b, fused))
    assert q_cv(fused, a, b) == pytest.approx(matlab_metric_chen(a, b, fused), rel=1e-9)


def test_q_cv_is_zero_for_a_perfect_fusion_and_grows_with_distortion(source_pair):
    a, b = source_pair
    rng = np.random.default_rng(6)
    assert q_cv(a, a, a) == pytest.approx(0, abs=1e-9)
    fused = 0.5 * (a + b)
    noisy = [np.clip(fused + rng.normal(0, s, a.shape), 0, 1) for s in (0.02, 0.1)]
    assert q_cv(fused, a, b) < q_cv(noisy[0], a, b) < q_cv(noisy[1], a, b)
    assert q_cv(fused, a, b) == pytest.approx(q_cv(fused, b, a))


def test_average_gradient_of_a_ramp_and_of_a_flat_image():
    rows, cols, slope = 10, 14, 3.0
    ramp = np.tile(np.arange(cols) * slope, (rows, 1))
    # Every central/one-sided difference is `slope` along x and 0 along y (VIFB's normalisation).
    expected = slope / math.sqrt(2) * rows * cols / ((rows - 1) * (cols - 1))
    assert average_gradient(ramp) == pytest.approx(expected)
    assert average_gradient(np.full((10, 14), 0.3)) == 0


def test_a_fused_volume_s_average_gradient_averages_the_slices_its_sources_fill(source_pair):
    """AG averaged the slices where F was not constant: one stray grey level on the sources' blank
    slices halved it, where the other per-slice metrics leave those slices out."""
    a, b = source_pair
    blank = np.zeros_like(a)
    volume_a, volume_b = np.stack([a, blank, b, blank]), np.stack([b, blank, a, blank])
    fused = 0.5 * (volume_a + volume_b)
    stray = fused.copy()
    stray[[1, 3], 0, 0] = 1 / 255
    filled_slices_ag = np.mean([average_gradient(fused[z]) for z in (0, 2)])
    assert fusion_metrics(stray, volume_a, volume_b)["AG"] == pytest.approx(filled_slices_ag)
    assert fusion_metrics(fused, volume_a, volume_b)["AG"] == pytest.approx(filled_slices_ag)
    # Alone, an image selects its own slices: the stray grey levels make theirs count.
    assert average_gradient(stray) == pytest.approx(np.mean([average_gradient(slice_) for slice_ in stray]))
