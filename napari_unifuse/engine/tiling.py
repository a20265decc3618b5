"""Overlapping-tile inference with smooth blending, for inputs larger than one forward pass.

TorchIO's :class:`~torchio.GridSampler` places the tiles (all of one size, the last one along an
axis shifted back to end at the border) and :class:`HannBlend` blends them as TorchIO's
``GridAggregator`` does in ``hann`` mode: every voxel is the Hann-weighted mean of the tiles
covering it, with weights that are small but never zero at a tile's edge, so a per-voxel function
is reproduced exactly and a network's tile-border artefacts fade out instead of leaving seams.

TorchIO works on 3D tensors; a 2D image travels as a ``(C, y, x, 1)`` volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torchio

from napari_unifuse.engine.progress import CancelToken, ProgressCallback, ignore_progress
from napari_unifuse.errors import InputError


@dataclass(frozen=True)
class TilePrediction:
    """What one tile's forward pass yields.

    ``dense``: ``(K, *tile_shape)`` maps blended voxel-wise (fused, restored, displacement, ...).
    ``per_slice``: ``(n, M)`` values per slice along axis 0 of the tile (3D: ``n = tile_shape[0]``;
    2D: ``n = 1``, the image is one slice), averaged over the tiles that cover each slice.
    ``per_tile``: ``(M,)`` a value for the whole tile, averaged over all tiles.
    """

    dense: torch.Tensor
    per_slice: torch.Tensor
    per_tile: torch.Tensor


@dataclass(frozen=True)
class BlendedPrediction:
    dense: torch.Tensor  # (K, *spatial)
    per_slice: torch.Tensor  # (spatial[0] for 3D, 1 for 2D, M)
    per_tile: torch.Tensor  # (M,)
    tile_count: int


TilePredictor = Callable[[torch.Tensor], TilePrediction]


class HannBlend:
    """Hann-weighted sums of tiles, TorchIO's ``GridAggregator(overlap_mode="hann")`` arithmetic with
    the memory of one weight map: TorchIO keeps a weight map per output channel and divides into a
    third copy, which for the engine's six maps of a 512×512×200 CT was 2.5 GB of the run's peak.
    ``(C, *spatial)`` tensors, 3-D (a 2-D image travels as ``(C, y, x, 1)``)."""

    def __init__(self, spatial_shape: tuple[int, ...], tile_shape: tuple[int, ...]) -> None:
        self.spatial_shape = spatial_shape
        self.window = torch.ones(())
        for axis, side in enumerate(tile_shape):
            # Hann window of side + 2 points without its zero ends: no voxel gets weight 0.
            profile = torch.hann_window(side + 2, periodic=False)[1:-1]
            self.window = self.window * profile.view(*(side if a == axis else 1 for a in range(len(tile_shape))))
        self.total: torch.Tensor | None = None
        self.weight = torch.ones(())

    def add(self, tile: torch.Tensor, location: torch.Tensor) -> None:
        """``tile`` (C, *tile_shape) at ``location`` (start indices, then end indices)."""
        if self.total is None:
            self.total = torch.zeros(len(tile), *self.spatial_shape)
            if len(tile):  # a pass that only classifies blends no map and needs no weights
                self.weight = torch.zeros(self.spatial_shape)
        if len(tile):
            region = tuple(slice(int(start), int(end)) for start, end in zip(location[:3], location[3:]))
            self.total[(slice(None), *region)] += tile * self.window
            self.weight[region] += self.window

    def blended(self) -> torch.Tensor:
        """The weighted mean, computed in place: the sums are gone afterwards."""
        assert self.total is not None, "no tile was added"
        return self.total.div_(self.weight)


# A tile size: one side for every axis, one side per axis, or None (the whole input).
TileSize = int | tuple[int, ...] | None


def tile_layout(
    spatial_shape: tuple[int, ...], tile_size: TileSize, size_multiple: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile shape and overlap for a volume already padded to ``size_multiple``.

    Each tile side is ``tile_size`` (per axis when a tuple) rounded down to the model's size
    multiple and clipped to the volume; ``None`` means one tile covering everything. Neighbouring
    tiles overlap by a quarter of a tile (an even number, as the grid sampler needs), enough for
    the blending to hide seams.
    """
    if any(side % size_multiple for side in spatial_shape):
        raise ValueError(f"shape {spatial_shape} is not padded to a multiple of {size_multiple}")
    if tile_size is None:
        return tuple(spatial_shape), (0,) * len(spatial_shape)
    sizes = tile_size if isinstance(tile_size, tuple) else (tile_size,) * len(spatial_shape)
    if len(sizes) != len(spatial_shape):
        raise ValueError(f"tile size {tile_size} does not fit a {len(spatial_shape)}D shape")
    if min(sizes) < size_multiple:
        raise InputError(
            f"tile size {tile_size} is smaller than the model's size multiple {size_multiple}",
            "--tile-size",
        )
    tile_shape = tuple(min(size - size % size_multiple, extent) for size, extent in zip(sizes, spatial_shape))
    overlap = tuple(_overlap(tile, extent) for tile, extent in zip(tile_shape, spatial_shape))
    return tile_shape, overlap


