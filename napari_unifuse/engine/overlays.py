"""The numpy behind the workbench's review views: quivers, deformed grid, checkerboard, error maps.

Everything here is plain arrays in, plain arrays out, on the reference grid (array-axis order,
voxel units as in docs/architecture.md); the napari layers that show them get the reference's
``Geometry.napari_kwargs()``, so index coordinates here are world coordinates there.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.provenance import sha256_of_array
from napari_unifuse.io import ImageVolume
from napari_unifuse.metrics import jacobian_determinant

# Percentiles that set the display window of a grey image: robust to a few hot voxels (metal,
# lesions) that would otherwise squash everything else to black.
_WINDOW_PERCENTILES = (0.5, 99.5)
# Decimals (mm) of an in-memory input's index→world matrix that its fingerprint keeps: far finer
# than any voxel, coarser than float noise.
_PLACEMENT_DECIMALS = 6


def grey_values(volume: ImageVolume) -> np.ndarray:
    """The image as one grey channel: BT.601 luma in [0, 1] for RGB (as the engine fuses it), the values otherwise."""
    if volume.is_rgb:  # from its own dtype: a uint8 RGB as read is in 0-255, which rgb_to_ycbcr scales
        return rgb_to_ycbcr(volume.array)[..., 0].astype(np.float32)
    return np.asarray(volume.array, dtype=np.float32)


def display_window(values: np.ndarray) -> tuple[float, float]:
    """Low/high display limits from robust percentiles of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, _WINDOW_PERCENTILES)
    return float(low), float(high)


