"""Displacement fields on disk as ITK displacement fields (SimpleITK / ANTs / Slicer convention).

In memory (docs/architecture.md) ``u`` has shape ``(ndim, *spatial)``, voxel units, array-axis
order components, and the aligned image is ``moving`` sampled at ``x + u(x)`` on the reference
grid. ITK's DisplacementFieldTransform maps a physical point ``p`` to ``p + d(p)`` with ``d`` in
LPS mm, x/y/z components. On the reference grid ``world(x + u) - world(x) = A u`` with ``A`` the
linear part of ``index_to_world``, so ``d = reversed(A u)``.

``world`` there is the placement ITK reads the field file in. For a NIfTI reference without
orientation (qform and sform codes 0) that is not the package's (nibabel's guess, centred with
y flipped in LPS): such a field is written without orientation too, like every output on that grid,
and ITK places it as it places the reference, at origin 0 with identity direction and the voxel
sizes. Its vectors are written in that frame, so that SimpleITK moves points as ``u`` says on the
reference as SimpleITK reads it; ``read_displacement`` converts them back by the same frame.

Likewise a NIfTI field keeping a reference's forms that ITK reads otherwise than nibabel (a sform
ITK passes over for the qform: sheared, or of a code other than 1 beside a qform; see
``NiftiXforms.itk_form``) has its vectors in ITK's placement of the reference grid.

That holds while ITK places the moving image as it places the field (the moving image written on
the reference grid with its forms, or every image placed alike by both tools). Where the two tools
place the moving image otherwise than the field (``itk_placement``: a moving NIfTI without
orientation or one whose forms ITK reads otherwise, or an oriented one beside such a reference),
the vector at a field point ``f(x)`` is where ITK places the moving point the package samples,
minus ``f(x)``: ``d(x) = T(world(x + u)) - f(x)``, ``T`` the moving image's ``itk_placement``.
Such a field is no longer ``u`` in another frame: ``read_displacement`` gives ``u`` back only for a
moving image placed as the field.
"""

from __future__ import annotations

import gzip
import itertools
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import Geometry, ImageVolume
from napari_unifuse.io.nifti_xforms import NiftiXforms, same_placement
from napari_unifuse.io.readers import NIFTI_SUFFIXES, itk_source, load_nifti
from napari_unifuse.io.writers import nifti_image, save_nifti, staged_destination

_GZIP_CHECK_CHUNK = 1 << 22


def write_displacement(u: np.ndarray, reference_geometry: Geometry, path: str | os.PathLike, *,
                       reference_metadata: Mapping[str, Any] | None = None,
                       moving_placement: np.ndarray | None = None) -> Path:
    """Write ``u`` (voxels, array order) as an ITK displacement field on the reference grid.

    ``reference_metadata``: the reference image's metadata; a NIfTI field keeps its header's forms
    and codes (``io.nifti_xforms``), as the images written on its grid do. A NIfTI field of a
    grid one voxel thick along ITK's last axis (a one-slice volume, a picture one row tall) is
    stored with its one-voxel axes first (see ``_itk_readable_order``); ``read_displacement`` given
    the reference geometry puts them back.
    ``moving_placement``: where ITK places the moving image relative to the package
    (``itk_placement``), so that ITK's resample through the field samples it where the package did;
    None for a moving image ITK places as it places the field (written on the reference grid with
    the reference's forms, as ``unifuse synth`` writes it).
    """
    path = Path(path)
    u = np.asarray(u, dtype=np.float64)
    ndim = reference_geometry.ndim
    if u.ndim != ndim + 1 or u.shape[0] != ndim:
        raise InputError(f"a {ndim}D displacement must have shape ({ndim}, *spatial), got {u.shape}", path)
    if not np.all(np.isfinite(u)):
        raise InputError("the displacement holds NaN or infinite values", path)
    to_nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
    xforms = NiftiXforms.from_metadata(reference_metadata or {}) if to_nifti else None
    if _written_unplaced(u.shape[1:], xforms):
        field_to_world = _itk_guess(reference_geometry).index_to_world
    elif xforms is not None and not xforms.places_nothing:  # placed by ITK as the header written for it says
        written = _written_forms(reference_geometry, xforms)
        field_to_world = _itk_world_map(written, reference_geometry) @ reference_geometry.index_to_world
    else:
        field_to_world = reference_geometry.index_to_world
    moving_to_world = (field_to_world if moving_placement is None
                       else np.asarray(moving_placement, dtype=np.float64) @ reference_geometry.index_to_world)
    itk_vectors = _itk_vectors(u, field_to_world, moving_to_world)
    try:
        if to_nifti:
            _write_nifti_field(itk_vectors, reference_geometry, path, xforms)
        else:
            with staged_destination(path) as staged:
                image = reference_geometry.to_sitk(sitk.GetImageFromArray(itk_vectors, isVector=True))
                sitk.WriteImage(image, staged, useCompression=True)
    except (RuntimeError, OSError) as error:
        raise InputError(f"could not write the field: {str(error).strip().splitlines()[-1]}", path) from error
    _refuse_cut_short(path)
    return path


