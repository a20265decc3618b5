"""Bone retention: mean fused intensity over the CT's bone, worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.metrics import BONE_THRESHOLD, bone_retention


def test_bone_retention_is_the_mean_fused_value_over_voxels_above_the_threshold():
    ct = np.array([[0.9, 0.85, 0.8], [0.2, 0.95, 0.0]])  # 0.8 itself is not bone: strictly above
    fused = np.array([[0.6, 0.4, 1.0], [1.0, 0.5, 1.0]])
    assert bone_retention(fused, ct) == pytest.approx((0.6 + 0.4 + 0.5) / 3)
    assert bone_retention(fused, ct, threshold=0.1) == pytest.approx((0.6 + 0.4 + 1.0 + 1.0 + 0.5) / 5)


def test_a_copy_of_the_mri_loses_the_bone_a_copy_of_the_ct_keeps():
    ct = np.zeros((4, 6, 6))
    ct[:, 1, :] = 0.95  # a skull-like bright band
    mri = np.full_like(ct, 0.6)
    mri[:, 1, :] = 0.05  # cortical bone is dark in MRI
    assert bone_retention(ct, ct) == pytest.approx(0.95)
    assert bone_retention(mri, ct) == pytest.approx(0.05)
    assert bone_retention(0.5 * (ct + mri), ct) == pytest.approx(0.5)


def test_no_bone_gives_nan_and_other_scales_are_refused():
    soft_tissue = np.full((8, 8), BONE_THRESHOLD)
    assert math.isnan(bone_retention(soft_tissue, soft_tissue))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        bone_retention(soft_tissue * 255, soft_tissue)
    with pytest.raises(InputError, match="same shape"):
        bone_retention(soft_tissue, soft_tissue[:4])