def display_grey(volume: ImageVolume, window: tuple[float, float] | None = None) -> np.ndarray:
    """Grey float32 in [0, 1] for side-by-side views and metrics; ``window`` defaults to the image's
    own (pass another image's window to compare two images in the same units, e.g. aligned vs label)."""
    values = grey_values(volume)
    low, high = display_window(values) if window is None else window
    if high <= low:
        return np.zeros_like(values)
    return np.clip((np.nan_to_num(values) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def checkerboard(first: np.ndarray, second: np.ndarray, tile: int) -> np.ndarray:
    """``first`` on the "white" tiles, ``second`` on the "black" ones, tiles of ``tile`` pixels in-plane.

    Tiles alternate over the last two (in-slice) axes only, so each slice shows a full board
    whatever slice is viewed, as in 3D Slicer's and ITK-SNAP's checkerboard views.
    """
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} vs {second.shape}")
    tile = max(1, int(tile))
    rows = (np.arange(first.shape[-2]) // tile)[:, None]
    cols = (np.arange(first.shape[-1]) // tile)[None, :]
    white = (rows + cols) % 2 == 0
    return np.where(white, first, second)


def deformed_grid(displacement: np.ndarray, spacing: int, single_slice_axis: int | None = None) -> np.ndarray:
    """A grid of lines every ``spacing`` voxels (in-slice), warped by the field like the moving image.

    Bright lines bend where the model moves tissue; crossings squeezed together or folded over show
    compression and folding at a glance, complementing the quivers.

    The lines run along the last two stored axes (each slice along the first axis holds the same
    grid): read it sliced along the first axis. Sliced along another axis it shows stripes and
    solid sheets, and motion along the first axis (through those slices) never bends a line. A
    one-slice volume (``single_slice_axis``, as ``ImageVolume.single_slice_axis``) is viewed in its
    own plane: its lines run along the two other axes, as on a 2D image.
    """
    spatial = displacement.shape[1:]
    spacing = max(2, int(spacing))
    in_plane = [axis for axis in range(len(spatial)) if axis != single_slice_axis][-2:]
    lines = np.zeros(spatial, dtype=np.float32)
    for axis in in_plane:
        on_line = (np.arange(spatial[axis]) % spacing) == 0
        index: list[slice | None] = [None] * len(spatial)
        index[axis] = slice(None)
        lines = np.maximum(lines, np.broadcast_to(on_line[tuple(index)], spatial).astype(np.float32))
    return warp_array(lines, displacement, order=1).astype(np.float32)


def displacement_magnitude_mm(displacement: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """|u| in millimetres at every voxel (directions are orthonormal, so only spacing scales it)."""
    scale = np.asarray(spacing_mm, dtype=np.float32).reshape(-1, *([1] * (displacement.ndim - 1)))
    return np.linalg.norm(displacement * scale, axis=0)


@dataclass(frozen=True)
class Quivers:
    """napari Vectors data ``(N, 2, ndim)`` (start index, in-slice displacement) and each magnitude in mm."""

    vectors: np.ndarray
    magnitude_mm: np.ndarray


def slice_quivers(
    displacement: np.ndarray,
    spacing_mm: np.ndarray,
    stride: int,
    slice_axis: int | None = None,
    slice_index: int = 0,
) -> Quivers:
    """Displacement arrows on a grid of every ``stride``-th voxel of one slice (or the whole 2D image).

    Only the in-slice components are drawn (the slice's own axis is zeroed): an arrow leaving the
    plane cannot be drawn in it. The magnitude, used for colour, is the full 3D length in mm, so a
    large through-plane shift still stands out as a bright short arrow.
    """
    ndim = displacement.shape[0]
    stride = max(1, int(stride))
    axes = [np.arange(stride // 2, side, stride) for side in displacement.shape[1:]]
    if slice_axis is not None:
        slice_index = int(np.clip(slice_index, 0, displacement.shape[1 + slice_axis] - 1))
        axes[slice_axis] = np.array([slice_index])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, ndim)
    components = displacement[(slice(None), *grid.T)].T.astype(np.float32)  # (N, ndim) voxels
    magnitude = np.linalg.norm(components * np.asarray(spacing_mm, dtype=np.float32), axis=1)
    if slice_axis is not None:
        components[:, slice_axis] = 0.0
    return Quivers(np.stack([grid.astype(np.float32), components], axis=1), magnitude)


def absolute_error(aligned: np.ndarray, label: np.ndarray) -> np.ndarray:
    """|aligned − label| per voxel, in the aligned image's units (both must share a grid)."""
    if aligned.shape != label.shape:
        raise ValueError(f"aligned {aligned.shape} and label {label.shape} are not on one grid")
    return np.abs(np.asarray(aligned, dtype=np.float32) - np.asarray(label, dtype=np.float32))


def field_jacobian(displacement: np.ndarray, single_slice_axis: int | None = None) -> np.ndarray:
    """det J of the field at every voxel (``metrics.jacobian_determinant``), float32; on a one-slice
    volume (``single_slice_axis``, as ``ImageVolume.single_slice_axis``) that of its in-plane field,
    put back on the volume's grid: nothing can vary across a single slice."""
    if single_slice_axis is None:
        return jacobian_determinant(displacement).astype(np.float32)
    in_plane = np.delete(displacement, single_slice_axis, axis=0).take(0, axis=single_slice_axis + 1)
    return np.expand_dims(jacobian_determinant(in_plane).astype(np.float32), single_slice_axis)


def folding_mask(jacobian_determinant: np.ndarray) -> np.ndarray:
    """1 where det J ≤ 0 (the mapping folds space over itself), else 0: a napari Labels layer."""
    return (jacobian_determinant <= 0).astype(np.uint8)


def slice_of(array: np.ndarray, slice_axis: int | None, slice_index: int) -> np.ndarray:
    """The 2D slice viewed (the array itself for 2D images)."""
    if slice_axis is None:
        return array
    return np.take(array, int(np.clip(slice_index, 0, array.shape[slice_axis] - 1)), axis=slice_axis)


def input_fingerprint(volume: ImageVolume, digest: Callable[[np.ndarray], str] = sha256_of_array) -> str:
    """What identifies an input across sessions: always its content hash, so a file replaced in
    place by another image is another input, with a run folder of its own, not the old one's flags
    and outputs; with its file path where it has a file, else with its grid (data type and
    placement). Never a layer name: the same image renamed, or added again under another name (sample
    data, another plugin's reader, the console), is the same input and finds its run folder."""
    if volume.source and Path(volume.source).exists():
        return f"{Path(volume.source).resolve()}:{_content_fingerprint(volume, digest)}"
    return grid_fingerprint(volume, digest)


def grid_fingerprint(volume: ImageVolume, digest: Callable[[np.ndarray], str] = sha256_of_array) -> str:
    """:func:`input_fingerprint` of an input without a file: its data type, placement and content.
    Up to 2026-12-07 also that of a file napari's own reader (not ours) opened, whose layer did not
    name its file then: :func:`run_folder` finds the folders made under it."""
    # Rounded so that a placement recomputed from a layer's scale and translate hashes alike; + 0.0
    # turns -0.0 into 0.0, whose bytes differ.
    placement = np.round(volume.geometry.index_to_world, _PLACEMENT_DECIMALS) + 0.0
    return f"{volume.array.dtype}:{sha256_of_array(placement)[:16]}:{_content_fingerprint(volume, digest)}"


def _content_fingerprint(volume: ImageVolume, digest: Callable[[np.ndarray], str]) -> str:
    return f"{volume.array.shape}:{digest(volume.array)[:16]}"


def checkpoint_identity(checkpoint: str) -> str:
    """What tells one model from another: a bundled checkpoint's name, or a checkpoint file's resolved
    path, size and modification time, so that a file retrained in place (``train --resume``
    rewrites ``last.safetensors``) counts as another model."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        return checkpoint
    status = path.stat()
    return f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"


def run_folder(root: str | Path, reference: str, moving: str, checkpoint: str, fingerprints: tuple[str, ...],
               settings: Mapping[str, object] | None = None, earlier_fingerprints: tuple[str, ...] = ()) -> Path:
    """``root/<reference>+<moving>__<checkpoint name>__<hash>``: the same inputs, checkpoint and
    settings give the same folder (so a reopened run finds its annotations), different ones never
    collide.

    Only the hash identifies the run; the layer names in front are for reading. Files opened in
    another order, or layers renamed, get other names for the same inputs: a folder under ``root``
    that ends in the same ``__<checkpoint name>__<hash>`` is that run's, and is reused (of several,
    the most recently modified).

    ``checkpoint``: a bundled checkpoint's name, or a checkpoint file, which counts by its resolved
    path, size and modification time: two runs' ``last.safetensors``, or a file retrained in place,
    are different models and get different folders.

    ``settings``: name → value of the settings that change the run's result (tile size, declared
    degradation): two results never share a folder, whose saved outputs and report would describe
    different runs. One left to the engine (None or "auto") is not hashed, so a run on the defaults
    keeps the folder it had before settings counted.

    ``earlier_fingerprints``: per input, the fingerprint an earlier version gave it
    (:func:`grid_fingerprint` for a file napari's own reader opened). Where no folder exists under
    ``fingerprints``, one made under the earlier ones, for either input or both, is reused: its
    flags and saved outputs are of these inputs."""
    chosen = sorted(f"{name}={value}" for name, value in (settings or {}).items() if value not in (None, "auto"))
    checkpoint_part = (checkpoint_identity(checkpoint), *chosen)
    model = _slug(Path(checkpoint).expanduser().stem)
    root = Path(root).expanduser()
    # The first combination is today's fingerprints alone; dict.fromkeys drops an unchanged earlier one.
    keys_per_input = [dict.fromkeys((today, earlier)) for today, earlier
                      in zip(fingerprints, earlier_fingerprints or fingerprints, strict=True)]
    suffixes = [_run_suffix(model, (*keys, *checkpoint_part)) for keys in itertools.product(*keys_per_input)]
    found = next(filter(None, (_existing_run_folder(root, suffix) for suffix in suffixes)), None)
    return found or root / f"{_slug(f'{reference}+{moving}')}{suffixes[0]}"


def _run_suffix(model: str, identity: tuple[str, ...]) -> str:
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:10]
    return f"__{model}__{digest}"


def path_keyed_input_fingerprint(volume: ImageVolume, layer_name: str,
                                 digest: Callable[[np.ndarray], str] = sha256_of_array) -> str:
    """An input as the workbench knew it up to 2026-12-06 (versions 22873cd, 576ac67): by its file's
    resolved path alone, or, without a file, by its layer name, shape and content hash. Kept to find
    the run folders, and the flags, of those versions (:func:`path_keyed_run_folder`)."""
    if volume.source and Path(volume.source).exists():
        return str(Path(volume.source).resolve())
    return f"{layer_name}:{volume.array.shape}:{digest(volume.array)[:16]}"


def path_keyed_run_folder(root: str | Path, checkpoint: str, fingerprints: tuple[str, ...]) -> Path | None:
    """The folder under ``root`` that the workbench up to 2026-12-06 (22873cd, 576ac67) gave a run of
    the inputs of ``fingerprints`` (:func:`path_keyed_input_fingerprint`) with ``checkpoint``, where
    it exists; None otherwise. Those versions hashed the inputs with the checkpoint's name alone
    (its file name without extension) and neither the contents nor the settings, so its flags may
    describe other contents of the same files."""
    name = Path(checkpoint).expanduser().stem
    return _existing_run_folder(Path(root).expanduser(), _run_suffix(_slug(name), (*fingerprints, name)))


def _existing_run_folder(root: Path, suffix: str) -> Path | None:
    """The most recently modified folder of ``root`` whose name ends in ``suffix`` (ties: by name)."""
    candidates = _folders_ending_in(root, suffix)
    return root / max(candidates)[1] if candidates else None


def _folders_ending_in(root: Path, suffix: str) -> list[tuple[int, str]]:
    """(modification time in ns, name) of each folder of ``root`` whose name ends in ``suffix``."""
    try:
        return [(entry.stat().st_mtime_ns, entry.name) for entry in root.iterdir()
                if entry.name.endswith(suffix) and entry.is_dir()]
    except OSError:  # no runs folder yet, or one that cannot be listed: a new run folder then
        return []


def _run_ending(folder: Path) -> str | None:
    """The ``__<hash>`` that ends a :func:`run_folder` name (the hash covers the checkpoint, so the
    checkpoint's name before it adds nothing); None for a folder named otherwise."""
    ending = folder.name[folder.name.rfind("__"):]
    return ending if re.fullmatch(r"__[0-9a-f]{10}", ending) else None


def joined_run_folder(folder: Path) -> Path:
    """``folder``, a :func:`run_folder` chosen when it did not exist yet, or the folder of the same run
    made since under other layer names (another workbench on the same images, which wrote first):
    every writer then joins the first folder rather than splitting the run's flags between two."""
    ending = _run_ending(folder)
    if folder.is_dir() or ending is None:
        return folder
    return _existing_run_folder(folder.parent, ending) or folder


def other_folders_of_run(folder: Path) -> list[Path]:
    """The folders beside ``folder`` that hold the same run under other layer names, by name: two
    workbenches that ran the same images under other names before either wrote its folder."""
    ending = _run_ending(folder)
    if ending is None:
        return []
    return sorted(folder.parent / name for _, name in _folders_ending_in(folder.parent, ending)
                  if name != folder.name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._-]+", "-", text).strip("-")[:60] or "input"
