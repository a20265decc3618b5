"""ImageVolume and Geometry: an array plus where its voxels sit in the world.

Conventions (docs/architecture.md): arrays are in array-axis order ``(z, y, x)`` / ``(y, x)``;
world points are LPS millimetres (ITK's frame) with components listed in that same array-axis
order, i.e. ITK's ``(x, y, z)`` reversed. Every conversion to or from ITK (SimpleITK) and NIfTI
(nibabel, RAS) therefore reverses the axes, and NIfTI additionally flips the signs of x and y.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_unifuse.errors import InputError
from napari_unifuse.io.nifti_xforms import NiftiXforms

# NIfTI's world is RAS, ITK's is LPS: the two differ by the sign of their first two axes.
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Metadata keys of a volume reoriented by ``ImageVolume.in_world_axis_order``: its array axes as
# stored, and whether its slices were stored running from head to foot (then reversed).
STORED_AXIS_ORDER = "stored_axis_order"
STORED_SLICES_REVERSED = "stored_slices_reversed"
# Why a colour volume is refused, wherever it comes from (a file, a napari layer, a script).
COLOUR_IS_2D_ONLY = "colour images are supported in 2D only: convert the volume to grey values first"


def _reverse_axes(matrix: np.ndarray) -> np.ndarray:
    """Swap between array-axis order and ITK order in a homogeneous matrix (both index and world)."""
    n = matrix.shape[0] - 1
    order = [*range(n - 1, -1, -1), n]
    return matrix[np.ix_(order, order)]


def _readonly(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(values, dtype=np.float64).reshape(shape)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Geometry:
    """Voxel grid in world space, all in array-axis order.

    ``spacing[k]`` is the voxel size (mm) along array axis ``k``; ``direction[:, k]`` is the unit
    world vector of array axis ``k``; ``origin`` is the world position of index ``(0, ..., 0)``.
    """

    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    def __post_init__(self) -> None:
        ndim = np.size(self.spacing)
        if ndim not in (2, 3):
            raise InputError(f"geometry must be 2D or 3D, got {ndim} spatial dimensions")
        origin_size, direction_shape = np.size(self.origin), np.shape(self.direction)
        if origin_size != ndim or np.size(self.direction) != ndim * ndim:
            raise InputError(f"the geometry's spacing has {ndim} values but its origin has {origin_size} and its "
                             f"direction is {'×'.join(map(str, direction_shape))}: give {ndim} origin values "
                             f"and a {ndim}×{ndim} direction")
        spacing = _readonly(self.spacing, (ndim,))
        origin = _readonly(self.origin, (ndim,))
        direction = _readonly(self.direction, (ndim, ndim))
        if not (np.all(np.isfinite(spacing)) and np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))):
            raise InputError("the geometry (affine) holds non-finite values (NaN or infinity)")
        if np.any(spacing <= 0):
            raise InputError(f"voxel spacing must be positive, got {spacing.tolist()}")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise InputError("the direction matrix is singular: the axes do not span space")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def identity(cls, ndim: int) -> Geometry:
        """Unit spacing, origin 0, axes aligned with the world (e.g. a PNG image)."""
        return cls(np.ones(ndim), np.zeros(ndim), np.eye(ndim))

    @classmethod
    def from_index_to_world(cls, matrix: np.ndarray) -> Geometry:
        """From a homogeneous ``(ndim+1)²`` index→world matrix (array-axis order)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if not np.all(np.isfinite(matrix)):
            raise InputError("the affine holds non-finite values (NaN or infinity)")
        n = matrix.shape[0] - 1
        linear = matrix[:n, :n]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing == 0):
            raise InputError("the affine maps an array axis to a zero-length vector")
        return cls(spacing, matrix[:n, n], linear / spacing)

    @classmethod
    def from_sitk(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """The grid of a SimpleITK image, or of a reader that has read a file's header alone."""
        n = image.GetDimension()
        return cls(
            np.array(image.GetSpacing())[::-1],
            np.array(image.GetOrigin())[::-1],
            np.array(image.GetDirection()).reshape(n, n)[::-1, ::-1],
        )

    @classmethod
    def from_ras_affine(cls, affine: np.ndarray, ndim: int = 3) -> Geometry:
        """From a NIfTI (nibabel) 4×4 affine taking voxel ``(i, j, k)`` to RAS mm.

        nibabel's ``(i, j, k)`` is ITK's index order, so after RAS→LPS the matrix is ITK's
        index→physical matrix; a 2D image keeps its in-plane block.
        """
        affine = np.asarray(affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)):
            raise InputError("the affine holds non-finite values (NaN or infinity)")
        lps = _RAS_FROM_LPS @ affine
        keep = [*range(ndim), 3]
        return cls.from_index_to_world(_reverse_axes(lps[np.ix_(keep, keep)]))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Geometry:
        return cls(values["spacing"], values["origin"], values["direction"])

    # ---- views ----------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return self.spacing.size

    @property
    def index_to_world(self) -> np.ndarray:
        """Homogeneous matrix: array index (array-axis order) → LPS mm (array-axis order)."""
        matrix = np.eye(self.ndim + 1)
        matrix[: self.ndim, : self.ndim] = self.direction * self.spacing
        matrix[: self.ndim, self.ndim] = self.origin
        return matrix

    @property
    def is_sheared(self) -> bool:
        """Axes that are not perpendicular (a gantry-tilted CT placed at its slice positions):
        NIfTI's qform, which ITK tools read, cannot hold such a grid; MetaImage and NRRD can."""
        return not np.allclose(self.direction.T @ self.direction, np.eye(self.ndim), rtol=0, atol=1e-6)

    @property
    def itk_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.spacing[::-1])

    @property
    def itk_origin(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.origin[::-1])

    @property
    def itk_direction(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.direction[::-1, ::-1].ravel())

    def world_axis_order(self) -> tuple[int, ...]:
        """The array axes listed in the order of the world axes they run closest to: ``(0, 1, 2)``
        for an axial grid, ``(1, 0, 2)`` for a coronal NIfTI (its first array axis runs along y,
        its second along z). Flips and oblique tilts do not change it; ties keep the array's order."""
        def alignment(world_axis_of: tuple[int, ...]) -> float:
            return sum(abs(self.direction[world, axis]) for axis, world in enumerate(world_axis_of))

        # permutations() yields the identity first and max() keeps the first best: ties stay as stored.
        closest = max(permutations(range(self.ndim)), key=alignment)
        return tuple(int(axis) for axis in np.argsort(closest))

    def slices_run_inferior(self) -> bool:
        """Whether the array axis that runs closest to world z (``world_axis_order()[0]``) counts
        slices from head to foot: a coronal DICOM series' rows do. Its first slice is then the
        top one, which napari, scrolling world z upwards, shows last."""
        return bool(self.direction[0, self.world_axis_order()[0]] < 0)

    def reversed_along(self, axis: int, size: int) -> Geometry:
        """This grid for its array reversed along ``axis`` (``size`` voxels): every voxel keeps its
        world position."""
        direction = self.direction.copy()
        direction[:, axis] *= -1
        return Geometry(self.spacing, self.origin + self.direction[:, axis] * self.spacing[axis] * (size - 1),
                        direction)

    def transposed(self, axes: Sequence[int]) -> Geometry:
        """This grid for its array transposed by ``axes`` (numpy's meaning: new axis ``j`` is old
        axis ``axes[j]``): every voxel keeps its world position."""
        axes = list(axes)
        return Geometry(self.spacing[axes], self.origin, self.direction[:, axes])

    def to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry onto a SimpleITK image (in place) and return it."""
        image.SetSpacing(self.itk_spacing)
        image.SetOrigin(self.itk_origin)
        image.SetDirection(self.itk_direction)
        return image

    def to_ras_affine(self) -> np.ndarray:
        """The NIfTI 4×4 affine (voxel ``(i, j, k)`` → RAS mm); a 2D grid sits in the z=0 plane."""
        itk = _reverse_axes(self.index_to_world)
        lps = np.eye(4)
        keep = [*range(self.ndim), 3]
        lps[np.ix_(keep, keep)] = itk
        return _RAS_FROM_LPS @ lps

    def napari_kwargs(self) -> dict[str, np.ndarray]:
        """``scale``/``translate`` (plus ``affine`` for rotated or flipped axes) for a napari layer.

        napari maps data to world as ``affine @ (scale * index + translate)``; an axis-aligned grid
        needs only scale and translate, anything else carries direction and origin in ``affine``
        so that the layer's world coordinates are exactly ``index_to_world``. napari draws a 3-D
        layer's displayed plane through the affine's block of the displayed axes, which a grid
        whose axes are permuted (coronal, sagittal) maps to a line: such a volume is shown
        through :meth:`ImageVolume.in_world_axis_order`.
        """
        if np.allclose(self.direction, np.eye(self.ndim), rtol=0, atol=1e-12):
            return {"scale": self.spacing.copy(), "translate": self.origin.copy()}
        affine = np.eye(self.ndim + 1)
        affine[: self.ndim, : self.ndim] = self.direction
        affine[: self.ndim, self.ndim] = self.origin
        return {"scale": self.spacing.copy(), "translate": np.zeros(self.ndim), "affine": affine}

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for JSON provenance and napari layer metadata."""
        return {
            "spacing": self.spacing.tolist(),
            "origin": self.origin.tolist(),
            "direction": self.direction.tolist(),
        }

    def allclose(self, other: Geometry, atol: float = 1e-6) -> bool:
        return self.ndim == other.ndim and np.allclose(
            self.index_to_world, other.index_to_world, rtol=0, atol=atol
        )

    def __repr__(self) -> str:
        return (
            f"Geometry(spacing={self.spacing.tolist()}, origin={self.origin.tolist()}, "
            f"direction={self.direction.tolist()})"
        )


