"""Pairs with nothing in them to align or fuse: identical images, constant images, a tiny object."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.alignment_guard import IDENTITY, choose_displacement
from napari_unifuse.engine.inference import _classical_estimate, reader_and_content_warnings
from napari_unifuse.io import Geometry, ImageVolume


def textured(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_two_files_holding_the_same_image_on_the_same_grid_are_said():
    array = textured((24, 24))
    reference = ImageVolume(array, Geometry.identity(2), source="mri.png")
    copy = ImageVolume(array.copy(), Geometry.identity(2), source="copy.png")
    [warning] = reader_and_content_warnings(reference, copy)
    assert "mri.png and copy.png hold the same image" in warning and "nothing to align" in warning


@pytest.mark.parametrize("moving", [
    ImageVolume(textured((24, 24), seed=1), Geometry.identity(2), source="other.png"),
    # The same values on another grid are another image: one of them is placed elsewhere.
    ImageVolume(textured((24, 24)), Geometry(np.array([2.0, 2.0]), np.zeros(2), np.eye(2)), source="coarse.png"),
])
def test_different_images_or_grids_are_not_said_to_be_the_same(moving):
    reference = ImageVolume(textured((24, 24)), Geometry.identity(2), source="mri.png")
    assert reader_and_content_warnings(reference, moving) == []


def test_the_constant_image_warning_does_not_promise_the_other_image_as_the_fused_one():
    """UniFuse blends a restored blank image in (the fusion balance caps the reference's share):
    its fused image is about a third of the reference, not the reference."""
    reference = ImageVolume(textured((24, 24)), Geometry.identity(2), source="mri.png")
    blank = ImageVolume(np.full((24, 24), 7.0, np.float32), Geometry.identity(2), source="blank.png")
    [warning] = reader_and_content_warnings(reference, blank)
    assert "the moving image is constant (7 everywhere)" in warning
    assert "holds only the other one" not in warning and "no fusion" in warning


def test_simpleitk_is_not_run_on_a_flat_image_and_says_so_plainly():
    """Its failure read "Refusing to change spacing from [1, 1] to [0.0285334, 0]", beside the
    clear warning that the image is constant."""
    warnings: list[str] = []
    field = _classical_estimate(textured((24, 24, 24)), np.full((24, 24, 24), 0.25, np.float32), (1.0, 1.0, 1.0),
                                warnings)
    assert field is None
    assert warnings == ["SimpleITK registration was not run: the moving image on the reference grid is flat; the "
                        "alignment guard weighs the other estimates without it"]


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_tiny_object_is_too_little_tissue_even_when_a_field_spreads_it_over_the_reference(ndim):
    """A 3-voxel cube in an empty field: a candidate that pulls the reference's tissue onto it made
    it "shown" in many blocks, and the 3-D guard kept a field on 8 blocks drawn from 27 voxels."""
    shape = (48,) * ndim
    reference = textured(shape)
    moving = np.zeros(shape, np.float32)
    centre = tuple(slice(23, 26) for _ in range(ndim))
    moving[centre] = 1.0
    # Every voxel looks up the cube's centre: the moving image shows tissue under it everywhere.
    collapse = (np.full(shape, 24.0) - np.indices(shape)).astype(np.float32)
    decision = choose_displacement(moving, reference, {"matching": collapse}, min_credible_motion=0.0)
    assert decision.kept == IDENTITY and decision.challenges == ()
    assert "too little tissue" in decision.message
