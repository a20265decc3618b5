"""SSIM gains: against scikit-image SSIMs computed here, and the copy a gain cannot reward."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from napari_unifuse.errors import InputError
from napari_unifuse.metrics import q_ssim, ssim_gains


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    return structural_similarity(x * 255, y * 255, data_range=255)


def test_gains_are_ssim_to_each_source_minus_the_other_sources_ssim(source_pair):
    a, b = source_pair
    fused = 0.7 * a + 0.3 * b
    gains = ssim_gains(fused, a, b)
    assert gains.a == pytest.approx(ssim(fused, a) - ssim(b, a))
    assert gains.b == pytest.approx(ssim(fused, b) - ssim(a, b))
    assert gains.minimum == min(gains.a, gains.b)
    assert gains.a > gains.b > 0  # F leans towards A but still adds to B


def test_a_copy_of_either_source_gains_nothing_for_the_other_and_ranks_below_the_average(source_pair):
    a, b = source_pair
    average = ssim_gains(0.5 * (a + b), a, b)
    for source, other in ((a, b), (b, a)):
        copy = ssim_gains(source, a, b)
        gain_for_source, gain_for_other = (copy.a, copy.b) if source is a else (copy.b, copy.a)
        assert gain_for_other == 0.0
        assert gain_for_source == pytest.approx(1 - ssim(other, source))
        assert copy.minimum == 0.0
    assert average.minimum > 0.1
    # Q_ssim, by contrast, scores both copies like the average (the issue this metric answers).
    copies_q_ssim = [q_ssim(a, a, b), q_ssim(b, a, b)]
    assert copies_q_ssim == pytest.approx([q_ssim(0.5 * (a + b), a, b)] * 2, abs=0.15)


def test_a_fusion_unlike_both_sources_has_negative_gains(source_pair):
    a, b = source_pair
    noise = np.random.default_rng(9).random(a.shape)
    gains = ssim_gains(noise, a, b)
    assert gains.a < 0 and gains.b < 0


def test_volumes_average_each_gain_over_non_empty_axial_slices(source_pair):
    a, b = source_pair
    fused = 0.6 * a + 0.4 * b
    volume = lambda image: np.stack([image, np.flipud(image), np.zeros_like(image)])  # noqa: E731
    per_slice = [ssim_gains(fused, a, b), ssim_gains(np.flipud(fused), np.flipud(a), np.flipud(b))]
    gains = ssim_gains(volume(fused), volume(a), volume(b))
    assert gains.a == pytest.approx(np.mean([g.a for g in per_slice]))
    assert gains.b == pytest.approx(np.mean([g.b for g in per_slice]))


def test_unit_and_grey_scale_inputs_agree_and_bad_inputs_raise(source_pair):
    a, b = source_pair
    fused = np.maximum(a, b)
    on_grey, on_unit = ssim_gains(fused * 255, a * 255, b * 255), ssim_gains(fused, a, b)
    assert (on_grey.a, on_grey.b) == pytest.approx((on_unit.a, on_unit.b), rel=1e-12)
    with pytest.raises(InputError, match="normalise"):
        ssim_gains(fused * 1000, a, b)
    with pytest.raises(InputError, match="7×7"):
        ssim_gains(fused[:5, :5], a[:5, :5], b[:5, :5])
