"""Thick-slice volumes as clinical CT and PET store them: a 512×512×24 pair with 5 mm slices and
0.5 mm pixels fuses, on the reference grid, with a sane result (a tiny untrained network: what is
tested is that the engine copes with the shape and the anisotropy, not what the network learned)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.metrics import registration_metrics

SLICES, SIDE = 24, 512
SPACING_MM = (5.0, 0.5, 0.5)
SHIFT_PX = 4  # in-plane misalignment of the moving image, along x


def head(shift_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic head (outline) with an off-centre lesion, as (outline, lesion) masks."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, SLICES), np.linspace(-1, 1, SIDE),
                          np.linspace(-1, 1, SIDE) - 2 * shift_px / SIDE, indexing="ij", sparse=True)
    outline = ((y / 0.8) ** 2 + (x / 0.7) ** 2 + (z / 1.3) ** 2 < 1).astype(np.float32)
    lesion = ((y / 0.3) ** 2 + ((x - 0.2) / 0.25) ** 2 < 1) * outline
    return outline, lesion.astype(np.float32)


@pytest.fixture(scope="module")
def thick_pair():
    geometry = Geometry(np.array(SPACING_MM), np.array([-60.0, -128.0, -128.0]), np.eye(3))
    outline, lesion = head()
    # CT in HU: air -1000, soft tissue 40, a denser lesion.
    reference = ImageVolume(1040 * outline - 1000 + 300 * lesion, geometry, {"modality": "ct"}, "ct.nii.gz")
    moved_outline, moved_lesion = head(SHIFT_PX)
    # Another contrast (PET-like: the lesion bright), misaligned in-plane.
    moving = ImageVolume((200 * moved_outline + 900 * moved_lesion).astype(np.float32), geometry, {}, "pet.nii.gz")
    truth = (200 * outline + 900 * lesion).astype(np.float32)
    return reference, moving, truth


def test_a_512x512x24_pair_with_5mm_slices_fuses_sanely(thick_pair, smallest_unifuse):
    reference, moving, truth = thick_pair

    result = FusionEngine(smallest_unifuse(3), device="cpu").run_fusion(reference, moving)

    assert result.fused.array.shape == (SLICES, SIDE, SIDE) and result.aligned.array.shape == (SLICES, SIDE, SIDE)
    assert result.fused.geometry.allclose(reference.geometry)
    fused = result.fused.array
    assert np.isfinite(fused).all() and 0 <= fused.min() and fused.max() <= 1
    # The fused image holds the anatomy: bright head on a dark background, on every slice.
    inside, outside = head()[0] > 0, head()[0] == 0
    assert fused[np.broadcast_to(inside, fused.shape)].mean() > fused[np.broadcast_to(outside, fused.shape)].mean() + 0.1
    u = result.displacement
    assert u.shape == (3, SLICES, SIDE, SIDE) and np.isfinite(u).all()
    # Inside the head the field stays within one 5 mm slice across the slices (none was asked for)
    # and within twice the misalignment in-plane.
    in_head = np.broadcast_to(inside, fused.shape)
    kept = result.alignment_guard.kept
    assert np.abs(u[0][in_head]).max() < 1.0, (kept, np.abs(u[0][in_head]).max())
    assert np.hypot(u[1], u[2])[in_head].max() < 2 * SHIFT_PX, (kept, np.hypot(u[1], u[2])[in_head].max())
    # Never worse aligned than the input (the guard keeps the identity over a doubtful field).
    scale = truth.max()
    before = registration_metrics(moving.array / scale, truth / scale)["ncc"]
    after = registration_metrics(result.aligned.array / scale, truth / scale)["ncc"]
    assert after >= before - 1e-3, (before, after, kept)
    assert result.slice_class_probs.shape == (SLICES, 4)
    np.testing.assert_allclose(result.slice_class_probs.sum(axis=1), 1.0, atol=1e-4)