def _overlap(tile: int, extent: int) -> int:
    return 0 if tile == extent else 2 * (tile // 8)


def tiles_along(extent: int, tile: int) -> int:
    """How many tiles of ``tile`` voxels (overlapping as ``tile_layout`` makes them) the grid
    sampler places along an axis of ``extent`` voxels: one per step of tile minus overlap, plus
    one shifted back to end at the border when the steps fall short of it."""
    if tile >= extent:
        return 1
    step = tile - _overlap(tile, extent)
    count = (extent - tile) // step + 1
    return count + (1 if (count - 1) * step != extent - tile else 0)


# The thinnest tile side chosen automatically (or the whole axis when shorter): thinner slabs leave
# the network little context across them and the degradation read-out less than its 32-64 voxel
# training window.
MIN_AUTO_TILE_SIDE = 64


def auto_tile_shape(spatial_shape: tuple[int, ...], size_multiple: int, max_voxels: int) -> tuple[int, ...] | None:
    """The tile shape (sides multiples of ``size_multiple``) of at most ``max_voxels`` that covers
    ``spatial_shape`` in the fewest overlapping tiles, and among those with the fewest voxels
    computed in all; None when the whole volume fits in one pass. Fewest tiles first: each tile is
    a forward pass with its own fixed cost, and a larger tile gives the network more context.

    Tiles need not be cubes: 256×256×180 in tiles of at most 176³ voxels takes eight 176³ cubes
    (43.6 M voxels computed for 11.8 M, overlaps included), but three 256×256×72 slabs (14.2 M).
    Per axis only the smallest side giving each tile count is a candidate (a larger one computes
    more for the same count).
    """
    if math.prod(spatial_shape) <= max_voxels:
        return None
    candidates_per_axis = []
    for extent in spatial_shape:
        smallest_per_count: dict[int, int] = {}
        thinnest = min(extent, max(MIN_AUTO_TILE_SIDE, size_multiple))
        for side in range(extent - extent % size_multiple, thinnest - 1, -size_multiple):
            smallest_per_count[tiles_along(extent, side)] = side
        candidates_per_axis.append(sorted(smallest_per_count.items()))
    best: tuple[int, int, tuple[int, ...]] | None = None  # (tiles, voxels computed, sides)
    for combination in itertools.product(*candidates_per_axis):
        sides = tuple(side for _, side in combination)
        if math.prod(sides) > max_voxels:
            continue
        count = math.prod(tiles for tiles, _ in combination)
        key = (count, count * math.prod(sides), sides)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:  # max_voxels below the thinnest tiles: those, the out-of-memory fallback shrinks them further
        return tuple(max(candidates)[1] for candidates in candidates_per_axis)
    return best[2]


def predict_tiled(
    predict: TilePredictor,
    image: torch.Tensor | Sequence[torch.Tensor],
    tile_shape: tuple[int, ...],
    overlap: tuple[int, ...],
    *,
    progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
    stage: str = "fuse",
) -> BlendedPrediction:
    """Run ``predict`` on overlapping tiles of ``image`` ``(C, *spatial)`` and blend the results.
    ``image`` may also be a sequence of such tensors on one grid, whose channels each tile
    concatenates: the whole input then never exists stacked (the engine's moved image, reference
    and field, 1 GB at 512×512×200).

    Reports ``progress(stage, done, total)`` after every tile and checks ``cancel`` before each one,
    so a cancelled run stops within one tile.
    """
    parts = (image,) if isinstance(image, torch.Tensor) else tuple(image)
    spatial_dims = parts[0].ndim - 1
    if spatial_dims not in (2, 3) or len(tile_shape) != spatial_dims or len(overlap) != spatial_dims:
        raise ValueError(f"image {tuple(parts[0].shape)} does not match tile shape {tile_shape}")
    if any(part.shape[1:] != parts[0].shape[1:] for part in parts):
        raise ValueError(f"the parts of an image must share one grid, got {[tuple(p.shape) for p in parts]}")
    as_3d = (lambda t: t.unsqueeze(-1)) if spatial_dims == 2 else (lambda t: t)
    from_3d = (lambda t: t.squeeze(-1)) if spatial_dims == 2 else (lambda t: t)
    padding = (1,) if spatial_dims == 2 else ()
    no_overlap = (0,) if spatial_dims == 2 else ()

    spatial_3d = (*parts[0].shape[1:], *padding)
    tile_3d, overlap_3d = (cast(tuple[int, int, int], tuple(sizes) + extra)
                           for sizes, extra in ((tile_shape, padding), (overlap, no_overlap)))
    # TorchIO only places the tiles: it reads nothing but the shape of this zero-stride placeholder.
    # An identity affine is enough: tiles are located by index, never by world position.
    placeholder = torchio.Subject(image=torchio.ScalarImage(tensor=torch.zeros(()).expand(1, *spatial_3d)))
    locations = torch.as_tensor(torchio.GridSampler(placeholder, tile_3d, overlap_3d).locations)
    blend = HannBlend(spatial_3d, tile_3d)
    slice_count = parts[0].shape[1] if spatial_dims == 3 else 1
    slice_sum: torch.Tensor | None = None
    slice_hits = torch.zeros(slice_count, 1)
    tile_sum: torch.Tensor | None = None

    total = len(locations)
    progress(stage, 0, total)
    for index, location in enumerate(locations):
        if cancel is not None:
            cancel.raise_if_cancelled()
        region = tuple(slice(int(start), int(end)) for start, end in zip(location[:spatial_dims], location[3:]))
        tile = torch.cat([part.detach()[(slice(None), *region)] for part in parts])
        prediction = predict(tile.cpu())
        blend.add(as_3d(prediction.dense.detach().float().cpu()), location)
        slice_rows = slice(int(location[0]), int(location[3])) if spatial_dims == 3 else slice(0, 1)
        per_slice = prediction.per_slice.detach().float().cpu()
        per_tile = prediction.per_tile.detach().float().cpu()
        if slice_sum is None or tile_sum is None:
            slice_sum = torch.zeros(slice_count, per_slice.shape[-1])
            tile_sum = torch.zeros_like(per_tile)
        slice_sum[slice_rows] += per_slice
        slice_hits[slice_rows] += 1
        tile_sum += per_tile
        progress(stage, index + 1, total)

    assert slice_sum is not None and tile_sum is not None  # a grid sampler yields at least one tile
    return BlendedPrediction(
        dense=from_3d(blend.blended()),
        per_slice=slice_sum / slice_hits,
        per_tile=tile_sum / total,
        tile_count=total,
    )
