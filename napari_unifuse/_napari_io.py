"""npe2 reader and writers, and the conversions between ImageVolume and napari Image layers.

Layers we create carry ``metadata["unifuse"] = {"geometry", "source", "metadata"}`` so that a
volume → layer → volume round trip is exact and keeps provenance. A layer our reader opened also
carries ``"read_sha256"``, the hash of the array read, and ``"read_stamp"``, what the file looked
like on disk then: once napari gives the layer other pixels (``layer.data = …``), or the file is
replaced by another image, ``layer_to_volume`` no longer names the file as its source. A layer another
reader opened (napari's own, for a PNG) names its file where it holds what our reader reads there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import napari
import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.transforms import Affine

from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import Geometry, ImageVolume, read_image, write_image
from napari_unifuse.io.digests import LAYER_DIGESTS, sha256_of_array
from napari_unifuse.io.image import COLOUR_IS_2D_ONLY
from napari_unifuse.io.readers import (
    cmyk_as_rgb,
    colour_in_unit_range,
    dicom_series,
    dicom_series_ids,
    dicomdir_in,
    file_format,
    note_dropped_alpha,
    picture_mode,
)

LAYER_METADATA_KEY = "unifuse"
# In ``metadata["unifuse"]`` of a layer our reader opened: the sha256 of the array it read.
READ_SHA256_KEY = "read_sha256"
# Also there: the file's ``_source_stamp`` when it was read, so that a file replaced since is told
# from one left alone without reading it again at every change of the workbench's form.
READ_STAMP_KEY = "read_stamp"
# napari's documented "read fine, but no layers" value; returning [] instead makes napari raise
# "returned no data" and open its reader-choice dialog on top of our message.
_NO_LAYERS = [(None,)]


def volume_to_layer_data(volume: ImageVolume, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A ``(data, kwargs, "image")`` tuple that places the volume at its world position.

    A coronal or sagittal volume's layer holds its array in world-axis order
    (``ImageVolume.in_world_axis_order``, slices foot to head): napari cannot draw the axes of a
    permuted grid as a plane, and its slider's step k is then array slice k, as the per-slice outputs
    count. ``layer_to_volume`` then gives that reoriented volume back (same voxels, same world)."""
    volume = volume.in_world_axis_order()
    if name is None:
        name = _display_name(volume.source) if volume.source else "image"
    kwargs = {
        "name": name,
        "rgb": volume.is_rgb,
        "metadata": {
            LAYER_METADATA_KEY: {
                "geometry": volume.geometry.to_dict(),
                "source": volume.source,
                "metadata": volume.metadata,
            }
        },
        **volume.geometry.napari_kwargs(),
    }
    return volume.array, kwargs, "image"


def layer_to_volume(layer) -> ImageVolume:
    """The ImageVolume of a napari Image layer (its current scale/translate/affine define the geometry).

    A layer whose pixels are no longer those its file holds (edited in napari since our reader read
    it, or the file replaced by another image since) is an in-memory image: no source, so that a
    run's provenance records the pixels it fused (``array_sha256``) rather than the file, and a
    warning that says so."""
    data, state, layer_type = layer.as_layer_data_tuple()
    if layer_type != "image":
        raise InputError(f"is a {layer_type} layer; an image layer is needed", layer.name)
    _refuse_frames(data[0] if state.get("multiscale") else data, state, layer.name)
    if not (state.get("metadata") or {}).get(LAYER_METADATA_KEY):  # not our reader's: no source recorded
        volume = volume_from_layer_data(_inks_as_colour(layer, data, state), state)
        file = _file_another_reader_opened(layer, volume)
        return volume if file is None else dataclasses.replace(volume, source=file)
    volume = volume_from_layer_data(data, state)
    pixels = data[0] if state.get("multiscale") else data
    if volume.source is None:
        return volume
    if _edited_since_read(pixels, state):
        why = f"edited since it was read from {volume.source}: its pixels"
    elif _file_changed_since_read(volume.source, pixels, state):
        why = f"{volume.source} changed on disk since it was opened: the pixels read then"
    else:
        return volume
    note = f"{why}, not the file, are recorded"
    return dataclasses.replace(volume, source=None,
                               metadata={**volume.metadata, "warnings": [*volume.metadata.get("warnings", []), note]})


