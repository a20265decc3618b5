"""write_image: NIfTI (nibabel), MHA/MHD/NRRD (SimpleITK) with exact geometry; PNG for 2D images."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import Geometry, ImageVolume
from napari_unifuse.io.nifti_xforms import NiftiXforms, stamp_xforms
from napari_unifuse.io.readers import ITK_IMAGE_IOS, ITK_SUFFIXES, NIFTI_SUFFIXES

PNG_SUFFIXES = (".png",)
WRITABLE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PNG_SUFFIXES


def write_image(volume: ImageVolume, path: str | os.PathLike) -> Path:
    """Write ``volume`` to ``path``; the format follows the extension. Returns the path written."""
    path = Path(path)
    if volume.source is not None and path.resolve() == Path(volume.source).resolve():
        raise InputError(
            "refusing to overwrite the file this image was read from; choose another output path", path
        )
    name = path.name.lower()
    writer = next((w for suffixes, w in _WRITERS if name.endswith(suffixes)), None)
    if writer is None:
        raise InputError(
            f"cannot write {''.join(path.suffixes) or '(no extension)'!r} files; "
            f"use one of {', '.join(WRITABLE_SUFFIXES)}",
            path,
        )
    if not path.parent.is_dir():
        raise InputError(f"the folder {path.parent} does not exist", path)
    try:
        writer(volume, path)
    except (RuntimeError, OSError) as error:  # ITK's own errors, or the disk or folder refusing the file
        # The system's reason alone ("No space left on device"): the path is named already.
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
        raise InputError(f"could not write the image: {reason}", path) from error
    return path


def _write_nifti(volume: ImageVolume, path: Path) -> None:
    if volume.is_rgb:
        raise InputError("RGB images are saved as PNG, MHA or NRRD, not NIfTI", path)
    if not nifti_holds_grid(volume):
        raise InputError("this image's grid is sheared (e.g. a gantry-tilted CT), which NIfTI cannot hold for "
                         "ITK-based tools; save it as .mha", path)
    array = volume.array.astype(_nifti_dtype(volume.array), copy=False)
    # nibabel's axes are (x, y, z): reverse ours. An explicit dtype stops nibabel choosing another.
    image = nifti_image(array.transpose(), volume.geometry, NiftiXforms.from_metadata(volume.metadata))
    save_nifti(image, path)


def nifti_holds_grid(volume: ImageVolume) -> bool:
    """Whether NIfTI holds ``volume``'s grid so that every tool places it where it places the image the
    grid came from: a grid with perpendicular axes always (both forms hold it); a sheared one only
    with the forms of the NIfTI header it came from (``volume.metadata``), where they place this grid
    and give ITK-based tools, which pass over a sheared sform, a qform. The file keeps that header:
    nibabel places it by the sform and ITK by the qform, each as it places the original. Any other
    sheared grid (a gantry-tilted CT) is written as MetaImage or NRRD."""
    if not volume.geometry.is_sheared:
        return True
    xforms = NiftiXforms.from_metadata(volume.metadata)
    if xforms is None or xforms.itk_form() is None:
        return False
    one_voxel = nib.Nifti1Image(np.zeros((1,) * volume.geometry.ndim, np.float32), volume.geometry.to_ras_affine())
    return xforms.stamp(one_voxel)


def nifti_image(voxels: np.ndarray, geometry: Geometry, xforms: NiftiXforms | None) -> nib.Nifti1Image:
    """A NIfTI image of ``voxels`` (nibabel axis order, the spatial ones first) on ``geometry``:
    the forms and codes of the header ``xforms`` came from where they describe this grid (every
    tool then places the file as it places that one; ``nifti_xforms``), else the geometry in both
    forms, so readers preferring the qform (ITK) and the sform (nibabel, FSL) agree."""
    image = nib.Nifti1Image(voxels, geometry.to_ras_affine(), dtype=voxels.dtype)
    stamp_xforms(image, xforms)
    image.header.set_xyzt_units("mm")
    return image


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write ``image`` to ``path``, replacing an existing file only once the new one is whole (a
    full disk leaves the old one as it was). The staged name's suffix is lower-case, so nibabel
    neither renames it (a mixed-case ``Out.Nii.Gz``) nor misses that it is gzipped."""
    with staged_destination(path) as staged:
        nib.save(image, staged)


