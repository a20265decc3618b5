"""Displacement fields on disk as ITK displacement fields (SimpleITK / ANTs / Slicer convention).

In memory (docs/architecture.md) ``u`` has shape ``(ndim, *spatial)``, voxel units, array-axis
order components, and the aligned image is ``moving`` sampled at ``x + u(x)`` on the reference
grid. ITK's DisplacementFieldTransform maps a physical point ``p`` to ``p + d(p)`` with ``d`` in
LPS mm, x/y/z components. On the reference grid ``world(x + u) - world(x) = A u`` with ``A`` the
linear part of ``index_to_world``, so ``d = reversed(A u)``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import Geometry
from napari_unifuse.io.readers import itk_source
from napari_unifuse.io.writers import itk_destination

_GZIP_CHECK_CHUNK = 1 << 22


def write_displacement(u: np.ndarray, reference_geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write ``u`` (voxels, array order) as an ITK displacement field on the reference grid."""
    path = Path(path)
    u = np.asarray(u, dtype=np.float64)
    ndim = reference_geometry.ndim
    if u.ndim != ndim + 1 or u.shape[0] != ndim:
        raise InputError(f"a {ndim}D displacement must have shape ({ndim}, *spatial), got {u.shape}", path)
    if not np.all(np.isfinite(u)):
        raise InputError("the displacement holds NaN or infinite values", path)
    linear = reference_geometry.index_to_world[:ndim, :ndim]
    physical = np.einsum("ij,j...->...i", linear, u)  # (*spatial, ndim), array-order components
    image = sitk.GetImageFromArray(physical[..., ::-1].astype(np.float32), isVector=True)
    reference_geometry.to_sitk(image)
    try:
        with itk_destination(path) as staged:
            sitk.WriteImage(image, staged, useCompression=True)
    except (RuntimeError, OSError) as error:
        raise InputError(f"SimpleITK could not write the field: {str(error).strip().splitlines()[-1]}", path) from error
    _refuse_cut_short(path)
    return path


def _refuse_cut_short(path: Path) -> None:
    """SimpleITK reports no failed write: a full disk leaves a truncated field that still reads,
    with wrong values. A compressed file whose gzip stream reads to its end is whole."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_GZIP_CHECK_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"the field was not written completely (is the disk full?): {error}", path) from error


def read_displacement(path: str | os.PathLike, reference_geometry: Geometry | None = None) -> np.ndarray:
    """Read an ITK displacement field back to ``u`` (float32, voxels, array order).

    With ``reference_geometry`` the field's grid must match it (a field is only meaningful on
    the grid it was computed for).
    """
    path = Path(path)
    try:
        with itk_source(path) as source:
            try:
                image = sitk.ReadImage(source)
            except RuntimeError as error:
                detail = str(error).strip().splitlines()[-1].replace(source, str(path))
                raise InputError(f"cannot be read as a displacement field: {detail}", path) from error
    except OSError as error:  # a file that cannot be linked or copied for ITK (missing, unreadable)
        raise InputError(f"cannot be read as a displacement field: {error}", path) from error
    ndim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != ndim:
        raise InputError(
            f"a {ndim}D displacement field needs {ndim} components per voxel, "
            f"this file has {image.GetNumberOfComponentsPerPixel()}",
            path,
        )
    geometry = Geometry.from_sitk(image)
    if reference_geometry is not None and not geometry.allclose(reference_geometry, atol=1e-4):
        raise InputError(
            f"the field's grid {geometry} differs from the reference grid {reference_geometry}", path
        )
    geometry = reference_geometry or geometry
    physical = sitk.GetArrayFromImage(image).astype(np.float64)[..., ::-1]
    inverse = np.linalg.inv(geometry.index_to_world[:ndim, :ndim])
    return np.einsum("ij,...j->i...", inverse, physical).astype(np.float32)