def _itk_vectors(u: np.ndarray, field_to_world: np.ndarray, moving_to_world: np.ndarray) -> np.ndarray:
    """The ITK vectors ``moving_to_world(x + u) - field_to_world(x)``: (*spatial, ndim) float32 in
    array order, components in ITK's x, y, z order (LPS mm, as ITK stores them). ``field_to_world``:
    where ITK places the field's voxels; ``moving_to_world``: where ITK places the moving points the
    package's reference voxels stand for. Where the two agree, the vectors are ``u`` in that frame."""
    ndim = u.shape[0]
    vectors = np.einsum("ij,j...->...i", moving_to_world[:ndim, :ndim], u)
    if not np.array_equal(moving_to_world, field_to_world):
        # Both maps are affine in the index: their difference at x, added per axis and offset.
        apart = moving_to_world - field_to_world
        vectors += apart[:ndim, ndim]
        for axis, count in enumerate(u.shape[1:]):
            index = np.arange(count, dtype=np.float64).reshape([-1 if k == axis else 1 for k in range(ndim)] + [1])
            vectors += index * apart[:ndim, axis]
    return vectors[..., ::-1].astype(np.float32)


def _write_nifti_field(itk_vectors: np.ndarray, geometry: Geometry, path: Path, xforms: NiftiXforms | None) -> None:
    """The field as ITK's NIfTI writer lays it out (5-D: x, y, z, time 1, components; intent
    "vector"; LPS components), written by nibabel so that the header's forms can be the reference's."""
    order = _itk_readable_order(itk_vectors.shape[:-1])
    if order is not None:
        itk_vectors = itk_vectors.transpose(*order, geometry.ndim)
        geometry = Geometry(geometry.spacing[order], geometry.origin, geometry.direction[:, order])
        if xforms is not None:  # the same permutation in nibabel's (reversed) axis order, z kept in 2-D
            ndim = geometry.ndim
            xforms = xforms.with_voxel_axes([ndim - 1 - axis for axis in order[::-1]] + list(range(ndim, 3)))
    spatial = itk_vectors.transpose(*range(geometry.ndim - 1, -1, -1), geometry.ndim)  # nibabel's x, y, z first
    voxels = spatial.reshape(*spatial.shape[:-1], *(1,) * (4 - geometry.ndim), spatial.shape[-1])
    image = nifti_image(voxels, geometry, xforms)
    image.header.set_intent("vector")
    save_nifti(image, path)


def _written_unplaced(spatial_shape: tuple[int, ...], xforms: NiftiXforms | None) -> bool:
    """Whether the NIfTI field of a reference with these forms is written without orientation
    (codes 0), as the reference's other outputs are. A one-slice field stored with its axes moved
    (``_itk_readable_order``) cannot be: nibabel's guess for the moved grid is another place, so
    it gets the package's geometry as explicit forms, and its vectors stay in that frame."""
    return xforms is not None and xforms.places_nothing and _itk_readable_order(spatial_shape) is None


def itk_placement(volume: ImageVolume) -> np.ndarray:
    """Where ITK (SimpleITK, ANTs, Slicer) places ``volume``'s voxels relative to the package: the
    ``(ndim + 1)²`` affine from the package's world to ITK's (LPS mm, array-axis order); the identity
    where both place them alike (NRRD, MetaImage, DICOM, a picture, a NIfTI whose forms both tools
    read alike). A NIfTI is placed by nibabel's rule in the package and by ITK's in ITK
    (``NiftiXforms.itk_form``); one without orientation (codes 0) by two guesses (``_itk_guess``)."""
    xforms = NiftiXforms.from_metadata(volume.metadata)
    if xforms is None:
        return np.eye(volume.geometry.ndim + 1)
    return _itk_world_map(xforms, volume.geometry)


