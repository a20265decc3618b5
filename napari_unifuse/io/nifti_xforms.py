"""The two placements a NIfTI header carries, kept with an image so that files on its grid place
their voxels as every tool places the original.

A NIfTI header holds a qform (a rotation, pixdim and an offset) and an sform (any affine), each
with a code saying what it means (0: absent, 1: scanner, 2: aligned, 3: Talairach, 4: MNI, 5:
template). Tools disagree on which one counts: nibabel and FSL take the sform when its code is
set; ITK (SimpleITK, ANTs, ITK-SNAP, Slicer) takes it only when it is a rotation with scaling and
either its code is 1 (scanner) or the qform is unset, otherwise the qform (``NiftiXforms.itk_form``).
The package's geometry is nibabel's choice; an image written on that grid gets the original
header's two forms and codes back (``stamp``), so
that in each tool it overlays the original exactly as that tool shows the original, whatever the
forms say. A header without either form (both codes 0) places the image by a guess, which stays
a guess (codes 0) in what is written, so that every tool guesses the same for both. Voxel sizes
stored negative, which nibabel makes positive, ITK takes as reversed voxel axes: that is warned about
(``NiftiXforms.itk_mirroring_warnings``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

# The metadata entry (ImageVolume.metadata) holding a NIfTI file's forms, as plain lists.
NIFTI_XFORMS = "nifti_xforms"
# NIfTI xform code 1 = "scanner anatomical": the affine is the acquisition's world geometry.
SCANNER_CODE = 1
# Forms that place a voxel further apart than this fraction of the smallest voxel side are said to
# disagree: both are float32 in the file (~1e-5 mm apart when written from one affine), while a
# hundredth of a voxel is far below anything visible in an overlay.
_DISAGREEMENT_TOLERANCE = 0.01
# A written header reproduces the geometry when its chosen affine is within this of it (mm, per
# matrix entry): float32 storage of the forms, as in the round trip through the file.
_SAME_PLACEMENT_MM = 1e-4
# ITK's NIfTI reader (itkNiftiImageIO) takes an sform as a rotation with scaling when its columns,
# each scaled to length 1, are orthonormal to within this (per entry of R Rᵀ - I, float32 storage).
_ITK_ORTHONORMAL_TOLERANCE = 1e-4
_ITK_BASED_TOOLS = "ITK-based tools (SimpleITK, ANTs, ITK-SNAP, 3D Slicer)"


@dataclass(frozen=True)
class NiftiXforms:
    """A header's qform and sform (4×4, voxel ``(i, j, k)`` → RAS mm) with their codes."""

    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int

    @classmethod
    def from_header(cls, header: nib.Nifti1Header, mm_per_unit: float) -> NiftiXforms:
        """The forms as stored (whatever their codes), converted to millimetres."""
        scale = np.diag([mm_per_unit] * 3 + [1.0])
        return cls(scale @ header.get_qform(), int(header["qform_code"]),
                   scale @ header.get_sform(), int(header["sform_code"]))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> NiftiXforms | None:
        stored = metadata.get(NIFTI_XFORMS)
        if not stored:
            return None
        return cls(np.asarray(stored["qform"], dtype=np.float64), int(stored["qform_code"]),
                   np.asarray(stored["sform"], dtype=np.float64), int(stored["sform_code"]))

    def to_metadata(self) -> dict[str, dict[str, Any]]:
        """``{NIFTI_XFORMS: ...}`` in plain lists (napari layer metadata, JSON)."""
        return {NIFTI_XFORMS: {"qform": self.qform.tolist(), "qform_code": self.qform_code,
                               "sform": self.sform.tolist(), "sform_code": self.sform_code}}

    @property
    def places_nothing(self) -> bool:
        """Neither form is set (both codes 0): each tool places the voxels by its own guess
        (nibabel: centred, x flipped; ITK: origin 0, identity direction), and the guesses differ."""
        return self.qform_code == 0 and self.sform_code == 0

    def with_voxel_axes(self, order: list[int]) -> NiftiXforms:
        """The same placements for the voxel array transposed to nibabel axes ``order``."""
        columns = [*order, 3]
        return NiftiXforms(self.qform[:, columns], self.qform_code, self.sform[:, columns], self.sform_code)

    def with_voxel_axis_reversed(self, axis: int, size: int) -> NiftiXforms:
        """The same placements for the voxel array reversed along nibabel axis ``axis`` (``size`` voxels)."""
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, size - 1.0
        return NiftiXforms(self.qform @ flip, self.qform_code, self.sform @ flip, self.sform_code)

    def reading_warnings(self, shape: tuple[int, ...]) -> list[str]:
        """What a reader of this header should be told: no placement at all, two that disagree, or
        ITK placing the voxels elsewhere than the package (``shape``: the voxel grid, nibabel order,
        whose corners measure the distances)."""
        if self.places_nothing:
            return ["the NIfTI header gives no orientation (qform_code and sform_code are 0): the image's "
                    "position and orientation in space are a guess (nibabel's, from the voxel sizes; other "
                    "tools guess differently); outputs on its grid are written without orientation too, so "
                    "that each tool places them as it places this image"]
        if self.sform_code == 0:  # every tool reads the qform
            return []
        itk_form = self.itk_form()
        if not np.all(np.isfinite(self.qform)):  # a NaN pixdim or quaternion, whatever the qform's code
            itk_reads = (f"as {_ITK_BASED_TOOLS} use it here" if itk_form is not None else
                         f"{_ITK_BASED_TOOLS}, which take voxel sizes or the whole placement from it here, "
                         "may misplace or refuse the image")
            return [f"the NIfTI header's qform (code {self.qform_code}) holds non-finite values: the sform "
                    f"(code {self.sform_code}) is used, {itk_reads}"]
        if itk_form is None:
            return [f"the NIfTI header's sform (code {self.sform_code}) shears the voxel axes and it has no qform: "
                    f"the sform is used; {_ITK_BASED_TOOLS} refuse to read the image: save it as .mha, or give it "
                    "a qform, to open it there"]
        tolerance = _DISAGREEMENT_TOLERANCE * np.linalg.norm(self.sform[:3, :3], axis=0).min()
        forms_apart = _farthest_apart(self.qform, self.sform, shape) if self.qform_code > 0 else 0.0
        itk_apart = _farthest_apart(itk_form, self.sform, shape)
        if forms_apart <= tolerance and itk_apart <= tolerance:
            return []
        sheared = not _rotation_with_scaling(self.sform)
        if itk_apart <= tolerance:
            said = (f"The sform is used, as nibabel, FSL and {_ITK_BASED_TOOLS} use it (its code is 1); tools "
                    "reading the qform place the image elsewhere")
        elif self.qform_code == 0:
            return [f"the NIfTI header's sform (code {self.sform_code}) scales the voxel axes otherwise than its "
                    f"voxel sizes (pixdim): the sform is used; {_ITK_BASED_TOOLS} place the image by its axis "
                    f"directions with the voxel sizes, up to {itk_apart:.3g} mm from there. Outputs on its grid "
                    "keep this header, so each tool shows them where it shows this image"]
        elif not sheared and self.sform_code == SCANNER_CODE:  # itk_form: the sform, rescaled to pixdim
            said = (f"The sform is used (as nibabel and FSL do); {_ITK_BASED_TOOLS} take its axis directions with "
                    f"the voxel sizes (pixdim, {_sizes(np.linalg.norm(itk_form[:3, :3], axis=0))} mm), not its axis "
                    f"lengths ({_sizes(np.linalg.norm(self.sform[:3, :3], axis=0))} mm), placing voxels up to "
                    f"{itk_apart:.3g} mm from there")
        else:
            why = "which shears the voxel axes" if sheared else f"of code {self.sform_code}, not 1 (scanner)"
            said = (f"The sform is used (as nibabel and FSL do); {_ITK_BASED_TOOLS} place the image by its "
                    f"qform, passing over an sform {why}")
        return [f"the NIfTI header's qform (code {self.qform_code}) and sform (code {self.sform_code}) disagree: "
                f"they place voxels up to {forms_apart:.3g} mm apart. {said}. Outputs on its grid keep both forms, "
                "so each tool shows them where it shows this image"]

    def itk_mirroring_warnings(self, stored_voxel_sizes: Sequence[float], shape: tuple[int, ...]) -> list[str]:
        """What a reader should be told of voxel sizes the file stores negative (``stored_voxel_sizes``:
        pixdim[1:4] as stored; the header nibabel loads has them made positive, as the package takes
        them). ITK takes their size too but reverses those voxel axes, whichever form it reads or
        when it guesses (measured with SimpleITK 2.5, ITK 5.4), so it shows the image mirrored, while
        the outputs, written with positive sizes, sit where the package places it (``shape``: the
        voxel grid, nibabel order)."""
        reversed_axes = [axis for axis, size in enumerate(stored_voxel_sizes[:3]) if size < 0]
        if not reversed_axes or not np.all(np.isfinite(self.qform)) or (
                self.itk_form() is None and not self.places_nothing):  # ITK refuses or cannot place it: said already
            return []
        # Each of ITK's placements has perpendicular axes as long as the voxel sizes, as the qform has:
        # reversing axes moves the voxels alike in all of them.
        mirror = np.diag([-1.0 if axis in reversed_axes else 1.0 for axis in range(3)] + [1.0])
        apart = _farthest_apart(self.qform, self.qform @ mirror, shape)
        if apart <= _DISAGREEMENT_TOLERANCE * np.linalg.norm(self.qform[:3, :3], axis=0).min():
            return []  # a one-voxel axis: reversing it moves nothing
        axes = ("axis " if len(reversed_axes) == 1 else "axes ") + " and ".join("ijk"[axis] for axis in reversed_axes)
        return [f"the NIfTI header stores negative voxel sizes (pixdim) along voxel {axes}: nibabel, and so "
                f"this package, take them as positive, while {_ITK_BASED_TOOLS} reverse those axes, showing the "
                f"image mirrored, its voxels up to {apart:.3g} mm from where it is used here. Outputs on its grid are "
                "written with positive voxel sizes, so those tools show them where it is used here, not over the "
                "image as they show it; saving the image with nibabel writes its sizes positive, so that every "
                "tool places it alike"]

    def stamp(self, image: nib.Nifti1Image) -> bool:
        """Give ``image`` these forms and codes; True when its header then places the voxels where
        ``image.affine`` (the geometry being written) says, i.e. these forms belong to its grid."""
        geometry = image.affine.copy()
        if not (np.all(np.isfinite(self.qform)) and np.all(np.isfinite(self.sform))):
            return False  # a form no header can hold (a NaN pixdim in the original's qform)
        try:
            image.set_qform(self.qform, code=self.qform_code)
            image.set_sform(self.sform, code=self.sform_code)
        except HeaderDataError:  # a form nibabel cannot store (a qform that is no rotation)
            return False
        placed = image.header.get_best_affine()
        if _grid_ndim(image) == 2:
            # A 2-D geometry is an axial grid: the plane's height and thickness are the header's alone.
            placed, geometry = placed[:, [0, 1, 3]], geometry[:, [0, 1, 3]]
            placed[2, 2] = geometry[2, 2] = 0.0
        return same_placement(placed, geometry)

    def itk_form(self) -> np.ndarray | None:
        """The affine (voxel → RAS mm) ITK's NIfTI reader (SimpleITK, ANTs, ITK-SNAP, Slicer) places the
        voxels by: the sform when it is a rotation with scaling and either its code is 1 (scanner) or
        the qform is unset, its axes then as long as the header's voxel sizes (pixdim, the qform's
        column lengths); otherwise the qform (an sform of another code counts only where it matches
        the qform). None where ITK guesses (both codes 0), refuses the file (a sheared sform beside no
        qform) or cannot place it (non-finite voxel sizes or qform)."""
        voxel_sizes = np.linalg.norm(self.qform[:3, :3], axis=0)
        if self.sform_code > 0 and _rotation_with_scaling(self.sform) and (
                self.qform_code == 0 or self.sform_code == SCANNER_CODE):
            if not np.all(np.isfinite(voxel_sizes)):  # ITK's spacing: a NaN pixdim leaves nothing to place
                return None
            form = self.sform.copy()
            form[:3, :3] *= voxel_sizes / np.linalg.norm(self.sform[:3, :3], axis=0)
            return form
        if self.qform_code > 0 and np.all(np.isfinite(self.qform)):
            return self.qform
        return None

    def placing_form(self) -> np.ndarray | None:
        """The form nibabel places the voxels by (the sform, else the qform); None when the header
        gives neither."""
        if self.sform_code > 0:
            return self.sform
        return self.qform if self.qform_code > 0 else None

    def plane_height(self) -> float | None:
        """The z (RAS mm) of a 2-D axial NIfTI's plane by the form nibabel uses (the sform, else the
        qform); None when the header gives neither."""
        form = self.placing_form()
        return None if form is None else float(form[2, 3])


