"""A blank fused slice must count in a volume's mean like any other slice.

``mean_over_axial_slices`` drops NaN slices; a metric that returned NaN for a flat *fused* slice
had those slices dropped for that method alone, so blanking half a head raised Q_CB (0.69 → 0.82)
while every other metric fell.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.metrics import q_abf, q_cb, q_cv, q_s, q_ssim, q_vif, ssim_gains, vif_f

# Every fusion metric computed slice by slice (mean_over_axial_slices); of ssim_gains, each gain is
# (gain_min, the smaller of the two volume means, is no mean of per-slice values).
PER_SLICE_METRICS = {
    "Q_vif": q_vif, "Q_ssim": q_ssim, "Q_s": q_s, "Q_abf": q_abf, "Q_cv": q_cv, "Q_CB": q_cb, "VIF_F": vif_f,
    "gain_ref": lambda fused, a, b: ssim_gains(fused, a, b).a,
    "gain_mov": lambda fused, a, b: ssim_gains(fused, a, b).b,
}


@pytest.fixture
def source_volumes(source_pair):
    """Three 48-pixel slices (VIF_F needs 41) of two sources with contrast on every slice."""
    a, b = (image[:48, :48] for image in source_pair)
    return np.stack([a, np.flipud(a), a.T]), np.stack([b, np.flipud(b), b.T])


@pytest.mark.parametrize("fused_value", [0.0, 0.5])
def test_q_cb_of_a_flat_fused_image_is_zero(source_pair, fused_value):
    """Chen–Blum's Q_SF = min/max(C'_S, C'_F) is 0 wherever S has contrast and F has none; the
    MATLAB reference divides 0 by 0 in F's local contrast and returned NaN."""
    a, b = source_pair
    assert q_cb(np.full_like(a, fused_value), a, b) == 0.0


def test_q_cb_of_a_flat_source_stays_undefined_whatever_the_fused_image(source_pair):
    """NaN decided by the sources alone: the volume mean then skips that slice for every method."""
    a, b = source_pair
    flat = np.zeros_like(a)
    assert np.isnan(q_cb(flat, flat, b)) and np.isnan(q_cb(0.5 * (a + b), flat, b))


@pytest.mark.parametrize("name", PER_SLICE_METRICS)
def test_a_blank_fused_slice_counts_in_the_volume_mean(source_volumes, name):
    metric = PER_SLICE_METRICS[name]
    a, b = source_volumes
    fused = 0.5 * (a + b)
    fused[1] = 0.0
    per_slice = [metric(fused[z], a[z], b[z]) for z in range(len(fused))]
    assert np.isfinite(per_slice).all(), per_slice
    assert metric(fused, a, b) == pytest.approx(np.mean(per_slice), rel=1e-9)


def test_blanking_fused_slices_lowers_q_cb(source_volumes):
    a, b = source_volumes
    fused = 0.5 * (a + b)
    blanked = fused.copy()
    blanked[1] = 0.0
    assert q_cb(blanked, a, b) < q_cb(fused, a, b)
