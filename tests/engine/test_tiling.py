"""The tiler must be invisible: stitched tiles equal one pass over the whole input."""

from __future__ import annotations

import math

import pytest
import torch
import torchio

from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.engine.tiling import (
    MIN_AUTO_TILE_SIDE,
    HannBlend,
    TilePrediction,
    auto_tile_shape,
    predict_tiled,
    tile_layout,
    tiles_along,
)
from napari_unifuse.errors import Cancelled, InputError


def voxelwise_prediction(tile: torch.Tensor) -> TilePrediction:
    """A deterministic per-voxel map plus per-slice values that depend on whole slices only.

    Channel 0 of the test inputs is constant within each slice (slice_constant_image), so a
    slice's mean over any tile equals its mean over the full slice and must blend back exactly.
    """
    dense = torch.cat([torch.sin(3 * tile) + tile**2, tile[:1] * -2.0], dim=0)
    per_slice = tile[0].mean(dim=(1, 2)) if tile.ndim == 4 else tile[0].mean().reshape(1)
    return TilePrediction(
        dense=dense,
        per_slice=torch.stack([per_slice, 1 - per_slice], dim=-1),
        per_tile=torch.tensor([0.25, 0.75]),
    )


def slice_constant_image(spatial_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((2, *spatial_shape), generator=generator)
    # Channel 0 constant per slice (3D: per z; 2D: the image is one slice).
    slice_values = torch.rand(spatial_shape[0] if len(spatial_shape) == 3 else 1, generator=generator)
    noise[0] = slice_values.reshape(-1, *(1,) * (len(spatial_shape) - 1)).expand(spatial_shape)
    return noise


@pytest.mark.parametrize(
    ("spatial_shape", "tile_size"),
    [((40, 48, 32), 16), ((64, 56), 24), ((24, 16, 16), 16)],
)
def test_stitched_tiles_equal_untiled_prediction(spatial_shape, tile_size):
    image = slice_constant_image(spatial_shape, seed=1)
    tile_shape, overlap = tile_layout(spatial_shape, tile_size, size_multiple=8)
    tiled = predict_tiled(voxelwise_prediction, image, tile_shape, overlap)
    whole = voxelwise_prediction(image)

    assert tiled.tile_count > 1
    assert tiled.dense.shape == whole.dense.shape
    torch.testing.assert_close(tiled.dense, whole.dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled.per_slice, whole.per_slice.reshape(tiled.per_slice.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled.per_tile, torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize(("spatial_shape", "tile_shape", "overlap"),
                         [((40, 48, 32), (16, 16, 16), (4, 4, 4)), ((64, 56, 1), (24, 24, 1), (6, 6, 0))])
def test_hann_blend_equals_torchios_aggregator_bitwise(spatial_shape, tile_shape, overlap):
    """HannBlend keeps one weight map where TorchIO keeps one per channel; the numbers must not change."""
    generator = torch.Generator().manual_seed(3)
    subject = torchio.Subject(image=torchio.ScalarImage(tensor=torch.rand((1, *spatial_shape), generator=generator)))
    sampler = torchio.GridSampler(subject, tile_shape, overlap)
    reference = torchio.GridAggregator(sampler, overlap_mode="hann")
    blend = HannBlend(spatial_shape, tile_shape)
    for index in range(len(sampler)):
        location = sampler[index][torchio.LOCATION]
        tile = torch.rand((3, *tile_shape), generator=generator)  # each tile its own values: overlaps disagree
        reference.add_batch(tile[None], location[None])
        blend.add(tile, location)

    assert len(sampler) > 1
    assert torch.equal(blend.blended(), reference.get_output_tensor())


@pytest.mark.parametrize(("spatial_shape", "tile_size"), [((40, 48, 32), 16), ((64, 56), 24)])
def test_channel_groups_tile_as_their_stack(spatial_shape, tile_size):
    """The engine hands its moved image, reference and field over as parts, never stacked whole."""
    image = slice_constant_image(spatial_shape, seed=2)
    tile_shape, overlap = tile_layout(spatial_shape, tile_size, size_multiple=8)
    seen = []

    def recording(tile):
        seen.append(tile.shape[0])
        return voxelwise_prediction(tile)

    stacked = predict_tiled(voxelwise_prediction, image, tile_shape, overlap)
    parts = predict_tiled(recording, (image[:1], image[1:]), tile_shape, overlap)

    assert seen and set(seen) == {2}
    assert torch.equal(parts.dense, stacked.dense)
    assert torch.equal(parts.per_slice, stacked.per_slice)
    with pytest.raises(ValueError, match="share one grid"):
        predict_tiled(voxelwise_prediction, (image[:1], image[1:, :-1]), tile_shape, overlap)


def test_tile_layout_rounds_to_size_multiple_and_clips_to_volume():
    tile_shape, overlap = tile_layout((64, 16, 48), 30, size_multiple=8)
    assert tile_shape == (24, 16, 24)
    assert overlap == (6, 0, 6)  # no overlap along an axis a single tile covers
    assert tile_layout((32, 32), None, size_multiple=16) == ((32, 32), (0, 0))
    with pytest.raises(InputError, match="smaller than the model's size multiple"):
        tile_layout((32, 32), 4, size_multiple=8)


def test_progress_is_reported_after_every_tile():
    image = slice_constant_image((32, 32, 32), seed=2)
    calls = []
    tile_shape, overlap = tile_layout((32, 32, 32), 16, size_multiple=8)
    result = predict_tiled(
        voxelwise_prediction, image, tile_shape, overlap,
        progress=lambda stage, done, total: calls.append((stage, done, total)), stage="tiles",
    )
    total = result.tile_count
    assert calls == [("tiles", done, total) for done in range(total + 1)]


def test_cancel_after_first_tile_stops_before_the_second():
    image = slice_constant_image((32, 32, 32), seed=3)
    token = CancelToken()
    tiles_run = []

    def predict_then_cancel(tile):
        tiles_run.append(tile.shape)
        token.cancel()
        return voxelwise_prediction(tile)

    tile_shape, overlap = tile_layout((32, 32, 32), 16, size_multiple=8)
    with pytest.raises(Cancelled):
        predict_tiled(predict_then_cancel, image, tile_shape, overlap, cancel=token)
    assert len(tiles_run) == 1


@pytest.mark.parametrize(("spatial_shape", "tile_shape"), [
    ((256, 256, 180), (176, 176, 176)), ((256, 256, 180), (256, 256, 72)), ((200, 96, 64), (72, 96, 64)),
    ((64, 64, 40), (16, 32, 24)),
])
def test_tiles_along_counts_the_grid_samplers_tiles(spatial_shape, tile_shape):
    """Checked against TorchIO's own sampler, which places the tiles."""
    shape, overlap = tile_layout(spatial_shape, tile_shape, size_multiple=4)
    sampler = torchio.GridSampler(torchio.Subject(image=torchio.ScalarImage(tensor=torch.zeros(1, *spatial_shape))),
                                  shape, overlap)
    assert len(sampler) == math.prod(tiles_along(extent, side) for extent, side in zip(spatial_shape, shape))


def test_automatic_tiles_are_the_fewest_slabs_that_fit_not_cubes():
    limit = 176**3
    assert auto_tile_shape((160, 160, 160), 4, limit) is None  # one pass
    tile = auto_tile_shape((256, 256, 180), 4, limit)
    counts = [tiles_along(extent, side) for extent, side in zip((256, 256, 180), tile)]
    assert math.prod(tile) <= limit and math.prod(counts) == 3  # eight 176³ cubes before
    assert math.prod(counts) * math.prod(tile) < 0.4 * 8 * limit
    # Never thinner than MIN_AUTO_TILE_SIDE, even when thinner slabs would be fewer.
    assert min(auto_tile_shape((200, 512, 512), 4, limit)) >= MIN_AUTO_TILE_SIDE
    # A limit below the thinnest tiles gives the thinnest tiles (the out-of-memory fallback goes on).
    assert auto_tile_shape((256, 256, 256), 4, 1000) == (MIN_AUTO_TILE_SIDE,) * 3


def test_tile_layout_takes_one_side_per_axis():
    assert tile_layout((256, 256, 180), (256, 256, 72), size_multiple=4) == ((256, 256, 72), (0, 0, 18))
    with pytest.raises(ValueError, match="does not fit"):
        tile_layout((64, 64), (32, 32, 32), size_multiple=4)