def _refuse_frames(data: Any, state: dict[str, Any], name: str) -> None:
    """A grey layer of more than 3 dimensions (a time series, channels) is refused as the reader
    refuses a 4D file, with how to take the one frame a fusion needs (a colour one: by
    ``volume_from_layer_data``, colour being 2D only)."""
    shape = np.shape(data)
    if state.get("rgb") or len(shape) <= 3:
        return
    frames = "x".join(str(n) for n in shape[:-3])
    raise InputError(
        f"this is a {len(shape)}D layer of shape {shape} with {frames} frames (volumes) of "
        f"{'x'.join(str(n) for n in shape[-3:])} and a fusion takes one: make a layer of the one you want "
        f"(right-click the layer in the layer list ▸ Split Stack gives one layer per frame"
        f"{', once per frame axis' if len(shape) > 4 else ''}; or in napari's console "
        f"viewer.add_image(viewer.layers[{name!r}].data[{', '.join('0' * (len(shape) - 3))}]) for the first)",
        name,
    )


def _inks_as_colour(layer, data: Any, state: dict[str, Any]) -> Any:
    """A layer napari's own reader opened from a CMYK picture holds its four ink channels, which
    napari shows as RGBA: the colours our reader reads there instead (taken as RGBA, C, M, Y fused
    as R, G, B, inverted, and K was dropped as alpha, with a false transparency warning)."""
    if (not state.get("rgb") or state.get("multiscale") or np.ndim(data) != 3 or np.shape(data)[-1] != 4
            or np.asarray(data).dtype != np.uint8):
        return data
    path = getattr(layer.source, "path", None)
    return cmyk_as_rgb(np.asarray(data)) if path and picture_mode(path) == "CMYK" else data


def _file_another_reader_opened(layer, volume: ImageVolume) -> str | None:
    """The file napari's own reader (or another plugin's) opened ``layer`` from, where the layer
    still holds what our reader reads there: that file's input then, as if our reader had opened it,
    with its run folder (flags, saved outputs) and the file in the provenance. None for a layer
    without a file, or with other pixels (edited since, or read otherwise)."""
    path = getattr(layer.source, "path", None)
    if not path or file_format(path) is None:
        return None
    stamp = _source_stamp(path)
    if stamp is None:
        return None
    held = _content_key(volume.array, volume.is_rgb, LAYER_DIGESTS)
    return path if held == _file_content_key(str(Path(path).resolve()), stamp) else None


def _file_changed_since_read(source: str, pixels: Any, state: dict[str, Any]) -> bool:
    """Whether the file our reader read a layer's ``pixels`` from (unedited since) now holds another
    image: only where its stamp changed is it read again, once per change. False where the file is
    gone (the run then records the pixels with the path) or no stamp was taken."""
    read_stamp = state["metadata"][LAYER_METADATA_KEY].get(READ_STAMP_KEY)
    stamp = _source_stamp(source)
    if read_stamp is None or stamp is None or stamp == read_stamp:
        return False
    held = _content_key(np.asarray(pixels), bool(state.get("rgb")), LAYER_DIGESTS)
    return held != _file_content_key(str(Path(source).resolve()), stamp)


def _source_stamp(path: str | os.PathLike) -> tuple | None:
    """Size and modification time of a file; for a DICOM series, of every file in its folder (a
    slice rewritten in place leaves the folder's own time as it was). It changes when the image
    there is replaced; None where the file is gone."""
    try:
        if file_format(path) != "dicom":
            status = os.stat(path)
            return status.st_size, status.st_mtime_ns
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        return tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                            for entry in os.scandir(folder) if entry.is_file()))
    except OSError:
        return None