def _nifti_dtype(array: np.ndarray) -> np.dtype:
    """The NIfTI data type that holds ``array``'s values exactly."""
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype == np.float16:  # NIfTI has no half floats; float32 holds every float16 value
        return np.dtype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        # 64-bit integers are valid NIfTI but many tools reject them (nibabel refuses them by
        # default): a narrower type when the value range fits one, 64-bit only when it does not.
        smallest = np.result_type(np.min_scalar_type(array.min()), np.min_scalar_type(array.max()))
        return smallest if smallest.itemsize < array.dtype.itemsize else array.dtype
    return array.dtype


def _write_itk(volume: ImageVolume, path: Path) -> None:
    suffix = next(suffix for suffix in ITK_SUFFIXES if path.name.lower().endswith(suffix))
    with staged_destination(path, suffix) as staged:
        sitk.WriteImage(volume.to_sitk(), staged, useCompression=True, imageIO=ITK_IMAGE_IOS[suffix])


@contextmanager
def staged_destination(path: Path, suffix: str | None = None) -> Iterator[str]:
    """A file name for SimpleITK, nibabel or Pillow to write ``path`` under; what it writes is
    moved to ``path`` after, so a write that fails midway (a full disk) leaves an existing ``path``
    whole. A ``path`` that is a folder is refused (InputError): the move would put the file inside it.

    ``suffix``: the lower-case extension the writer chooses its format by (default: ``path``'s, with
    ``.nii.gz`` as one). ITK decides from a lower-case suffix whether the voxels go into the header file (.mha,
    .nrrd) or a file beside it (.mhd, .nhdr), so the staged name ends in it. A folder whose name is
    not valid UTF-8 would abort the process inside SimpleITK: such a path is staged in the system's
    temporary folder instead of beside ``path``.
    """
    if path.is_dir():
        raise InputError("this is a folder; give a file name to save to", path)
    try:
        str(path.parent).encode("utf-8")
        beside: Path | None = path.parent
    except UnicodeEncodeError:
        beside = None
    if suffix is None:
        suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    with tempfile.TemporaryDirectory(dir=beside) as staging:
        # Absolute: nibabel expands a leading "~", which in a relative path here is a folder of that name.
        staged = Path(Path(staging).absolute(),
                      path.name.encode("utf-8", errors="replace").decode()[: -len(suffix)] + suffix)
        yield str(staged)
        for written in Path(staging).iterdir():
            # shutil.move renames within one file system and copies across (the temporary folder).
            shutil.move(written, path if written == staged else path.parent / written.name)


def png_holds(array: np.ndarray, is_rgb: bool = False) -> bool:
    """Whether a PNG stores ``array``'s pixels (2D or RGB): uint8, grey uint16, booleans, or floats in
    [0, 1] (written as 8-bit grey levels)."""
    if array.ndim != 2 + is_rgb:
        return False
    if np.issubdtype(array.dtype, np.floating):
        return bool(array.size) and 0 <= array.min() and array.max() <= 1
    return array.dtype in (np.uint8, np.bool_) or (array.dtype == np.uint16 and not is_rgb)


def _write_png(volume: ImageVolume, path: Path) -> None:
    if volume.ndim != 2:
        raise InputError(f"PNG holds 2D images; this one is {volume.ndim}D (use .nii.gz or .mha)", path)
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0 or array.max() > 1:
            raise InputError(
                f"float intensities in [{array.min():g}, {array.max():g}] do not fit PNG; "
                "normalise them to [0, 1] first (io.normalize_intensity)",
                path,
            )
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8 and not (array.dtype == np.uint16 and not volume.is_rgb):
        raise InputError(f"PNG stores uint8 (or grey uint16) pixels, not {array.dtype}; normalise first", path)
    if not volume.geometry.allclose(Geometry.identity(2)):
        warnings.warn(f"{path}: PNG cannot store spacing, origin or direction; they are lost", stacklevel=3)
    with staged_destination(path) as staged:
        Image.fromarray(np.ascontiguousarray(array)).save(staged, format="PNG")


_WRITERS = ((NIFTI_SUFFIXES, _write_nifti), (ITK_SUFFIXES, _write_itk), (PNG_SUFFIXES, _write_png))