def same_placement(form: np.ndarray, other: np.ndarray) -> bool:
    """Whether two forms (voxel → mm) place every voxel alike, up to the forms' float32 storage."""
    return bool(np.allclose(form, other, rtol=0, atol=_SAME_PLACEMENT_MM))


def _rotation_with_scaling(form: np.ndarray) -> bool:
    """Whether ``form``'s voxel axes are perpendicular (ITK's test: its columns, each scaled to length
    1, are orthonormal), so that ITK can hold it as directions and spacing."""
    lengths = np.linalg.norm(form[:3, :3], axis=0)
    if not (np.all(np.isfinite(form)) and np.all(lengths > 0)):
        return False
    directions = form[:3, :3] / lengths
    return bool(np.abs(directions @ directions.T - np.eye(3)).max() <= _ITK_ORTHONORMAL_TOLERANCE)


def _sizes(lengths: np.ndarray) -> str:
    """Axis lengths as a reader writes them: ``1.2 × 1 × 1.5``."""
    return " × ".join(f"{length:.3g}" for length in lengths)


def _farthest_apart(form: np.ndarray, other: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far apart (mm) two forms place the farthest corner of a grid of ``shape`` (nibabel order;
    a 2-D grid is one slice thick)."""
    sides = (*shape[:3], 1, 1)[:3]
    corners = np.array([[(n - 1) * bit for n, bit in zip(sides, bits)] + [1.0]
                        for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
    return float(np.linalg.norm((corners @ (form - other).T)[:, :3], axis=1).max())


def _grid_ndim(image: nib.Nifti1Image) -> int:
    """The dimensions of the grid ``image`` holds values on. A 5-D image is a displacement field as
    ITK lays it out (x, y, z, time 1, components), with one component per axis of its grid: a 2-D
    grid's field is 5-D too, and its plane height is the reference header's as an image's is."""
    return int(image.shape[4]) if image.ndim == 5 else image.ndim


def stamp_xforms(image: nib.Nifti1Image, xforms: NiftiXforms | None) -> None:
    """Set both forms of ``image`` (built with its geometry's affine): the original header's where
    they describe this grid, otherwise the geometry in both (whichever form a tool reads,
    a 2-D grid at the original's plane height) with the original's codes where it set them (e.g. 4 =
    MNI), else scanner coordinates."""
    affine = image.affine.copy()
    if xforms is not None and xforms.stamp(image):
        return
    header_form = xforms.placing_form() if xforms is not None else None
    if header_form is not None and _grid_ndim(image) == 2:
        # A 2-D geometry is the plane's in-plane grid alone (``to_ras_affine`` puts it at z = 0): a
        # slice moved or resized within its plane stays at the header's height and slice direction.
        affine[:, 2] = header_form[:, 2]
        affine[2, 3] = header_form[2, 3]
    sform_code = (xforms.sform_code if xforms is not None else 0) or SCANNER_CODE
    qform_code = (xforms.qform_code if xforms is not None else 0) or SCANNER_CODE
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)


def placement_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What an image made on another image's grid (a fused image, a map) takes from that image's
    ``metadata``: its NIfTI forms, so that it is written where every tool shows that image."""
    return {NIFTI_XFORMS: metadata[NIFTI_XFORMS]} if NIFTI_XFORMS in metadata else {}