@functools.lru_cache(maxsize=16)
def _file_content_key(path: str, stamp: tuple) -> str | None:
    """:func:`_content_key` of the file as our reader opens it; by its ``_source_stamp`` too, so
    that a file rewritten is read again (asked at every change of the workbench's form)."""
    try:
        volume = read_image(path).in_world_axis_order()
    except UniFuseError:
        return None
    return _content_key(volume.array, volume.is_rgb, sha256_of_array)


def _content_key(array: np.ndarray, is_rgb: bool, digest: Callable[[np.ndarray], str]) -> str:
    return f"{array.shape}:{array.dtype}:{is_rgb}:{digest(array)}"


def _edited_since_read(data: Any, state: dict[str, Any]) -> bool:
    """Whether ``data`` differs from the array our reader read for this layer (False for a layer it did not read)."""
    read_sha256 = (state.get("metadata") or {}).get(LAYER_METADATA_KEY, {}).get(READ_SHA256_KEY)
    return read_sha256 is not None and LAYER_DIGESTS(np.asarray(data)) != read_sha256


def volume_from_layer_data(data: Any, state: dict[str, Any]) -> ImageVolume:
    """Same as :func:`layer_to_volume` from npe2's ``(data, attributes)`` pair."""
    if state.get("multiscale"):
        data = data[0]  # full resolution
    is_rgb = bool(state.get("rgb", False))
    array = np.asarray(data)
    name = state.get("name", "layer")
    if is_rgb and array.ndim > 3:
        # Before its colour range is judged: a volume rescaled as asked would be refused all the same.
        raise InputError(f"is a {array.ndim - 1}D colour (RGB) image of shape {array.shape}; {COLOUR_IS_2D_ONLY}",
                         name)
    stored = (state.get("metadata") or {}).get(LAYER_METADATA_KEY, {})
    ndim = array.ndim - 1 if is_rgb else array.ndim
    # napari's world = affine @ (translate + rotate·shear·scale · index)
    physical = Affine(
        scale=state.get("scale", np.ones(ndim)),
        translate=state.get("translate", np.zeros(ndim)),
        rotate=state.get("rotate"),
        shear=state.get("shear"),
    ).affine_matrix
    world = np.asarray(state.get("affine", np.eye(ndim + 1)), dtype=np.float64)
    array, index_to_world, warnings = _without_alpha(array, is_rgb, world @ physical, from_unifuse=bool(stored))
    try:
        if is_rgb:  # as read_image holds colour, so that a layer fuses as its file does
            array, colour_warnings = colour_in_unit_range(array)
            warnings += colour_warnings
        geometry = Geometry.from_index_to_world(index_to_world)
    except InputError as error:
        raise InputError(error.problem, name) from error
    if "geometry" in stored:
        stored_geometry = Geometry.from_dict(stored["geometry"])
        # The layer was not moved: keep the file's exact numbers rather than napari's products.
        if stored_geometry.allclose(geometry, atol=1e-9):
            geometry = stored_geometry
    metadata = dict(stored.get("metadata", {}))
    if warnings:
        metadata["warnings"] = [*metadata.get("warnings", []), *warnings]
    return ImageVolume(array, geometry, metadata, stored.get("source"), is_rgb)