def _itk_world_map(xforms: NiftiXforms, geometry: Geometry) -> np.ndarray:
    """The package's world → ITK's for a NIfTI file with ``xforms`` on ``geometry``'s grid (see
    ``itk_placement``); the identity where ITK refuses the file (nothing of it to place), and for an
    image carrying forms of another grid than its own (a slice's in-plane stand-in)."""
    ndim = geometry.ndim
    if xforms.places_nothing:
        return _itk_guess(geometry).index_to_world @ np.linalg.inv(geometry.index_to_world)
    itk_form, package_form = xforms.itk_form(), xforms.placing_form()
    if (itk_form is None or package_form is None or same_placement(itk_form, package_form)
            or not _placed_by(package_form, geometry)):
        return np.eye(ndim + 1)
    return Geometry.from_ras_affine(itk_form, ndim).index_to_world @ np.linalg.inv(geometry.index_to_world)


def _placed_by(form: np.ndarray, geometry: Geometry) -> bool:
    """Whether ``geometry`` is ``form``'s placement of the voxels, as the reader makes it: the whole
    form for a volume, the in-plane part of an axial plane for a 2-D grid."""
    kept = [*range(geometry.ndim), 3]
    axial = geometry.ndim == 3 or same_placement(form[2, :2], np.zeros(2))
    return axial and same_placement(form[:geometry.ndim][:, kept], geometry.to_ras_affine()[:geometry.ndim][:, kept])


def _written_forms(geometry: Geometry, xforms: NiftiXforms) -> NiftiXforms:
    """The forms and codes a NIfTI field on ``geometry`` gets given a reference's ``xforms``
    (``nifti_image``: those forms where they describe the grid, else the geometry in both): those
    of a one-voxel field on the same placement, since the forms do not depend on the voxel counts."""
    one_voxel = np.zeros((1, 1, 1, 1, geometry.ndim), dtype=np.float32)
    return NiftiXforms.from_header(nifti_image(one_voxel, geometry, xforms).header, 1.0)


def _itk_guess(geometry: Geometry) -> Geometry:
    """Where ITK places the voxels of a NIfTI file without orientation on ``geometry``'s grid:
    origin 0, identity direction, the header's voxel sizes."""
    return Geometry(geometry.spacing, np.zeros(geometry.ndim), np.eye(geometry.ndim))