@dataclass
class ImageVolume:
    """An image array with its geometry, header metadata and the file it came from.

    ``array`` is ``(z, y, x)``, ``(y, x)`` or, for RGB, ``(y, x, 3)``. ``source`` is kept so that
    writers can refuse to overwrite the input file.
    """

    array: np.ndarray
    geometry: Geometry
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    is_rgb: bool = False

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.is_rgb and (self.array.ndim != 3 or self.array.shape[-1] != 3):
            advice = f"; {COLOUR_IS_2D_ONLY}" if self.array.ndim > 3 else ""
            raise InputError(f"an RGB image must have shape (y, x, 3), got {self.array.shape}{advice}", self.source)
        if self.geometry.ndim != self.ndim:
            raise InputError(
                f"geometry is {self.geometry.ndim}D but the array has {self.ndim} spatial axes "
                f"(shape {self.array.shape})",
                self.source,
            )

    @property
    def ndim(self) -> int:
        """Spatial dimensions (the colour axis of an RGB image does not count)."""
        return self.array.ndim - 1 if self.is_rgb else self.array.ndim

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.array.shape[: self.ndim]

    def on_grid_of(self, other: ImageVolume, atol: float = 1e-6) -> bool:
        """Whether this image's voxels are ``other``'s (same shape and index-to-world map within
        ``atol`` mm): resampling it onto ``other`` would then change nothing."""
        return self.spatial_shape == other.spatial_shape and self.geometry.allclose(other.geometry, atol=atol)

    @property
    def single_slice_axis(self) -> int | None:
        """The axis of a 3D volume that holds a single slice (a 2D image stored as 3D, e.g. one
        64×64×1 NIfTI slice), or None. A volume thin along several axes is no image, not a slice."""
        return single_slice_axis_of(self.spatial_shape)

    @property
    def slices_stored_head_to_foot(self) -> bool:
        """Whether this 3-D volume's slices (its array axis closest to world z) run from head to foot,
        which :meth:`in_world_axis_order` reverses; a one-slice volume's single slice has no order."""
        return (self.ndim == 3 and self.geometry.slices_run_inferior()
                and self.spatial_shape[self.geometry.world_axis_order()[0]] > 1)

    @property
    def is_in_world_axis_order(self) -> bool:
        """Whether :meth:`in_world_axis_order` returns this image as it is."""
        return self.ndim != 3 or (self.geometry.world_axis_order() == tuple(range(self.ndim))
                                  and not self.slices_stored_head_to_foot)

    def in_world_axis_order(self) -> ImageVolume:
        """This image with its array axes in the order of the world axes they run along
        (``Geometry.world_axis_order``), its slices (axis 0) counted from foot to head: the same
        voxels at the same world positions, stored like an axial volume, so that napari draws any
        two of its axes as a plane and its slider's step k shows array slice k. Other flips and
        small rotations stay in the geometry. The NIfTI forms in its metadata are permuted and
        reversed with the axes, so that files written on the new grid keep the original header's
        placements and codes. A 2-D image (RGB included) is returned as is: both of its axes are
        always drawn."""
        if self.is_in_world_axis_order:
            return self
        axes = self.geometry.world_axis_order()
        reverse = self.slices_stored_head_to_foot
        # The stored order travels with the volume (a napari layer's too), for the provenance to record.
        metadata = {**self.metadata, STORED_AXIS_ORDER: [int(axis) for axis in axes],
                    STORED_SLICES_REVERSED: reverse}
        array, geometry = self.array.transpose(axes), self.geometry.transposed(axes)
        if reverse:
            array, geometry = array[::-1], geometry.reversed_along(0, array.shape[0])
        xforms = NiftiXforms.from_metadata(self.metadata)
        if xforms is not None:  # the forms index voxels in nibabel's order, the reverse of ours
            xforms = xforms.with_voxel_axes([self.ndim - 1 - axis for axis in axes[::-1]])
            if reverse:
                xforms = xforms.with_voxel_axis_reversed(self.ndim - 1, array.shape[0])
            metadata.update(xforms.to_metadata())
        return ImageVolume(np.ascontiguousarray(array), geometry, metadata, self.source, self.is_rgb)

    def stored_geometry(self) -> Geometry:
        """The grid its file stores this image on, for an image :meth:`in_world_axis_order` reoriented
        (its metadata say how); its own grid otherwise."""
        axes = self.metadata.get(STORED_AXIS_ORDER)
        if axes is None or len(axes) != self.ndim:
            return self.geometry
        geometry = self.geometry
        if self.metadata.get(STORED_SLICES_REVERSED):
            geometry = geometry.reversed_along(0, self.spatial_shape[0])
        return geometry.transposed(np.argsort(axes).tolist())

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this array and geometry (RGB becomes a 3-component vector image)."""
        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        return self.geometry.to_sitk(sitk.GetImageFromArray(array, isVector=self.is_rgb))


def single_slice_axis_of(spatial_shape: Sequence[int]) -> int | None:
    """The axis of a 3D ``spatial_shape`` one voxel thick (a one-slice volume), or None: for a 2D
    shape, and for a volume thin along several axes, which is no image."""
    if len(spatial_shape) != 3:
        return None
    thin = [axis for axis, side in enumerate(spatial_shape) if side == 1]
    return thin[0] if len(thin) == 1 else None
