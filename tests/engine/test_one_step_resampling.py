"""A moving image on a grid other than the reference's is read once through the kept field: taken
onto the reference grid first and then warped, it was interpolated twice, and its aligned image
came out blurrier than the field gives. On the reference's own grid nothing changes."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from napari_unifuse.engine import inference
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.io import Geometry, ImageVolume, resample_to_reference
from napari_unifuse.io.resample import resample_displaced
from napari_unifuse.model.warp import warp


def _anatomy(world: np.ndarray) -> np.ndarray:
    """Fine detail along every axis (world: (3, ...) mm, array-axis order), smooth enough to sample."""
    z, y, x = world
    envelope = np.exp(-(((z - 24) / 16) ** 2 + ((y - 16) / 11) ** 2 + ((x - 16) / 11) ** 2))
    return (envelope * (1.2 + np.sin(1.3 * z) * np.cos(0.9 * y) + 0.6 * np.sin(1.1 * x + 0.5 * z))).astype(np.float32)


def _sampled(geometry: Geometry, shape: tuple[int, ...]) -> ImageVolume:
    index = np.indices(shape, dtype=np.float64).reshape(len(shape), -1)
    world = geometry.index_to_world[:3, :3] @ index + geometry.index_to_world[:3, 3:]
    return ImageVolume(_anatomy(world).reshape(shape), geometry)


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


# A reference of 3 mm slices; the moving image, the same anatomy in 0.8 mm voxels on a rotated, shifted grid.
REFERENCE = _sampled(Geometry(np.array([3.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0]), np.eye(3)), (16, 32, 32))
MOVING = _sampled(Geometry(np.full(3, 0.8), np.array([-4.0, -3.0, -2.5]), _rotation(14)), (72, 50, 50))


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_resampling_through_a_field_once_is_closer_to_the_anatomy_than_twice():
    displacement = np.zeros((3, *REFERENCE.spatial_shape), np.float32)
    displacement[0], displacement[1], displacement[2] = 0.4, -1.7, 2.3  # voxels of the reference grid
    index = np.indices(REFERENCE.spatial_shape, dtype=np.float64) + displacement
    world = np.einsum("ij,j...->i...", REFERENCE.geometry.index_to_world[:3, :3], index)
    truth = _anatomy(world + REFERENCE.geometry.origin.reshape(3, 1, 1, 1))
    once = resample_displaced(MOVING.array[None], MOVING.geometry, REFERENCE, displacement)[0]
    twice = warp(torch.from_numpy(resample_to_reference(MOVING, REFERENCE).array)[None, None],
                 torch.from_numpy(displacement)[None])[0, 0].numpy()
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))  # where both read inside the moving image
    error_once = np.abs(once - truth)[inner].mean()
    error_twice = np.abs(twice - truth)[inner].mean()
    assert error_once < 0.6 * error_twice, (error_once, error_twice)


def test_a_zero_displacement_samples_as_resample_to_reference_does():
    zero = np.zeros((3, *REFERENCE.spatial_shape), np.float32)
    once = resample_displaced(MOVING.array[None], MOVING.geometry, REFERENCE, zero)[0]
    np.testing.assert_allclose(once, resample_to_reference(MOVING, REFERENCE).array, atol=1e-6)


def test_an_off_grid_moving_image_is_aligned_with_one_interpolation():
    moved_mm = np.array([1.5, -2.2, 1.8])  # the patient moved between the scans
    moving = dataclasses.replace(MOVING, array=_sampled(dataclasses.replace(
        MOVING.geometry, origin=MOVING.geometry.origin + moved_mm), MOVING.spatial_shape).array)
    result = FusionEngine(load_method("matching+average", spatial_dims=3), device="cpu").run_fusion(
        REFERENCE, moving, quality=False)
    displacement = result.displacement
    assert np.abs(displacement).mean() > 0.5  # the pair is moved, not only resampled

    def through_field(array: np.ndarray, geometry: Geometry) -> np.ndarray:
        return resample_displaced(array[None], geometry, REFERENCE, displacement)[0]

    once = through_field(moving.array, moving.geometry)
    twice = warp(torch.from_numpy(resample_to_reference(moving, REFERENCE).array)[None, None],
                 torch.from_numpy(displacement)[None])[0, 0].numpy()
    # Where the field reads inside the moving image (elsewhere the outputs hold the window's floor).
    inside = through_field(np.ones(moving.spatial_shape, np.float32), moving.geometry) == 1
    aligned = result.aligned.array
    assert np.abs(aligned - once)[inside].max() < 1e-4 * moving.array.max()
    assert np.abs(aligned - twice)[inside].mean() > 0.05 * np.abs(moving.array).mean()


def test_a_moving_image_on_the_reference_grid_keeps_the_warp(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a moving image on the reference grid was resampled through the field")

    monkeypatch.setattr(inference, "resample_displaced", refused)
    moving = ImageVolume(np.roll(REFERENCE.array, 1, axis=2), REFERENCE.geometry)
    result = FusionEngine(load_method("matching+average", spatial_dims=3), device="cpu").run_fusion(
        REFERENCE, moving, quality=False)
    assert result.aligned.array.shape == REFERENCE.spatial_shape


def test_the_quality_maps_of_an_off_grid_moving_image_see_no_restoration_by_a_method_without_one():
    # A classical pipeline restores nothing: its restoration-change map must be zero, not the difference
    # between the one-step reading the outputs use and the resampled-then-warped image.
    moving = dataclasses.replace(MOVING, array=_sampled(dataclasses.replace(
        MOVING.geometry, origin=MOVING.geometry.origin + np.array([1.0, 1.5, -1.2])), MOVING.spatial_shape).array)
    result = FusionEngine(load_method("matching+average", spatial_dims=3), device="cpu").run_fusion(
        REFERENCE, moving, quality=True, uncertainty_passes=0)
    assert np.abs(result.quality.restoration_change).max() < 1e-5


def test_an_off_grid_colour_moving_image_carries_its_colours_read_once():
    # The chroma is read on the moving image's own grid, as the luma is: with no motion (identity), the
    # aligned colours are the moving image resampled onto the reference grid.
    reference = ImageVolume(_sampled(Geometry(np.ones(3), np.zeros(3), np.eye(3)), (1, 32, 32)).array[0],
                            Geometry(np.ones(2), np.zeros(2), np.eye(2)))
    grid = Geometry(np.full(2, 0.8), np.array([0.3, -0.2]), np.eye(2))
    luma = _sampled(Geometry(np.full(3, 0.8), np.array([0.0, 0.3, -0.2]), np.eye(3)), (1, 40, 40)).array[0]
    colour = np.clip(np.stack([luma, 0.6 * luma, 0.3 * luma + 0.1], axis=-1) / luma.max(), 0, 1).astype(np.float32)
    moving = ImageVolume(colour, grid, is_rgb=True)
    result = FusionEngine(load_method("identity+max", spatial_dims=2), device="cpu").run_fusion(
        reference, moving, quality=False)
    expected = resample_to_reference(moving, reference).array
    inside = resample_to_reference(ImageVolume(np.ones((40, 40), np.float32), grid), reference).array == 1
    assert result.aligned.array.shape == (32, 32, 3)
    np.testing.assert_allclose(result.aligned.array[inside], expected[inside], atol=2e-3)