def _nibabel_placement(path: Path, ndim: int) -> tuple[Geometry, bool] | None:
    """Where the package places a NIfTI field (nibabel's rule, as ``read_image`` places the
    reference) and whether that is only a guess (no orientation in the file); None for any other
    file (placed alike by every tool)."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return None
    try:
        header_only = load_nifti(path)
    except Exception:  # noqa: BLE001 - ITK read it; nibabel's own complaint changes nothing here
        return None
    if not isinstance(header_only, nib.Nifti1Image):  # not NIfTI after all (no forms to read)
        return None
    guessed = NiftiXforms.from_header(header_only.header, 1.0).places_nothing
    return Geometry.from_ras_affine(header_only.affine, ndim=ndim), guessed


def _itk_readable_order(spatial_shape: tuple[int, ...]) -> list[int] | None:
    """The array-axis order to store a NIfTI field in so that ITK reads it whole, or None for as is.

    ITK's NIfTI reader drops trailing one-voxel axes of a vector image: the field of a one-slice
    volume whose slice is its first array axis (ITK's last) would read as 2-D, and for a coronal or
    sagittal slice with a singular direction (unreadable); that of a picture one row tall as 1-D,
    which SimpleITK refuses. Moved last (ITK's first), in their order, the one-voxel axes are kept
    and SimpleITK reads a field of the grid's dimension on the same points in space."""
    if spatial_shape[0] != 1 or max(spatial_shape) == 1:
        return None
    return sorted(range(len(spatial_shape)), key=lambda axis: spatial_shape[axis] == 1)


def _stored_orders(stored_shape: tuple[int, ...]) -> list[list[int]]:
    """The array-axis orders ``_itk_readable_order`` may have stored a field of this (array-order)
    shape in: each order that it gives for the shape that order puts back."""
    return [list(order) for order in itertools.permutations(range(len(stored_shape)))
            if _itk_readable_order(tuple(stored_shape[axis] for axis in np.argsort(order))) == list(order)]


def _image_axes_put_back(image: sitk.Image, order: list[int]) -> sitk.Image:
    """``image`` stored in array-axis ``order``, its axes put back (ITK's axes are the array's reversed)."""
    ndim = image.GetDimension()
    back = np.argsort(order)
    return sitk.PermuteAxes(image, [int(ndim - 1 - back[ndim - 1 - axis]) for axis in range(ndim)])


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


def read_displacement(path: str | os.PathLike, reference_geometry: Geometry | None = None,
                      reference_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an ITK displacement field back to ``u`` (float32, voxels, array order).

    With ``reference_geometry`` the field's grid must match it (a field is only meaningful on
    the grid it was computed for); with ``reference_shape`` (the reference's spatial shape) its
    voxel counts too, which a Geometry (spacing, origin, direction) does not hold.
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
    placement = _nibabel_placement(path, ndim)
    if placement is not None and placement[1]:
        # No orientation: the vectors are in ITK's guess (``geometry``), the grid is the reference's
        # when the package places the file where it places the reference (both guessed alike).
        if reference_geometry is not None and not placement[0].allclose(reference_geometry, atol=1e-4):
            raise InputError(f"the field's grid {placement[0]} (no orientation in the file; nibabel's guess) "
                             f"differs from the reference grid {reference_geometry}", path)
        _refuse_other_shape(image, reference_shape, path)
        return _to_voxels(image, geometry)
    vector_frame = reference_geometry or geometry
    if (reference_geometry is not None and placement is not None and not geometry.allclose(reference_geometry, atol=1e-4)
            and placement[0].allclose(reference_geometry, atol=1e-4)):
        # A field carrying a reference's forms that ITK reads otherwise than nibabel: the package places
        # both by nibabel's rule, so it is on the reference's grid; its vectors are in ITK's placement.
        vector_frame, geometry = geometry, placement[0]
    if reference_geometry is not None and not geometry.allclose(reference_geometry, atol=1e-4):
        # Perhaps the field of a grid one voxel thick along ITK's last axis, stored with its one-voxel
        # axes moved (write_displacement), placed where the package places the reference by ITK or,
        # for forms ITK reads otherwise, by nibabel.
        for order in _stored_orders(tuple(reversed(image.GetSize()))):
            by_itk = Geometry.from_sitk(image).transposed(np.argsort(order).tolist())
            by_nibabel = None if placement is None else placement[0].transposed(np.argsort(order).tolist())
            if by_itk.allclose(reference_geometry, atol=1e-4):
                image, geometry, vector_frame = _image_axes_put_back(image, order), by_itk, reference_geometry
                break
            if by_nibabel is not None and by_nibabel.allclose(reference_geometry, atol=1e-4):
                image, geometry, vector_frame = _image_axes_put_back(image, order), by_nibabel, by_itk
                break
    if reference_geometry is not None and not geometry.allclose(reference_geometry, atol=1e-4):
        raise InputError(
            f"the field's grid {geometry} differs from the reference grid {reference_geometry}", path
        )
    _refuse_other_shape(image, reference_shape, path)
    return _to_voxels(image, vector_frame)


def _refuse_other_shape(image: sitk.Image, reference_shape: tuple[int, ...] | None, path: Path) -> None:
    """An InputError for a field of other voxel counts than ``reference_shape`` (None: any): with the
    reference's spacing, origin and direction it still lies on another grid, and every comparison
    with a field computed on the reference grid would fail."""
    shape = tuple(reversed(image.GetSize()))  # ITK's x, y, z sizes, back to array order
    if reference_shape is not None and shape != tuple(reference_shape):
        raise InputError(f"the field's grid has shape {shape} but the reference's has "
                         f"{tuple(reference_shape)}; give the field computed on the reference grid", path)


def _to_voxels(image: sitk.Image, vector_frame: Geometry) -> np.ndarray:
    """The field ``image``'s vectors (LPS mm in ``vector_frame``'s placement) as ``u``."""
    ndim = vector_frame.ndim
    physical = sitk.GetArrayFromImage(image).astype(np.float64)[..., ::-1]
    inverse = np.linalg.inv(vector_frame.index_to_world[:ndim, :ndim])
    return np.einsum("ij,...j->i...", inverse, physical).astype(np.float32)