def _without_alpha(array: np.ndarray, is_rgb: bool, index_to_world: np.ndarray,
                   from_unifuse: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The picture without the alpha channel napari's own reader keeps, its index → world matrix,
    and the warning our reader gives when it drops a see-through alpha (fusion reads colour).

    napari opens an RGBA picture as an rgb layer of 4 channels, and a grey + alpha (LA) one as a
    (y, x, 2) uint8 layer it takes for 3D, placed by a 3D transform of which the picture's plane is
    the first two axes. A (y, x, 2) layer of ours (it carries our metadata) is a volume two voxels wide."""
    if is_rgb and array.shape[-1] == 4:
        colour, alpha = array[..., :3], array[..., 3]
    elif not is_rgb and not from_unifuse and array.ndim == 3 and array.shape[-1] == 2 and array.dtype == np.uint8:
        colour, alpha = array[..., 0], array[..., 1]
        index_to_world = index_to_world[np.ix_([0, 1, 3], [0, 1, 3])]
    else:
        return array, index_to_world, []
    notes: dict[str, Any] = {}
    note_dropped_alpha(alpha, notes)
    return np.ascontiguousarray(colour), index_to_world, notes.get("warnings", [])


# ---- npe2 reader ------------------------------------------------------------------------------
def get_reader(path: str | list[str]) -> Callable[[str], list] | None:
    """Our reader for one supported file or a folder holding a DICOM series, else None. A file
    without a known suffix (a PACS export's ``IM0001``) is ours only when its content is DICOM:
    file_format reads its first bytes, so anything else is declined at once."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # stacks of files are napari's business
        path = path[0]
    fmt = file_format(path)
    if fmt is None:
        return None
    if Path(path).is_dir() and not dicom_series_ids(path) and dicomdir_in(path) is None:
        return None  # a folder of something else: let other readers have it (a disc's index: ours, to name its series)
    return read_layers


def read_layers(path: str | os.PathLike) -> list:
    """Read ``path`` as napari layer data; problems become a notification, not a traceback.

    A DICOM file (``.dcm`` or any name) opens its whole series, so selecting every file of a series in *File → Open
    Files* (napari reads them one by one) would open the series once per file: a series already
    open in the viewer is not opened again."""
    stamp = _source_stamp(path)  # before reading: a file replaced meanwhile is then read again when a run asks
    try:
        if file_format(path) == "dicom" and not Path(path).is_dir():
            open_as = _layer_holding_series(dicom_series(path)[0])
            if open_as is not None:
                show_info(f"{Path(path).name}: its DICOM series is already open as the layer '{open_as}'")
                return _NO_LAYERS
        volume = read_image(path)
    except UniFuseError as error:
        show_error(f"Could not open {error}")
        return _NO_LAYERS
    for warning in volume.metadata.get("warnings", []):
        show_warning(f"{path}: {warning}")
    data, kwargs, layer_type = volume_to_layer_data(volume, name=_series_name(volume))
    kwargs["metadata"][LAYER_METADATA_KEY][READ_SHA256_KEY] = LAYER_DIGESTS(data)
    kwargs["metadata"][LAYER_METADATA_KEY][READ_STAMP_KEY] = stamp
    return [(data, kwargs, layer_type)]


def _layer_holding_series(key: str) -> str | None:
    """The name of the current viewer's layer read from the DICOM series ``key``, if any."""
    viewer = napari.current_viewer()
    for layer in viewer.layers if viewer is not None else ():
        if (layer.metadata.get(LAYER_METADATA_KEY) or {}).get("metadata", {}).get("dicom_series") == key:
            return layer.name
    return None


def _series_name(volume: ImageVolume) -> str | None:
    """A DICOM series is named by its description, else its folder, not by the file that opened it."""
    if "dicom_series" not in volume.metadata or volume.source is None:
        return None
    source = Path(volume.source)
    folder = source if source.is_dir() else source.parent
    return volume.metadata.get("header", {}).get("SeriesDescription") or folder.name


# ---- npe2 writers -----------------------------------------------------------------------------
# One image or labels layer (napari.yaml): a labels layer (the run's folding mask) is written as its
# label values, on its grid, as an image layer is.
def write_nifti(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    return [str(_write_layer(path, data, meta, (".nii.gz", ".nii")))]


def write_mha(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    return [str(_write_layer(path, data, meta, (".mha",)))]


def _write_layer(path: str, data: Any, meta: dict[str, Any], suffixes: tuple[str, ...]) -> Path:
    if not path.lower().endswith(suffixes):
        path += suffixes[0]
    try:
        return write_image(volume_from_layer_data(data, meta), path)
    except InputError as error:
        # napari takes a ValueError from a writer (InputError is one) for "not my format" and tells
        # the user that no writer was found: re-raise as an error it passes on, with our message.
        raise UniFuseError(f"Could not save {error}") from error


def _display_name(source: str) -> str:
    name = Path(source).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
