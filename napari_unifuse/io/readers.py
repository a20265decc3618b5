"""read_image: NIfTI (nibabel), NRRD/MHA/MHD and DICOM series (SimpleITK), PNG/JPG (Pillow).

Every reader returns an ImageVolume whose geometry follows docs/architecture.md (LPS mm, array
axis order); every failure becomes an InputError naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from warnings import catch_warnings, simplefilter

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import FileBasedImage, ImageFileError
from nibabel.imageclasses import all_image_classes
from numpy.lib.recfunctions import structured_to_unstructured, unstructured_to_structured
from PIL import Image

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import Geometry, ImageVolume
from napari_unifuse.io.nifti_xforms import NiftiXforms
from napari_unifuse.io.normalize import CT_AIR_HU, shows_ct_air

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES + PILLOW_SUFFIXES
# A header file and an image file (a NIfTI-1 pair, ANALYZE 7.5): not read here, but converted in one line.
_HEADER_IMAGE_PAIR_SUFFIXES = (".hdr.gz", ".img.gz", ".hdr", ".img")
# Every gzip stream starts with these two bytes (RFC 1952), whatever the file is named.
_GZIP_MAGIC = b"\x1f\x8b"

# DICOM tags worth keeping (names are ours); patient identifiers are left out on purpose.
_DICOM_TAGS = {
    "0008|0060": "Modality",
    "0008|103e": "SeriesDescription",
    "0020|000e": "SeriesInstanceUID",
    "0008|0070": "Manufacturer",
    "0018|0050": "SliceThickness",
    "0028|1052": "RescaleIntercept",
    "0028|1053": "RescaleSlope",
}
_SERIES_DESCRIPTION_TAG, _IMAGE_POSITION_TAG, _GANTRY_TILT_TAG = "0008|103e", "0020|0032", "0018|1120"
_SERIES_UID_TAG, _CHARACTER_SET_TAG = "0020|000e", "0008|0005"
# How a slice's stored values become real ones, and DICOM's default where the tag is absent.
_RESCALE_TAGS = {"RescaleSlope": ("0028|1053", 1.0), "RescaleIntercept": ("0028|1052", 0.0)}
# DICOM Modality codes → the modality names io.normalize understands.
_DICOM_MODALITIES = {"CT": "ct", "MR": "mr", "PT": "pet", "NM": "spect"}
# A slice more than this fraction of the slice spacing away from where the volume puts it is
# reported: DICOM positions are decimal strings, so exact equality is too strict, while 1% of a
# slice is far below anything visible in a fusion.
_SLICE_POSITION_TOLERANCE = 0.01
# Slices whose row and column directions lie within this angle (radians) of each other belong to one
# stack: DICOM writes direction cosines as decimal strings, so the slices of one oblique series differ by
# float noise (1e-6), which rounding would split wherever it straddles a rounding boundary, while a
# localizer or a second stack lies degrees away.
_ORIENTATION_TOLERANCE = 1e-3
# Pixel spacings this close (mm) are one spacing: decimal strings again, which some tools round to 4
# decimals (0.46875 as 0.4688: 5e-5 mm, 1.07e-4 relative); over 512 pixels such a difference drifts by
# 0.05 mm at most, while another stack's pixels differ by far more.
_PIXEL_SPACING_TOLERANCE_MM = 1e-4
# ImageVolume metadata marking an image read without any position, like a PNG or JPG (is_picture).
WITHOUT_POSITION = "without_position"
# Values of each SimpleITK pixel type, to find one holding every slice's values (_pixel_type_holding).
_SITK_PIXEL_DTYPES = {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
                      sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
                      sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
                      sitk.sitkFloat64: np.float64}
# How far below a folder, and through how many folders, series folders are looked for when the folder
# itself holds none (an export's PATIENT/STUDY/SERIES tree), and how many files of each are looked at.
_SUBFOLDER_SEARCH_DEPTH, _SUBFOLDER_SEARCH_LIMIT, _FILES_LOOKED_AT = 4, 2000, 10
# A DICOM Part 10 file carries "DICM" after a 128-byte preamble, whatever its name.
_DICOM_PREAMBLE_LENGTH, _DICOM_MAGIC = 128, b"DICM"
# A dataset stored without that preamble (older exports) starts with its file meta information
# (group 0002, little-endian), whose elements always state their value representation (two capital
# letters after the 4-byte tag), or, without that too, with its group 0008 tags.
_DICOM_META_GROUP, _DICOM_VR_BYTES, _DICOM_GROUP_0008 = b"\x02\x00", slice(4, 6), b"\x08\x00"
# DICOM media (a disc, a PACS export) index their files in one named so (PS3.10), not an image.
_DICOMDIR_NAME = "DICOMDIR"
# SimpleITK chooses the ImageIO from a case-sensitive suffix, so name it: upper-case .MHA works too.
ITK_IMAGE_IOS = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}
# The largest value of 8-bit colour, which float colour well above 1 is taken to be stored in (colour_in_unit_range).
_EIGHT_BIT_COLOUR_MAX = 255.0
# How far float colour may stray outside [0, 1] and still be taken as in it (data.color refuses beyond):
# resampling and smoothing leave colour a hair outside, while 8-bit colour stored as floats lies far outside.
COLOUR_UNIT_RANGE_SLACK = 1e-3
# Float colour reaching above this is taken as 8-bit colour stored as floats; between 1 + slack and it,
# neither reading is safe (a [0, 1] image overshooting, or an 8-bit one all but black) and it is refused.
_EIGHT_BIT_COLOUR_FLOOR = 2.0
# Length units in mm: NIfTI's (nibabel's names), converted as SimpleITK converts them, and the usual
# spellings of NRRD's free-text "space units". "unknown" (NIfTI) and "" (NRRD) are taken as mm, by ITK too.
_MM_PER_LENGTH_UNIT = {"unknown": 1.0, "": 1.0, "mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "cm": 10.0,
                       "meter": 1000.0, "meters": 1000.0, "m": 1000.0, "micron": 0.001, "microns": 0.001,
                       "um": 0.001, "µm": 0.001, "micrometer": 0.001, "micrometers": 0.001}
# An NRRD header field stating the length unit of each world axis, each in double quotes (":=" would
# make it a key/value pair of that name, which NRRD leaves to the writer).
_NRRD_SPACE_UNITS = re.compile(r"space units:(?!=)\s*(.*)")
# A PNG starts with its signature and the IHDR chunk: after the chunk's length and type come the
# width and height, then the bit depth and colour type bytes.
_PNG_SIGNATURE, _PNG_BIT_DEPTH_OFFSET, _PNG_IHDR_END = b"\x89PNG\r\n\x1a\n", 24, 26
_PNG_GREY, _PNG_GREY_ALPHA = 0, 4
# Bytes per value of MetaImage element types (MetaIO's metaTypes.h), and how much of a file surely
# holds a MetaImage or NRRD header (a few hundred bytes of text).
_METAIMAGE_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                            "MET_UINT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_TEXT_HEADER_LIMIT = 64 * 1024
# EXIF Orientation (tag 274, also in a PNG's eXIf chunk) → what viewers do to the stored pixels to
# show them upright, as PIL.ImageOps.exif_transpose does, on (rows, columns[, channels]) arrays.
_EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT_BY_EXIF_ORIENTATION = {
    2: ("mirrored left to right", lambda pixels: pixels[:, ::-1]),
    3: ("turned 180°", lambda pixels: pixels[::-1, ::-1]),
    4: ("mirrored top to bottom", lambda pixels: pixels[::-1]),
    5: ("mirrored across the main diagonal", lambda pixels: pixels.swapaxes(0, 1)),
    6: ("turned 90° clockwise", lambda pixels: np.rot90(pixels, -1)),
    7: ("mirrored across the other diagonal", lambda pixels: pixels[::-1, ::-1].swapaxes(0, 1)),
    8: ("turned 90° counter-clockwise", lambda pixels: np.rot90(pixels, 1)),
}


def file_format(path: str | os.PathLike) -> str | None:
    """"nifti" | "itk" | "dicom" | "pillow" from the name (a folder means a DICOM series), else None.

    A file without a known suffix is "dicom" when its content says so (:func:`holds_dicom`): PACS
    exports name files by their UID (``1.2.840...``) or ``IM0001``, without ``.dcm``."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for fmt, suffixes in (
        ("nifti", NIFTI_SUFFIXES),
        ("itk", ITK_SUFFIXES),
        ("dicom", DICOM_SUFFIXES),
        ("pillow", PILLOW_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return fmt
    return "dicom" if holds_dicom(path) else None


def holds_dicom(path: str | os.PathLike) -> bool:
    """Whether the file ``path`` is DICOM by its content: the "DICM" mark after the preamble, or,
    for a dataset stored without one, its file meta information or GDCM recognising it. Other files
    are declined after reading their first 132 bytes, so asking about any file is quick."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_DICOM_PREAMBLE_LENGTH + len(_DICOM_MAGIC))
    except OSError:  # missing, a folder, unreadable: not a DICOM file we could read anyway
        return False
    if head[_DICOM_PREAMBLE_LENGTH:] == _DICOM_MAGIC:
        return True
    value_representation = head[_DICOM_VR_BYTES]
    if head.startswith(_DICOM_META_GROUP) and value_representation.isalpha() and value_representation.isupper():
        return True  # which GDCM reads but does not recognise by itself: its reader is named where DICOM is read
    if not head.startswith(_DICOM_GROUP_0008):
        return False
    try:
        with _itk_console_warnings_hidden():
            return sitk.ImageFileReader().GetImageIOFromFileName(itk_filename(path)) == "GDCMImageIO"
    except (InputError, RuntimeError):
        return False


def itk_filename(path: str | os.PathLike) -> str:
    """``path`` as SimpleITK takes it. A name that is not valid UTF-8 (an old Latin-1 folder name)
    would abort the whole process inside SimpleITK instead of raising: refuse it here."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the path is not valid UTF-8 text, which SimpleITK cannot open; rename the file or the "
                         "folders above it", os.fsencode(name).decode("utf-8", errors="replace")) from None
    return name


@contextmanager
def itk_source(path: str | os.PathLike) -> Iterator[str]:
    """A file name SimpleITK reads ``path`` under (checked by :func:`itk_filename`).

    ITK's NIfTI library refuses a suffix in mixed case (``.Nii.Gz``, ``.nii.GZ``: "mixed case
    extension is not valid"), although nibabel and this package accept it: such a file is linked,
    or copied where a link cannot be made, under its lower-case suffix into a temporary folder.
    """
    path = Path(path)
    name = itk_filename(path)
    lowered = path.name.lower()
    suffix = next((path.name[-len(s):] for s in NIFTI_SUFFIXES[::-1] if lowered.endswith(s)), None)
    if suffix is None or suffix in (suffix.lower(), suffix.upper()):
        yield name
        return
    with tempfile.TemporaryDirectory() as staging:
        staged = os.path.join(staging, path.name[: -len(suffix)] + suffix.lower())
        try:
            os.link(path, staged)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(path, staged)
        yield staged


@contextmanager
def _itk_console_warnings_hidden() -> Iterator[None]:
    """Keep ITK's C++ warnings off stderr; the switch is global, so it is restored afterwards."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series_ids(folder: str | os.PathLike) -> tuple[str, ...]:
    """The DICOM series UIDs GDCM finds in ``folder`` (empty when there are none)."""
    # GDCM prints a console warning for folders without DICOM; that is an answer, not a problem.
    with _itk_console_warnings_hidden():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(itk_filename(folder)))


def readable_format(path: str | os.PathLike) -> str:
    """``file_format(path)``, or the InputError that says why nothing here can read it (missing, or
    of a type no reader knows); the file itself is not opened."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    fmt = file_format(path)
    if fmt is None:
        raise InputError(
            f"unknown file type {''.join(path.suffixes) or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}, a DICOM file of any name or a DICOM series folder"
            f"{_pair_conversion_hint(path)}",
            path,
        )
    return fmt


def _pair_conversion_hint(path: Path) -> str:
    """For one file of a header/image pair (NIfTI-1 pair, ANALYZE 7.5): the line that saves it as a
    single .nii, which nibabel places as it placed the pair (and as the package reads nibabel's
    placement); otherwise nothing."""
    name = str(path)
    suffix = next((s for s in _HEADER_IMAGE_PAIR_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        return ""
    single = name[: -len(suffix)] + ".nii"
    program = f"import nibabel as nib; nib.save(nib.load({name!r}), {single!r})"
    # Quoted for the shell it is pasted into: a path may hold quotes or '$'.
    return (f"; a .hdr/.img pair (NIfTI or ANALYZE 7.5) opens once saved as one .nii file, e.g. with "
            f"python -c {shlex.quote(program)}")


def read_image(path: str | os.PathLike, frame: int | None = None) -> ImageVolume:
    """Read a 2D/3D image with its geometry; ``frame`` picks one volume of a 4D file."""
    path = Path(path)
    fmt = readable_format(path)
    try:
        array, geometry, metadata, is_rgb = _READERS[fmt](path, frame)
        _refuse_empty(array, path)
        # Big-endian files (older scanners, 16-bit PNG) come as '>i2' arrays, which SimpleITK and
        # torch refuse: every image is handed on in this machine's byte order.
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        array, value_warnings = real_finite_values(array)
        if is_rgb:
            array, colour_warnings = colour_in_unit_range(array)
            value_warnings += colour_warnings
    except InputError as error:
        # Geometry and value checks know the problem but not the file.
        raise InputError(error.problem, path) from error
    metadata["format"] = fmt
    warnings = metadata.pop("warnings", []) + value_warnings
    if warnings:
        metadata["warnings"] = warnings
    return ImageVolume(array, geometry, metadata, str(path), is_rgb)


def is_picture(image: ImageVolume) -> bool:
    """Whether ``image`` was read from a PNG or JPG, or from a one-frame DICOM image without any
    position (a screenshot, a secondary capture): no position, orientation or pixel size (its pixels
    are 1 mm wide from the origin), and axes that are the picture's rows and columns, not sides of
    the patient."""
    return str(image.source or "").lower().endswith(PILLOW_SUFFIXES) or bool(image.metadata.get(WITHOUT_POSITION))


def real_finite_values(array: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``array`` made usable by the model, and a sentence for each change made.

    * Complex values (an MR reconstruction saved as real + imaginary) become their magnitude, the
      image a scanner console shows; the phase is dropped, which the warning says.
    * Booleans (a mask) become 0.0 / 1.0: an 8-bit 0/1 image would be read as almost black.
    * +inf / -inf (a saturated detector, an overflowed conversion) are clipped to the largest /
      smallest finite value, as the intensity window would clip them; NaN (no measurement, often
      outside the field of view after a resampling) becomes the background: 0, or air (-1000 HU) in
      an image in Hounsfield units (``io.normalize.shows_ct_air``), where 0 is water and drew a grey
      disc around the head.

    Raises InputError (without a source; callers add it) when no voxel is finite.
    """
    warnings = []
    if np.iscomplexobj(array):
        array = np.abs(array)
        warnings.append("complex-valued data: fused as its magnitude |re + i·im| (the phase is dropped)")
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        return array, warnings
    finite = np.isfinite(array)
    if finite.all():
        return array, warnings
    if not finite.any():
        raise InputError("every voxel is NaN or infinite: there is no image to use")
    nan, positive, negative = np.isnan(array), np.isposinf(array), np.isneginf(array)
    values = array[finite]
    background, named = (CT_AIR_HU, f"{CT_AIR_HU:g} HU (air)") if shows_ct_air(values) else (0.0, "0")
    # Clip first: NaN passes through the clip, and the background stays itself however high the finite minimum.
    array = np.where(nan, background, np.clip(array, values.min(), values.max())).astype(array.dtype)
    counts = [(int(nan.sum()), f"NaN voxels set to {named}"),
              (int(positive.sum()), f"+inf voxels set to the maximum {values.max():g}"),
              (int(negative.sum()), f"-inf voxels set to the minimum {values.min():g}")]
    warnings.append("non-finite values: " + ", ".join(f"{count} {what}" for count, what in counts if count))
    return array, warnings


def colour_in_unit_range(colour: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Colour pixels as the package holds them (data.color): uint8 as stored, anything else as
    floats in [0, 1]; and a sentence for each change made.

    * uint16 colour (a 16-bit PNG, MetaImage or NRRD) keeps its depth as floats: value / 65535.
    * Floats in [0, 1] (give or take ``COLOUR_UNIT_RANGE_SLACK``, what resampling leaves) are kept.
    * Floats reaching above 2 but not above 255 are 8-bit colour stored as floats (a MetaImage or NRRD
      written from an 8-bit picture, a napari layer of floats): taken as [0, 1] they would saturate
      the luma, so they are divided by 255, and the warning says so.

    Raises InputError (without a source; callers add it) for other integer types and for floats
    outside [0, 255] or reaching only (1, 2], which hold no colour scale a reader could tell.
    """
    if colour.dtype == np.uint8:
        return colour, []
    if colour.dtype == np.uint16:
        return (colour / np.iinfo(np.uint16).max).astype(np.float32), []
    if not np.issubdtype(colour.dtype, np.floating):
        raise InputError(f"colour (RGB) pixels of type {colour.dtype} have no known colour scale: save the image as "
                         "8- or 16-bit unsigned colour (uint8, uint16) or as floats in [0, 1]")
    finite = colour[np.isfinite(colour)]
    slack = COLOUR_UNIT_RANGE_SLACK
    if finite.size == 0 or (finite.min() >= -slack and finite.max() <= 1 + slack):
        return colour, []
    low, high = float(finite.min()), float(finite.max())
    if low < -slack or not _EIGHT_BIT_COLOUR_FLOOR < high <= _EIGHT_BIT_COLOUR_MAX:
        raise InputError(f"float colour (RGB) values span [{low:g}, {high:g}], neither [0, 1] nor 8-bit 0-255: "
                         "rescale the colour to [0, 1] or save it as 8-bit colour (uint8)")
    warning = (f"float colour (RGB) values reach {high:g}, above the [0, 1] of float colour: read as 8-bit colour "
               "(0-255) and divided by 255")
    return (colour / _EIGHT_BIT_COLOUR_MAX).astype(colour.dtype), [warning]


def _refuse_empty(array: np.ndarray, path: Path, stored_shape: tuple[int, ...] | None = None) -> None:
    """An image without voxels, refused with its shape as stored (``stored_shape``) where the array
    read has lost axes: nibabel drops those after a zero-length one."""
    if array.size == 0:
        raise InputError(f"the image is empty (array shape {stored_shape or array.shape})", path)


def _choose_frame(n_frames: int, frame: int | None, path: Path, colour_hint: str | None = None) -> int:
    if n_frames == 1 and frame in (None, 0):
        return 0
    if frame is None:
        raise InputError(
            f"this is a 4D file with {n_frames} frames (volumes) and a fusion takes one: save the one you want "
            f"as a file of its own (FSL: fslroi IN OUT k 1), or in Python read_image(path, frame=k) for k in "
            f"0..{n_frames - 1}" + (f"; {colour_hint}" if colour_hint else ""),
            path,
        )
    if not 0 <= frame < n_frames:
        raise InputError(f"frame {frame} does not exist: the file has frames 0..{n_frames - 1}", path)
    return frame


def _refuse_frame_for_single_volume(frame: int | None, path: Path) -> None:
    if frame is not None:
        raise InputError(f"frame={frame} was given but the file holds a single volume, not a 4D series", path)


def _failure(path: Path, what: str, error: Exception) -> InputError:
    if isinstance(error, PermissionError):  # the file is fine; this user may not read it
        return InputError(f"cannot be read: permission denied ({error.strerror})", path)
    # ITK messages span several lines of C++ context; the last non-empty line says what went wrong.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(error).__name__
    return InputError(f"cannot be read as {what} (corrupt, truncated or not this format): {detail}", path)


# ---- NIfTI --------------------------------------------------------------------------------
def load_nifti(path: str | os.PathLike) -> FileBasedImage:
    """``nib.load(path)``, also when the suffix is in mixed case (``Ref.Nii.Gz``, ``scan.Nii``).

    nibabel's ``from_filename`` rebuilds the file name from the suffix it found, in all upper or
    all lower case (so that ``.IMG`` finds ``.HDR``): a mixed-case ``.Nii.Gz`` would be opened as
    ``.nii.Gz``, a file that does not exist. For such a name the image class is chosen as nib.load
    chooses it (its sniff reads the file under the name given) and the image is opened, with
    nib.load's defaults, from a file map that names the file as it is. A file gzip-compressed or not
    otherwise than its suffix says, which nib.load refuses, is read by its content
    (:func:`_nifti_suffix_by_content`). Other names go to nib.load.
    """
    name = str(path)
    fitting_suffix = _nifti_suffix_by_content(name)
    if fitting_suffix is not None:
        return _nifti_by_content(name, gzipped=fitting_suffix.endswith(".gz"))
    if not nibabel_renames(nib.Nifti1Image, name):
        return nib.load(name)
    sniff = None
    for image_class in all_image_classes:
        is_valid, sniff = image_class.path_maybe_image(name, sniff)
        if is_valid and len(image_class.files_types) == 1:  # single-file: .nii, as file_format checked
            return image_class.from_file_map(image_class.make_file_map({image_class.files_types[0][0]: name}))
    return nib.load(name)  # not a single-file NIfTI after all: nib.load says why


def _nifti_suffix_by_content(name: str) -> str | None:
    """The suffix the NIfTI file ``name``'s content calls for (``.nii.gz`` when it is gzip-compressed,
    else ``.nii``) where its name says otherwise: nib.load decompresses by the name alone ("Cannot
    work out file type", "is not a gzip file"). None when the name fits, or the file cannot be opened
    (reading it says why)."""
    try:
        with open(name, "rb") as stream:
            gzipped = stream.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    except OSError:
        return None
    if gzipped == name.lower().endswith(".gz"):
        return None
    return ".nii.gz" if gzipped else ".nii"


def _nifti_by_content(name: str, gzipped: bool) -> FileBasedImage:
    """The single-file NIfTI-1 or NIfTI-2 image in ``name``, decompressed when ``gzipped``, whatever
    its suffix says. The whole file is read into memory (nibabel reads an image from bytes, not from
    a stream it opens by content); only a misnamed file is read so."""
    with (gzip.open if gzipped else open)(name, "rb") as stream:
        content = stream.read()
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        if image_class.header_class.may_contain_header(content[: image_class.header_class.sizeof_hdr]):
            return image_class.from_bytes(content)
    raise ImageFileError(f"no NIfTI header at its start{' once decompressed' if gzipped else ''}")


def _misnamed_compression_warning(fitting_suffix: str) -> str:
    """What a reader of a NIfTI file named otherwise than its compression (``fitting_suffix``) is told."""
    if fitting_suffix == ".nii.gz":
        return ("is gzip-compressed but named .nii: read by its content, but SimpleITK refuses it under this name: "
                "rename it to .nii.gz")
    return ("is not gzip-compressed but named .nii.gz: read by its content, but nibabel refuses it under this name: "
            "rename it to .nii")


def _stored_voxel_sizes(image: Any) -> tuple[float, ...]:
    """pixdim[1:4] of a loaded NIfTI image as its file stores them: nibabel makes negative ones
    positive as it loads the header ("setting to abs"), while ITK reverses those voxel axes."""
    with image.file_map["image"].get_prepare_fileobj(mode="rb") as stream:
        stored = type(image.header).from_fileobj(stream, check=False)
    return tuple(float(size) for size in stored["pixdim"][1:4])


def nibabel_renames(image_class: type[FileBasedImage], name: str) -> bool:
    """Whether nibabel would open or save the single file ``name`` under another name (changing
    the case of a mixed-case suffix), so that it must be given a file map instead of the name."""
    return image_class.filespec_to_file_map(name)[image_class.files_types[0][0]].filename != name


def _read_nifti(path: Path, frame: int | None):
    try:
        image: Any = load_nifti(path)  # a Nifti1/2Image; nibabel types it as any file-based image
        # dataobj applies scl_slope/scl_inter and keeps integer types when there is no scaling.
        data = np.asanyarray(image.dataobj)
        stored_voxel_sizes = _stored_voxel_sizes(image)
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise _failure(path, "NIfTI", error) from error
    _refuse_empty(data, path, image.header.get_data_shape())  # before the geometry, which needs every axis
    # One value per voxel stored with one-voxel 5th+ axes (x, y, z, 1, 1), as ITK reads it: a volume.
    data = data.reshape(data.shape[:4] + tuple(n for n in data.shape[4:] if n != 1)) if data.ndim > 4 else data
    data = _colour_vectors_as_records(data, image.header)
    if data.ndim > 4:
        raise InputError(
            f"{data.ndim}D NIfTI (shape {data.shape}) holds vectors or tensors per voxel; "
            "read displacement fields with napari_unifuse.io.fields.read_displacement",
            path,
        )
    metadata: dict[str, Any] = {}
    fitting_suffix = _nifti_suffix_by_content(str(path))
    if fitting_suffix is not None:
        metadata["warnings"] = [_misnamed_compression_warning(fitting_suffix)]
    colour_hint = _colour_without_intent_hint(data)
    if data.ndim == 4:
        metadata["frame"] = _choose_frame(data.shape[3], frame, path, colour_hint)
        data = data[..., metadata["frame"]]
    else:
        _refuse_frame_for_single_volume(frame, path)
        if colour_hint:  # a volume is what NIfTI's third axis holds: read as one, with the hint in case
            metadata.setdefault("warnings", []).append(f"read as {data.shape[2]} slices of grey values: {colour_hint}")
    is_rgb = data.dtype.names is not None  # RGB24 / RGBA32: one (R, G, B[, A]) record per voxel
    if is_rgb:
        data = _nifti_picture(data, path)
    header = image.header
    mm_per_unit = _MM_PER_LENGTH_UNIT[_nifti_spatial_unit(header)]
    affine = nifti_affine_mm(image)
    xforms = NiftiXforms.from_header(header, mm_per_unit)
    if data.ndim == 2 and not in_an_axial_plane(affine):
        if is_rgb:  # an RGB image is a 2-D picture (io.image.ImageVolume): no geometry places it off the axial plane
            raise InputError("is a colour (RGB) slice in a coronal, sagittal or oblique plane, and colour images are "
                             "read in an axial plane only: convert it to grey values, which are read in their plane",
                             path)
        # A grey 2-D NIfTI in a coronal, sagittal or oblique plane is the one-slice volume its affine
        # describes: a 2-D geometry (an axial plane) cannot hold it. An axial one stays 2-D, like the
        # 2-D images it is paired and trained with; its plane's height stays in its forms
        # (io.nifti_xforms), for its outputs and for a pair of slices at different heights.
        data = data[..., np.newaxis]
        affine[:3, 2] = _slice_normal(affine)
    geometry = Geometry.from_ras_affine(affine, ndim=data.ndim)
    metadata["nifti_affine"] = image.affine.tolist()
    metadata["header"] = {key: _plain(header[key]) for key in header.keys()}
    metadata.update(xforms.to_metadata())
    metadata.setdefault("warnings", []).extend(xforms.reading_warnings(data.shape)
                                               + xforms.itk_mirroring_warnings(stored_voxel_sizes, data.shape))
    # nibabel's (i, j, k) is x-fastest: reversing the axes gives (z, y, x).
    data = data.transpose()
    if is_rgb:
        if "A" in (data.dtype.names or ()):
            note_dropped_alpha(data["A"], metadata)
        data = structured_to_unstructured(data[["R", "G", "B"]])
    return np.ascontiguousarray(data), geometry, metadata, is_rgb


def _colour_vectors_as_records(data: np.ndarray, header: Any) -> np.ndarray:
    """``data`` (after its one-voxel 5th+ axes are dropped) with colour stored as a vector per voxel
    turned into (R, G, B[, A]) records, read on as an RGB24 / RGBA32 NIfTI is; other data as it is.

    SimpleITK writes a colour picture as a 5-D vector NIfTI (x, y, 1, 1, 3|4); the RGB_VECTOR and
    RGBA_VECTOR intents say colour outright, and some writers put their components on the 4th axis
    (x, y, z, 3). Vectors without such an intent are colour when there are 3 or 4 of them of
    unsigned integers, or of floats in [0, 1] in a 2-D picture (x, y, 1): displacement fields
    (read_displacement) hold floats, and a volume's may well be all zero.
    """
    intent = header.get_intent()[0]
    colour_intent = intent in ("rgb vector", "rgba vector")
    components = data.shape[-1]
    if data.dtype.names is not None or components not in (3, 4):  # records already, or no colour
        return data
    if data.ndim == 5 and data.shape[3] == 1:
        vectors = data[:, :, :, 0]
    elif data.ndim == 4 and colour_intent:
        vectors = data
    else:
        return data
    picture_in_unit_range = (vectors.shape[2] == 1 and np.issubdtype(vectors.dtype, np.floating)
                             and vectors.min() >= 0 and vectors.max() <= 1)
    if not (colour_intent or vectors.dtype.kind == "u" or picture_in_unit_range):
        return data
    return unstructured_to_structured(vectors, None, names=list("RGBA"[:components]))


def _colour_without_intent_hint(data: np.ndarray) -> str | None:
    """How to store a colour picture so that it reads as colour, for 8-bit data laid out like one
    whose header does not say colour: (x, y, 1, 3|4), read as frames, or (x, y, 3|4), read as slices
    (_colour_vectors_as_records takes neither for colour: each is a volume as often). None otherwise."""
    components = data.shape[-1] if data.ndim else 0
    laid_out_as_picture = data.ndim == 3 or (data.ndim == 4 and data.shape[2] == 1)
    if data.dtype != np.uint8 or components not in (3, 4) or not laid_out_as_picture:
        return None
    channels = "RGBA"[:components]
    intent = f"the NIfTI intent {channels}_VECTOR (nibabel: header.set_intent('{channels.lower()} vector'))"
    if data.ndim == 3:
        return (f"if it is a colour picture, store it as (x, y, 1, {components}) with {intent}, or as "
                f"{channels}{8 * components}, or save it as PNG")
    return f"if it is a colour picture, give it {intent}, or store it as {channels}{8 * components}, or save it as PNG"


def nifti_affine_mm(image: Any) -> np.ndarray:
    """A nibabel image's affine (its sform, else its qform, as nibabel chooses) in millimetres, as
    read_image places the image; the header alone is read."""
    affine = image.affine.copy()
    affine[:3] *= _MM_PER_LENGTH_UNIT[_nifti_spatial_unit(image.header)]
    return affine


def in_an_axial_plane(affine: np.ndarray) -> bool:
    """Whether a 2-D NIfTI's pixel axes have no z component, i.e. a 2-D geometry holds their
    directions and spacing (its height, the plane's z, is not part of a 2-D geometry)."""
    scale = float(np.abs(affine[:3, :2]).max())
    return bool(np.all(np.abs(affine[2, :2]) <= 1e-6 * scale))


def _slice_normal(affine: np.ndarray) -> np.ndarray:
    """The affine's third column for a one-slice volume: as stored (pixdim[3] along the header's
    normal), or, where the header leaves it zero, 1 mm along the plane's normal."""
    column = affine[:3, 2]
    if np.linalg.norm(column) > 0:
        return column
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    return normal / np.linalg.norm(normal)


def _nifti_picture(colours: np.ndarray, path: Path) -> np.ndarray:
    """The 2D array of an RGB NIfTI: colour images are 2D throughout the package."""
    if colours.ndim == 3 and colours.shape[2] == 1:
        colours = colours[..., 0]  # a 2D picture stored as a one-slice volume
    if colours.ndim != 2:
        raise InputError(
            f"is a {colours.ndim}D colour (RGB) NIfTI of shape {colours.shape}; colour images are supported in "
            "2D only: convert the volume to grey values first",
            path,
        )
    return colours


def _nifti_spatial_unit(header: Any) -> str:
    try:
        return header.get_xyzt_units()[0]
    except KeyError:  # a unit code NIfTI does not define: millimetres, as ITK assumes
        return "unknown"


def _plain(value: Any) -> Any:
    """Header values as JSON-friendly Python objects."""
    value = np.asarray(value)
    if value.dtype.kind == "S":
        return value.tobytes().rstrip(b"\0").decode("latin-1")
    return value.tolist()


# ---- SimpleITK: NRRD / MetaImage / DICOM ----------------------------------------------------
def _read_itk(path: Path, frame: int | None):
    suffix = next(suffix for suffix in ITK_SUFFIXES if path.name.lower().endswith(suffix))
    try:
        image = sitk.ReadImage(itk_filename(path), imageIO=ITK_IMAGE_IOS[suffix])
    except RuntimeError as error:
        # ITK's MetaImage reader names neither a missing data file nor a truncated one, only a
        # stale system error ("Success", "Inappropriate ioctl for device"): the header tells more.
        missing = _metaimage_missing_data(path) if ITK_IMAGE_IOS[suffix] == "MetaImageIO" else None
        if missing:
            raise InputError(f"cannot be read as a MetaImage: {missing}", path) from error
        raise _failure(path, "an ITK image (NRRD/MetaImage)", error) from error
    metadata: dict[str, Any] = {"header": {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}}
    if ITK_IMAGE_IOS[suffix] == "NrrdImageIO":
        _scale_to_mm(image, _nrrd_space_units(path), metadata)
    return _from_sitk(image, frame, path, metadata)


def _nrrd_space_units(path: Path) -> list[str]:
    """The NRRD header's ``space units``, one per world axis ([] where the header has none), which
    ITK's reader drops. The header is the text up to the first blank line (all of a detached .nhdr)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_TEXT_HEADER_LIMIT)
    except OSError:  # ITK has just read it: a file gone since reads as it was read
        return []
    for line in head.decode("latin-1").splitlines():
        if not line:
            break
        stated = _NRRD_SPACE_UNITS.fullmatch(line)
        if stated:
            return re.findall(r'"([^"]*)"', stated.group(1))
    return []


def _scale_to_mm(image: sitk.Image, units: list[str], metadata: dict[str, Any]) -> None:
    """Put ``image``'s spacing and origin, stated in ``units`` (one per world axis), in mm as the
    package places images; where the units are unknown or differ between axes, warn that they are not."""
    mm_per_unit = {_MM_PER_LENGTH_UNIT.get(unit.strip().lower()) for unit in units}
    if mm_per_unit <= {1.0}:  # mm, unstated, or no space units at all
        return
    if len(mm_per_unit) > 1 or None in mm_per_unit:
        metadata.setdefault("warnings", []).append(
            f"space units {' '.join(units)} are not converted to mm (a unit not known here, or units differing "
            "between axes): spacing and origin are taken as mm; state mm, microns or m in the header's space units")
        return
    (scale,) = mm_per_unit
    axes = min(len(units), image.GetDimension())  # the space axes come first; a time axis is not scaled
    image.SetSpacing([value * scale if axis < axes else value for axis, value in enumerate(image.GetSpacing())])
    image.SetOrigin([value * scale if axis < axes else value for axis, value in enumerate(image.GetOrigin())])


def _metaimage_missing_data(path: Path) -> str | None:
    """What of a MetaImage is missing, as its header tells: the header's end, the data file that
    ElementDataFile names, or voxel data (fewer bytes than DimSize × ElementType describe, or than
    CompressedDataSize). None where the header does not show it (a file list): ITK's message stands."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_TEXT_HEADER_LIMIT)
        file_bytes = path.stat().st_size
    except OSError:
        return None
    fields, header_bytes = {}, 0
    for line in head.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # what was read ends inside this line
        key, is_field, value = line.decode("latin-1").partition("=")
        if not is_field:
            return None  # not a MetaImage header line: ITK's message says what is wrong
        fields[key.strip()] = value.strip()
        header_bytes += len(line)
        if key.strip() == "ElementDataFile":  # always the header's last field
            break
    if "ElementDataFile" not in fields:
        if file_bytes > len(head):  # a header this long is not one: ITK's message says what is wrong
            return None
        return "the file is truncated, ending inside its header (before ElementDataFile); copy or export it again"
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        data_bytes, holder = file_bytes - header_bytes, "the file"
    elif data_file != "LIST" and "%" not in data_file:  # one data file (not a list or a numbered series)
        data_path = path.parent / data_file
        if not data_path.is_file():
            return (f"its voxel data file {data_file!r} (the header's ElementDataFile) is missing: put it in the "
                    "header's folder under that name")
        data_bytes, holder = data_path.stat().st_size, f"its voxel data file {data_file!r}"
    else:
        return None
    if "HeaderSize" in fields:
        return None  # data after a header of its own: no size to check here
    try:
        if fields.get("CompressedData", "False").lower() == "true":
            expected_bytes = int(fields["CompressedDataSize"])  # which ITK writes; without it, no size to check
        else:
            values = np.prod([int(size) for size in fields["DimSize"].split()]) * int(
                fields.get("ElementNumberOfChannels", "1"))
            expected_bytes = int(values) * _METAIMAGE_ELEMENT_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):  # a header ITK refuses for itself, or compressed data of unstated size
        return None
    if data_bytes >= expected_bytes:
        return None
    return (f"{holder} is truncated, holding {data_bytes} of the {expected_bytes} bytes of voxel data the header "
            "describes; copy or export it again")


def dicom_series(path: str | os.PathLike) -> tuple[str, list[str]]:
    """The DICOM files read_image reads for ``path``: ``(key, files)``, ``key`` naming what they form.

    A folder gives its one series, a file the series it belongs to, both keyed by the folder and GDCM
    series id (the same for every file of it). A file that is no slice of a stack (a colour picture,
    a multi-frame file, one without ImagePositionPatient: :attr:`_DicomSlice.unstackable`) is read
    alone, keyed by its own path, where its series holds other files too. A DICOMDIR, or a folder
    holding one but no series, is refused with the series folders it indexes; a folder holding no
    series but subfolders with DICOM files (an export's PATIENT/STUDY/SERIES tree), with those."""
    found = _dicom_series(path)
    return found.key, found.files


class _FoundSeries(NamedTuple):
    """What :func:`_dicom_series` finds for a path."""

    key: str  # dicom_series's key
    files: list[str]  # the files read: the series, or a file of it read alone
    series: list[str]  # every file GDCM reads of the series
    listed: frozenset[str]  # the names of every file GDCM reads in the folder, of any series


def _dicom_series(path: str | os.PathLike) -> _FoundSeries:
    """:func:`dicom_series`'s key and files, with the series' and the folder's files GDCM reads."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name.upper() == _DICOMDIR_NAME:
        raise InputError(f"is a DICOMDIR, the index of a DICOM disc or export, not an image: {_indexed_series(path)}",
                         path)
    series_ids = dicom_series_ids(folder)
    if not series_ids:
        dicomdir = dicomdir_in(folder)
        if dicomdir is not None:
            raise InputError("holds no DICOM series itself but a DICOMDIR, the index of a DICOM disc or export: "
                             f"{_indexed_series(dicomdir)}", folder)
        raise InputError(f"no DICOM series found in this folder{_what_else_the_folder_holds(folder)}", folder)
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(itk_filename(folder), sid)
                       for sid in series_ids}
    listed = frozenset(Path(file).name for files in files_by_series.values() for file in files)
    if path.is_dir():
        if len(series_ids) > 1:
            listing = "; ".join(_series_summary(sid, files) for sid, files in files_by_series.items())
            raise InputError(
                f"the folder holds {len(series_ids)} DICOM series: {listing}. "
                "Open one file of the series you want (any of its files, whatever its name) instead of the folder",
                path,
            )
        series_id = series_ids[0]
    else:
        wanted = path.resolve()
        matches = [sid for sid, files in files_by_series.items() if wanted in {Path(f).resolve() for f in files}]
        if not matches:
            raise InputError(_why_in_no_series(path), path)
        series_id = matches[0]
        if len(files_by_series[series_id]) > 1 and _unstackable(path):
            return _FoundSeries(f"{wanted}#{series_id}", [str(path)], list(files_by_series[series_id]), listed)
    files = list(files_by_series[series_id])
    return _FoundSeries(f"{folder.resolve()}#{series_id}", files, files, listed)


# What a DICOM file holding an image that GDCM skips is, as messages say it.
_UNREADABLE_IMAGE = "damaged or truncated, or compressed in a way GDCM does not decode"


def _why_in_no_series(path: Path) -> str:
    """Why the file ``path``, named to be read, is in none of the series GDCM finds in its folder."""
    if not holds_dicom(path):
        return "is not a DICOM file by its content (empty, damaged or of another format)"
    if _dicom_image_series(path)[0]:
        return f"holds a DICOM image that could not be read ({_UNREADABLE_IMAGE})"
    return ("is a DICOM file without an image (a structured report, an RT structure set or another object), "
            "not part of any image series")


def _dicom_image_series(path: Path) -> tuple[bool, str | None]:
    """Whether the DICOM file ``path`` holds pixel data, and its SeriesInstanceUID (None where its header
    cannot be read, which may well be an image's)."""
    import pydicom  # only for a file GDCM skipped: it costs every start of the program otherwise

    try:
        with catch_warnings():
            simplefilter("ignore")
            dataset = pydicom.dcmread(path, defer_size=1024, specific_tags=["PixelData", "SeriesInstanceUID"])
    except Exception:  # pydicom raises many types on a damaged header
        return True, None
    return "PixelData" in dataset, dataset.get("SeriesInstanceUID")


def _unread_images(folder: Path, listed: frozenset[str], series_uid: str | None) -> list[str]:
    """The names of the files in ``folder`` holding a DICOM image of the series ``series_uid`` (of any series
    where None; always those whose header names none) that GDCM could not read, and so left out of the
    files it ``listed``; reports, RT structure sets and other series' files are not named."""
    unread = []
    for entry in sorted(folder.iterdir()):
        if entry.name in listed or entry.name.upper() == _DICOMDIR_NAME or not entry.is_file() or not holds_dicom(entry):
            continue
        holds_image, of_series = _dicom_image_series(entry)
        if holds_image and (series_uid is None or of_series in (series_uid, None)):
            unread.append(entry.name)
    return unread


def _what_else_the_folder_holds(folder: Path) -> str:
    """For a folder without a series: the DICOM images in it that could not be read, or else its subfolders
    holding DICOM files (an export's PATIENT/STUDY/SERIES tree); nothing where there are neither."""
    unread = _unread_images(folder, frozenset(), None)
    if unread:
        return f": its DICOM image file(s) {_named(unread)} could not be read ({_UNREADABLE_IMAGE})"
    subfolders = _dicom_subfolders(folder)
    if subfolders:
        return (", but subfolders hold DICOM files (an export's PATIENT/STUDY/SERIES folders?): open the series "
                f"folder you want: {_named(subfolders)}")
    return ""


def _dicom_subfolders(folder: Path) -> list[str]:
    """The subfolders of ``folder`` (relative, a few levels down, those first met when there are very many)
    with a DICOM file among their first files."""
    found = []
    for visited, (root, subfolders, names) in enumerate(os.walk(folder)):
        depth = len(Path(root).relative_to(folder).parts)
        subfolders.sort()
        if depth >= _SUBFOLDER_SEARCH_DEPTH:
            subfolders.clear()
        if visited >= _SUBFOLDER_SEARCH_LIMIT:
            break
        if depth and any(holds_dicom(Path(root, name)) for name in sorted(names)[:_FILES_LOOKED_AT]):
            found.append(Path(root).relative_to(folder).as_posix())
    return found


def dicomdir_in(folder: str | os.PathLike) -> Path | None:
    """The DICOMDIR (a disc's or an export's index) ``folder`` holds, if any."""
    # A disc read without its Rock Ridge names shows the index in lower case.
    return next((candidate for name in (_DICOMDIR_NAME, _DICOMDIR_NAME.lower())
                 if (candidate := Path(folder) / name).is_file()), None)

def _unstackable(path: Path) -> bool:
    """Whether the DICOM file ``path`` is read alone rather than with its series."""
    try:
        return _DicomSlice.of(str(path)).unstackable is not None
    except RuntimeError:  # an unreadable header: reading its series says what is wrong
        return False


def _indexed_series(dicomdir: Path) -> str:
    """What to open instead of the DICOMDIR ``dicomdir``: the series folders it lists (relative to its
    folder), each with its modality, description and number of files present."""
    import pydicom  # only for a DICOMDIR or a multi-frame file: it costs every start of the program otherwise
    from pydicom.errors import InvalidDicomError
    from pydicom.fileset import FileSet

    try:
        with catch_warnings():  # pydicom warns of each listed file that is missing: they are not listed
            simplefilter("ignore")
            instances = list(FileSet(pydicom.dcmread(dicomdir)))
    except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError):  # a damaged index names no folders
        instances = []
    by_series: dict[str, list] = {}
    for instance in instances:
        by_series.setdefault(getattr(instance, "SeriesInstanceUID", ""), []).append(instance)
    listing = []
    for members in by_series.values():
        first = members[0]
        folder = Path(os.path.relpath(Path(first.path).parent, dicomdir.parent)).as_posix()
        description = getattr(first, "SeriesDescription", "")
        what = " ".join(part for part in (getattr(first, "Modality", ""), repr(description) if description else "") if part)
        listing.append(f"{folder} ({what + ', ' if what else ''}{len(members)} files)")
    if not listing:
        return "open a series folder of the disc or export instead"
    return f"open one of the series folders it lists instead: {_named(listing)}"


def _named(names: list[str], shown: int = 5) -> str:
    """``names`` joined by commas, the first ``shown`` of them and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _series_summary(series_id: str, files: tuple[str, ...]) -> str:
    """How a series is named in a refusal: its id, description and a file that opens it."""
    try:
        description = _DicomSlice.of(files[0]).tags.get(_SERIES_DESCRIPTION_TAG)
    except RuntimeError:  # an unreadable header costs the listing a description, not the refusal
        description = None
    named = f" {description!r}" if description else ""
    return f"{series_id}{named} ({len(files)} files, e.g. {Path(files[0]).name})"


@dataclass(frozen=True)
class _DicomSlice:
    """What GDCM's header says about one file of a series, read without its pixels."""

    file: str
    size: tuple[int, ...]  # ITK order: columns, rows, frames
    direction: np.ndarray  # ITK 3×3: the ImageOrientationPatient rows and their normal as columns
    position: np.ndarray | None  # ImagePositionPatient (LPS mm); None when the file has none
    components: int  # values per pixel: 3 for a colour picture
    tags: dict[str, str]  # _DICOM_TAGS and the gantry tilt, by tag, where present
    spacing: tuple[float, float]  # ITK order: between columns, between rows (mm)
    pixel_id: int  # the SimpleITK pixel type GDCM reads this file's values in (after its rescale)
    placed: bool  # whether GDCM found a position anywhere (ImagePositionPatient, an NM detector's)

    @classmethod
    def of(cls, file: str) -> _DicomSlice:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(file)
        with _itk_console_warnings_hidden():
            reader.ReadImageInformation()
        character_set = reader.GetMetaData(_CHARACTER_SET_TAG) if reader.HasMetaDataKey(_CHARACTER_SET_TAG) else ""
        tags = {tag: _decoded(reader.GetMetaData(tag), character_set).strip()
                for tag in (*_DICOM_TAGS, _GANTRY_TILT_TAG) if reader.HasMetaDataKey(tag)}
        # GDCM's origin is ImagePositionPatient, or 0 when the tag is absent: only the tag counts.
        position = np.array(reader.GetOrigin(), dtype=float) if reader.HasMetaDataKey(_IMAGE_POSITION_TAG) else None
        direction = np.array(reader.GetDirection(), dtype=float).reshape(reader.GetDimension(), -1)
        # Without the tag, GDCM still places some files (an NM file by its detector's position); the
        # others it puts at the origin with the identity direction, which is then no position at all.
        placed = position is not None or any(reader.GetOrigin()) or not np.array_equal(direction, np.eye(len(direction)))
        spacing = tuple(float(value) for value in reader.GetSpacing()[:2])
        return cls(file, tuple(reader.GetSize()), direction, position, reader.GetNumberOfComponents(), tags,
                   (spacing[0], spacing[1]), reader.GetPixelID(), placed)

    @property
    def normal(self) -> np.ndarray:
        return self.direction[:, -1]

    @property
    def frames(self) -> int:
        """How many frames (images) the file holds: more than one in a multi-frame file."""
        return self.size[2] if len(self.size) > 2 else 1

    @property
    def unstackable(self) -> str | None:
        """What this file is where it cannot be one slice of a stack (a phrase for "{n} {it}", with
        {s} for the plural), else None: a multi-frame file places its own frames, a colour picture
        is a picture of its own, and a file without a position could lie anywhere in the stack."""
        if self.frames > 1:
            return "multi-frame file{s}"
        if self.components > 1:
            return "colour picture{s}"
        if self.position is None:
            return "file{s} without ImagePositionPatient"
        return None

    @property
    def rescale(self) -> tuple[float, ...]:
        """This slice's (RescaleSlope, RescaleIntercept)."""
        values = []
        for name, (tag, default) in _RESCALE_TAGS.items():
            stated = self.tags.get(tag, "") or str(default)
            try:
                values.append(float(stated))
            except ValueError:
                raise InputError(f"{Path(self.file).name} has a {name} of {stated!r}, which is not a number; "
                                 "export the series again or correct that tag") from None
        return tuple(values)

    def stacks_with(self, other: _DicomSlice) -> bool:
        """Whether this slice and ``other`` can form one volume: the same image size, pixel spacing and
        orientation (within DICOM's decimal noise)."""
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, rtol=0.0, atol=_PIXEL_SPACING_TOLERANCE_MM)
                and _same_orientation(self.direction, other.direction))

    @property
    def pixels(self) -> str:
        """The image's size and pixel spacing, as a listing of stacks names them."""
        return f"{self.size[0]}×{self.size[1]} pixels of {self.spacing[0]:g}×{self.spacing[1]:g} mm"


def _same_orientation(direction: np.ndarray, other: np.ndarray) -> bool:
    """Whether the row and column directions (the first two columns) of two directions lie within
    ``_ORIENTATION_TOLERANCE`` radians of each other (between unit vectors, the distance is the angle
    to first order)."""
    return bool(np.linalg.norm(direction[:, :2] - other[:, :2], axis=0).max() <= _ORIENTATION_TOLERANCE)


def _decoded(text: str, character_set: str) -> str:
    """A tag's text as the file's SpecificCharacterSet (``character_set``) spells it.

    SimpleITK hands on GDCM's bytes decoded as UTF-8, keeping bytes that are not UTF-8 as surrogate
    escapes: Latin-1 (ISO_IR 100) 'Schädel' arrives as 'Sch\\udce4del', which JSON and the viewer show
    garbled. Text in no stated character set is kept where it is UTF-8 and read as Latin-1 otherwise."""
    raw = text.encode("utf-8", "surrogateescape")
    if raw.isascii():
        return text
    if not character_set.strip():
        return text if raw.decode("utf-8", "replace") == text else raw.decode("latin-1")
    from pydicom.charset import convert_encodings, decode_bytes  # only for non-ASCII text

    with catch_warnings():  # an unknown character set falls back to Latin-1, as said above
        simplefilter("ignore")
        return decode_bytes(raw, convert_encodings(character_set.strip().split("\\")), {ord("\\")})


@dataclass(frozen=True)
class _FrameGroups:
    """Where each frame of an enhanced multi-frame DICOM file lies and how its values scale, from the
    per-frame and shared functional groups (which GDCM does not expose: pydicom reads them), in file order."""

    positions: np.ndarray | None  # n × 3 ImagePositionPatient (LPS mm); None unless every frame has one
    direction: np.ndarray | None  # ITK 3×3 as in _DicomSlice, from the PlaneOrientationSequence
    pixel_spacing: tuple[float, float] | None  # ITK order (columns, rows), from the PixelMeasuresSequence
    rescales: np.ndarray  # n × 2: each frame's RescaleSlope and RescaleIntercept

    @classmethod
    def of(cls, dicom_file: _DicomSlice) -> _FrameGroups | None:
        """The functional groups of ``dicom_file``; None for a multi-frame file without per-frame
        groups (a cine loop, a legacy multi-frame file), which GDCM places as a whole."""
        import pydicom  # only for a multi-frame file or a DICOMDIR: it costs every start of the program otherwise

        dataset = pydicom.dcmread(dicom_file.file, stop_before_pixels=True, force=True,
                                  specific_tags=["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"])
        per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
        if not per_frame:
            return None
        shared = (dataset.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]

        def stated(frame: pydicom.Dataset, sequence: str, attribute: str, default: Any = None) -> Any:
            # DICOM puts each functional group either in every frame's item or once in the shared one.
            for groups in (frame, shared):
                items = groups.get(sequence)
                if items and attribute in items[0]:
                    return items[0][attribute].value
            return default

        positions = [stated(frame, "PlanePositionSequence", "ImagePositionPatient") for frame in per_frame]
        orientations: list[np.ndarray] = []  # one of each orientation (within _ORIENTATION_TOLERANCE)
        for frame in per_frame:
            stated_orientation = stated(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
            if stated_orientation:
                axes = np.array(stated_orientation, dtype=float).reshape(2, 3).T  # rows, columns as columns
                if not any(_same_orientation(axes, known) for known in orientations):
                    orientations.append(axes)
        if len(orientations) > 1:
            raise InputError(f"its {len(per_frame)} frames lie in {len(orientations)} orientations (a localizer of "
                             "several planes?), which form no one volume: export the frames of one orientation as a "
                             "file or series of their own")
        direction = None
        if orientations:
            (orientation,) = orientations
            direction = np.column_stack([orientation, np.cross(orientation[:, 0], orientation[:, 1])])
        spacing = stated(per_frame[0], "PixelMeasuresSequence", "PixelSpacing")  # rows apart, columns apart
        default_slope, default_intercept = dicom_file.rescale
        rescales = [(stated(frame, "PixelValueTransformationSequence", "RescaleSlope", default_slope),
                     stated(frame, "PixelValueTransformationSequence", "RescaleIntercept", default_intercept))
                    for frame in per_frame]
        return cls(np.array(positions, dtype=float) if all(p is not None for p in positions) else None,
                   direction, (float(spacing[1]), float(spacing[0])) if spacing else None,
                   np.array(rescales, dtype=float))


def _read_dicom(path: Path, frame: int | None):
    found = _dicom_series(path)
    try:
        slices = [_DicomSlice.of(file) for file in found.files]
    except RuntimeError as error:
        raise _failure(path, "a DICOM series", error) from error
    slices, warnings = _stackable(slices)
    slices, stack_warnings = _one_stack(slices)
    warnings += stack_warnings
    if len(found.files) == len(found.series):  # the series, not a file of it read alone
        unread = _unread_images(Path(found.files[0]).parent, found.listed, slices[0].tags.get(_SERIES_UID_TAG))
        if unread:
            warnings.append(f"{len(unread)} file(s) of the series could not be read ({_UNREADABLE_IMAGE}) and are "
                            f"left out: {_named(unread)}; of its {len(found.series) + len(unread)} files, "
                            f"{len(slices)} are read")
    if slices[0].frames > 1:
        image, positions, rescales = _read_multi_frame_file(slices[0], path)
    else:
        image, positions, rescales = _read_slices(slices, path)
    tags = {name: slices[0].tags[tag] for tag, name in _DICOM_TAGS.items() if tag in slices[0].tags}
    tags.update(_varying_rescale_header(rescales))
    metadata: dict[str, Any] = {"header": tags, "dicom_files": len(slices), "dicom_series": found.key}
    if len(slices) == 1 and positions is None and not slices[0].placed:
        image, unplaced_warning = _unplaced(image, metadata)
        warnings.append(unplaced_warning)
    if tags.get("Modality") in _DICOM_MODALITIES:
        metadata["modality"] = _DICOM_MODALITIES[tags["Modality"]]
    if positions is not None and image.GetDimension() == 3:
        image, placement_warnings = _placed_at_slice_positions(image, positions, slices[0].tags.get(_GANTRY_TILT_TAG))
        warnings += placement_warnings
    if warnings:
        metadata["warnings"] = warnings
    return _from_sitk(image, frame, path, metadata)


def _read_slices(slices: list[_DicomSlice], path: Path) -> tuple[sitk.Image, np.ndarray | None, np.ndarray]:
    """The volume of single-frame ``slices`` (sorted along the stack), their positions where there
    are several (each has one), and each slice's rescale."""
    positions = np.array([dicom_slice.position for dicom_slice in slices]) if len(slices) > 1 else None
    if positions is not None:
        _refuse_repeated_positions(positions)
    rescales = np.array([dicom_slice.rescale for dicom_slice in slices])
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([dicom_slice.file for dicom_slice in slices])
    if _needs_float_pixels(rescales):
        reader.SetOutputPixelType(sitk.sitkFloat64)
    elif len({dicom_slice.pixel_id for dicom_slice in slices}) > 1:
        # ImageSeriesReader would read every slice in the first slice's type (wrapping a signed slice's
        # -500 to 65036 in an unsigned volume, clipping 16-bit slices after an 8-bit one).
        reader.SetOutputPixelType(_pixel_type_holding([dicom_slice.pixel_id for dicom_slice in slices]))
    return _executed(reader, path), positions, rescales


def _pixel_type_holding(pixel_ids: list[int]) -> int:
    """The SimpleITK pixel type holding the values of every type in ``pixel_ids``, as NumPy promotes
    types (uint16 and int16 into int32, uint8 and uint16 into uint16)."""
    holding = np.result_type(*(_SITK_PIXEL_DTYPES.get(pixel_id, np.float64) for pixel_id in pixel_ids))
    return next(pixel_id for pixel_id, dtype in _SITK_PIXEL_DTYPES.items() if np.dtype(dtype) == holding)


def _unplaced(image: sitk.Image, metadata: dict[str, Any]) -> tuple[sitk.Image, str]:
    """A DICOM file GDCM found no position for (no ImagePositionPatient, no per-frame or detector
    position), and the warning saying so.

    One frame (a screenshot, a secondary capture, a key image) is a picture, read as a PNG is: 2D,
    1 mm pixels from the origin, with the picture rules of a fusion (:func:`is_picture`); a stated
    pixel spacing places nothing without a position. Several frames stay a volume where GDCM put it."""
    if image.GetDimension() == 3 and image.GetSize()[2] > 1:
        return image, ("has no position (no ImagePositionPatient): its frames are placed at the scanner's origin with "
                       f"{_spacing(image.GetSpacing())} mm voxels, so where it lies beside another image is a guess")
    stated_spacing = image.GetSpacing()[:2]
    if image.GetDimension() == 3:
        image = sitk.Extract(image, [*image.GetSize()[:2], 0], [0, 0, 0])
    image.SetSpacing((1.0, 1.0))
    image.SetOrigin((0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 1.0))
    metadata[WITHOUT_POSITION] = True
    unused = f"; its stated pixel spacing of {_spacing(stated_spacing)} mm places nothing without one" if any(
        size != 1.0 for size in stated_spacing) else ""
    return image, f"has no position (no ImagePositionPatient): read as a picture, like a PNG, 1 pixel = 1 mm{unused}"


def _spacing(spacing: tuple[float, ...]) -> str:
    return "×".join(f"{size:g}" for size in spacing)


def _read_multi_frame_file(dicom_file: _DicomSlice, path: Path) -> tuple[sitk.Image, np.ndarray | None, np.ndarray]:
    """The volume of a multi-frame file, its frames' positions (sorted along the stack, as the volume
    holds them) where each frame has one, and each frame's rescale.

    GDCM reads the frames in file order, applies the first frame's rescale to all of them, and
    gives up on the geometry (1 mm, origin 0) when frames are unevenly spaced: where the per-frame
    groups say better, each frame gets its own rescale and the frames are stacked as a series'
    slices are, so that the series' checks apply to them."""
    try:
        frames = _FrameGroups.of(dicom_file)
    except InputError:  # a file read whole that forms no volume says so itself
        raise
    except (OSError, ValueError, TypeError, AttributeError) as error:  # pydicom's errors on a damaged file
        raise _failure(path, "a multi-frame DICOM file", error) from error
    rescales = np.array([dicom_file.rescale]) if frames is None else frames.rescales
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(dicom_file.file)
    if _needs_float_pixels(rescales):
        reader.SetOutputPixelType(sitk.sitkFloat64)
    image = _executed(reader, path)
    if frames is None:
        return image, None, rescales
    pixels = sitk.GetArrayFromImage(image)
    if len(np.unique(rescales, axis=0)) > 1:  # GDCM scaled every frame by the first frame's rescale
        slopes, intercepts = (column.reshape(-1, *[1] * (pixels.ndim - 1)) for column in rescales.T)
        pixels = (pixels - intercepts[0]) / slopes[0] * slopes + intercepts
    if frames.positions is None:
        return _with_pixels(image, pixels), None, rescales
    direction = dicom_file.direction if frames.direction is None else frames.direction
    order = _stack_order(frames.positions, direction[:, 2])
    positions = frames.positions[order]
    _refuse_repeated_positions(positions)
    stacked = sitk.GetImageFromArray(pixels[order], isVector=image.GetNumberOfComponentsPerPixel() > 1)
    # Upright along the planes' normal at the first-to-last step, as ImageSeriesReader stacks slices.
    step = float((positions[-1] - positions[0]) @ direction[:, 2]) / (len(positions) - 1)
    stacked.SetSpacing((*(frames.pixel_spacing or image.GetSpacing()[:2]), step))
    stacked.SetDirection(direction.ravel().tolist())
    stacked.SetOrigin(positions[0].tolist())
    return stacked, positions, rescales


def _with_pixels(image: sitk.Image, pixels: np.ndarray) -> sitk.Image:
    """``pixels`` on ``image``'s grid."""
    replaced = sitk.GetImageFromArray(pixels, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    replaced.CopyInformation(image)
    return replaced


def _executed(reader: sitk.ImageReaderBase, path: Path) -> sitk.Image:
    try:
        with _itk_console_warnings_hidden():  # uneven slices are reported in the warnings instead
            return reader.Execute()
    except RuntimeError as error:
        raise _failure(path, "a DICOM series", error) from error


def _needs_float_pixels(rescales: np.ndarray) -> bool:
    """Whether the series must be read as float64 for each slice to keep its own rescale
    (``rescales``: each slice's slope and intercept, n × 2).

    ImageSeriesReader gives the volume the pixel type GDCM picks for the first file and casts the
    other slices to it: a PET series whose first slice (empty) has slope 1 became uint16, truncating
    the other slices' fractional values and wrapping those above 65535. GDCM reads a single file
    with a fractional rescale as float64; a series of one whole-number rescale keeps its integers."""
    return len(np.unique(rescales, axis=0)) > 1 or not np.array_equal(rescales, np.round(rescales))


def _varying_rescale_header(rescales: np.ndarray) -> dict[str, str]:
    """Header entries for a rescale that differs between slices, where the first slice's would mislead."""
    return {name: f"varies per slice: {values.min():g} to {values.max():g}"
            for name, values in zip(_RESCALE_TAGS, rescales.T) if values.min() != values.max()}


def _stackable(slices: list[_DicomSlice]) -> tuple[list[_DicomSlice], list[str]]:
    """The files of a series that can stack into one volume, and a warning naming those left out.

    A series may also hold files that are no slice of a stack (:attr:`_DicomSlice.unstackable`):
    a key image or screenshot without a position, a colour picture, a multi-frame file. They are
    left out of the others' stack; where no other file is left the series forms no volume and is
    refused, since each of them opens alone by its own name."""
    left_out: dict[str, list[str]] = {}
    for dicom_slice in slices:
        if dicom_slice.unstackable is not None:
            left_out.setdefault(dicom_slice.unstackable, []).append(Path(dicom_slice.file).name)
    if len(slices) == 1 or not left_out:
        return slices, []
    listing = " and ".join(f"{len(names)} {kind.format(s='s' if len(names) > 1 else '')} ({_named(names)})"
                           for kind, names in left_out.items())
    kept = [dicom_slice for dicom_slice in slices if dicom_slice.unstackable is None]
    if not kept:
        raise InputError(f"the series holds {listing}, which do not stack into one volume: open one file of it (by "
                         "its name) to read that file alone")
    return kept, [f"{listing} left out of the stack; the {len(kept)} slices of the stack are read"]


def _one_stack(slices: list[_DicomSlice]) -> tuple[list[_DicomSlice], list[str]]:
    """The largest stack of slices of one image size, pixel spacing and orientation, sorted along its
    normal, and a warning naming the files left out.

    A localizer (scout) image often shares the SeriesInstanceUID of the stack it planned; ITK
    would refuse the whole series for the odd image size, and stack slices of another pixel spacing
    at the first slice's."""
    stacks: list[list[_DicomSlice]] = []
    for dicom_slice in slices:
        stack = next((stack for stack in stacks if stack[0].stacks_with(dicom_slice)), None)
        if stack is None:
            stacks.append([dicom_slice])
        else:
            stack.append(dicom_slice)
    ranked = sorted(stacks, key=len, reverse=True)
    kept, warnings = ranked[0], []
    if len(ranked) > 1:
        if len(ranked[1]) == len(kept):
            listing = "; ".join(f"{len(stack)} of {stack[0].pixels} (e.g. {Path(stack[0].file).name})"
                                for stack in ranked)
            raise InputError("the series mixes image orientations, sizes or pixel spacings in stacks of equal size: "
                             f"{listing}. Export each stack as a series of its own and open the one you want")
        left_out = [Path(dicom_slice.file).name for stack in ranked[1:] for dicom_slice in stack]
        others = "; ".join(f"{len(stack)} of {stack[0].pixels}" for stack in ranked[1:])
        warnings.append(f"{len(left_out)} file(s) of another orientation, image size or pixel spacing left out (a "
                        f"localizer or scout image?): {_named(left_out)} ({others}); the {len(kept)} slices of the "
                        f"largest stack ({kept[0].pixels}) are read")
    if len(kept) > 1:  # several slices: each has a position (_stackable)
        order = _stack_order(np.array([dicom_slice.position for dicom_slice in kept]), kept[0].normal)
        kept = [kept[k] for k in order]
    return kept, warnings


def _stack_order(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The order of slices or frames at ``positions`` (n × 3) along their planes' ``normal``."""
    return np.argsort(positions @ normal, kind="stable")


def _refuse_repeated_positions(positions: np.ndarray) -> None:
    """Raise when slices share a position: ITK would spread them into one squeezed volume.

    ``positions`` are sorted along the stack, so slices at one position are neighbours."""
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    mean_step = np.linalg.norm(positions[-1] - positions[0]) / (len(positions) - 1)
    repeated = gaps <= _SLICE_POSITION_TOLERANCE * mean_step
    if not repeated.any():
        return
    sharing = int(np.count_nonzero(np.r_[repeated, False] | np.r_[False, repeated]))
    distinct = len(positions) - int(np.count_nonzero(repeated))
    raise InputError(
        f"{sharing} of the {len(positions)} slices share their position with another ({distinct} distinct "
        "positions): several images per position (a dynamic, multi-phase or multi-echo series?) cannot form one "
        "volume. Export one phase or time point as a series of its own (e.g. from the PACS or the scanner; "
        "dcm2niix writes each as its own NIfTI) and open that"
    )


def _placed_at_slice_positions(image: sitk.Image, positions: np.ndarray,
                               stated_tilt: str | None) -> tuple[sitk.Image, list[str]]:
    """``image`` with its slice axis along the line the positions follow, and warnings.

    ITK stacks the slices along their planes' normal. A gantry-tilted CT steps along a line tilted
    from that normal, so each slice would be shifted in-plane by a growing amount: the slice axis is
    then set along the positions' line (a sheared grid, which Geometry and resampling handle), and
    the tilt named. Slices still away from that evenly spaced line are reported, not moved."""
    n_slices = len(positions)
    step = (positions[-1] - positions[0]) / (n_slices - 1)
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    along_normal = float(step @ normal)
    sideways = float(np.linalg.norm(step - along_normal * normal))
    warnings = []
    if sideways * (n_slices - 1) > _SLICE_POSITION_TOLERANCE * np.linalg.norm(step):
        upright_offset = _worst_misplacement(positions, image)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        direction[:, 2] = step / np.linalg.norm(step)
        image = sitk.Image(image)  # the reader's output stays as read
        image.SetDirection(direction.ravel().tolist())
        image.SetSpacing((*image.GetSpacing()[:2], float(np.linalg.norm(step))))
        image.SetOrigin(positions[0].tolist())
        angle = np.degrees(np.arctan2(sideways, abs(along_normal)))
        stated = f"; GantryDetectorTilt (0018,1120) says {stated_tilt}°" if stated_tilt else ""
        warnings.append(
            f"gantry tilt of {angle:.3g}° (the slices step along a line {angle:.3g}° off their planes' normal{stated}): "
            f"each slice is placed at its ImagePositionPatient on a sheared grid, where stacking them upright would put "
            f"them up to {upright_offset:.3g} mm off. Outputs on this grid keep the shear: `unifuse fuse` writes them as "
            "MetaImage (.mha); NIfTI holds a shear in its sform only, which ITK-based viewers ignore")
    uneven = _uneven_slices_warning(positions, image)
    if uneven:
        warnings.append(uneven)
    return image, warnings


def _worst_misplacement(positions: np.ndarray, image: sitk.Image) -> float:
    """The largest distance (mm) between a slice's ImagePositionPatient and where ``image`` puts it."""
    placed = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(len(positions))])
    return float(np.linalg.norm(positions - placed, axis=1).max())


def _uneven_slices_warning(positions: np.ndarray, image: sitk.Image) -> str | None:
    """A sentence when the slices' ImagePositionPatient are not where the volume places them.

    ITK builds the volume with one slice spacing (first to last position over the number of gaps),
    so a missing slice moves the slices on either side of it."""
    misplacement = _worst_misplacement(positions, image)
    spacing = image.GetSpacing()[2]
    if misplacement <= _SLICE_POSITION_TOLERANCE * spacing:
        return None
    assumed = f"The volume assumes {spacing:g} mm throughout, so slices are misplaced by up to {misplacement:.3g} mm"
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    usual = float(np.median(steps))
    odd = int(np.argmax(np.abs(steps - usual)))
    if abs(steps[odd] - usual) <= _SLICE_POSITION_TOLERANCE * usual:
        # Even gaps along a bent line: nothing is missing, the stack is not straight.
        return f"slices are evenly spaced but do not lie on one straight line. {assumed}"
    suspicion = "a slice may be missing" if steps[odd] > usual else "slices are closer together there"
    return (f"slices are not evenly spaced: a gap of {steps[odd]:g} mm between slices {odd} and {odd + 1} where "
            f"most are {usual:g} mm apart; {suspicion}. {assumed}")


def _from_sitk(image: sitk.Image, frame: int | None, path: Path, metadata: dict[str, Any]):
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        chosen = _choose_frame(size[3], frame, path)
        # Extract with a zero-size 4th axis collapses it and keeps the 3D geometry.
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, chosen])
        metadata["frame"] = chosen
    else:
        _refuse_frame_for_single_volume(frame, path)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1 and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        # A one-frame colour DICOM (ultrasound, endoscopy, a photo) comes as a one-slice volume: it
        # is a 2D picture. GUESS keeps the in-plane directions where they form a valid 2D frame.
        image = sitk.Extract(image, [*image.GetSize()[:2], 0], [0, 0, 0],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOGUESS)
    array = sitk.GetArrayFromImage(image)
    is_rgb = False
    if components > 1:
        if image.GetDimension() != 2 or components not in (3, 4):
            raise InputError(
                f"holds {components}-component vectors per voxel; read_image needs a scalar image or "
                "a 2D RGB image (displacement fields: napari_unifuse.io.fields.read_displacement)",
                path,
            )
        if components == 4:
            note_dropped_alpha(array[..., 3], metadata)
        array, is_rgb = array[..., :3], True
    return array, Geometry.from_sitk(image), metadata, is_rgb


def note_dropped_alpha(alpha: np.ndarray, metadata: dict[str, Any]) -> None:
    """Fusion reads colour, not transparency: where a picture is see-through, say that its stored
    colour is used as if it were opaque (an opaque alpha channel is dropped without a word)."""
    opaque = np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else 1.0
    see_through = float(np.mean(alpha < opaque))
    if see_through > 0:
        metadata.setdefault("warnings", []).append(
            f"transparency ignored: {100 * see_through:.3g} % of the pixels are partly or fully transparent "
            "(alpha channel); their stored colour is used as if opaque")


# ---- Pillow: PNG / JPG ----------------------------------------------------------------------
def _read_pillow(path: Path, frame: int | None):
    _refuse_frame_for_single_volume(frame, path)
    metadata: dict[str, Any] = {}
    try:
        sixteen_bit_colour_type = _png_16bit_colour_type(path)
        if sixteen_bit_colour_type == _PNG_GREY_ALPHA:
            raise InputError("is a 16-bit grey + alpha PNG, which no reader here decodes at full depth (Pillow cuts it "
                             "to 8 bits); save it as 16-bit greyscale without alpha, or as NIfTI")
        with Image.open(path) as image:
            image.load()  # decode now so that a truncated file fails here
            mode = image.mode
            info = {key: value for key, value in image.info.items() if isinstance(value, (str, int, float))}
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
            if sixteen_bit_colour_type is None:
                array = _pillow_pixels(image, metadata)
            else:  # Pillow keeps only the high byte of 16-bit colour: ITK's PNG reader keeps all 16 bits
                sixteen_bit = sitk.ReadImage(itk_filename(path), imageIO="PNGImageIO")
                array = _from_sitk(sixteen_bit, frame, path, metadata)[0]  # its pixels: every picture is unplaced
    except InputError:  # read_image names the file
        raise
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise _failure(path, "an image (PNG/JPG)", error) from error
    is_rgb = array.ndim == 3
    if is_rgb and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        # Grey pictures saved as RGB (common for exported slices) are grey images.
        array, is_rgb = np.ascontiguousarray(array[..., 0]), False
    if orientation in _UPRIGHT_BY_EXIF_ORIENTATION:
        turn, upright = _UPRIGHT_BY_EXIF_ORIENTATION[orientation]
        array = np.ascontiguousarray(upright(array))
        metadata.setdefault("warnings", []).append(
            f"EXIF orientation {orientation} applied: the picture is read upright as viewers show it (its stored "
            f"pixels {turn})")
    metadata.update({"header": info, "pillow_mode": mode})
    return array, Geometry.identity(2), metadata, is_rgb


def picture_mode(path: str | os.PathLike) -> str | None:
    """Pillow's mode of the picture file ``path`` ("RGB", "RGBA", "CMYK", ...) from its header; None for
    a file that is no picture Pillow opens."""
    if file_format(path) != "pillow":
        return None
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        return None


def cmyk_as_rgb(inks: np.ndarray) -> np.ndarray:
    """(y, x, 4) uint8 C, M, Y, K as Pillow decodes a CMYK picture (napari's own reader keeps them)
    -> (y, x, 3) uint8 RGB by Pillow's conversion: the colours read_image reads from that picture."""
    height, width = inks.shape[:2]
    return np.asarray(Image.frombytes("CMYK", (width, height), np.ascontiguousarray(inks).tobytes()).convert("RGB"))


def _pillow_pixels(image: Image.Image, metadata: dict[str, Any]) -> np.ndarray:
    """The pixels of a decoded Pillow image: grey as it is stored, anything else as 8-bit RGB."""
    if image.has_transparency_data:
        note_dropped_alpha(np.asarray(image.convert("RGBA").getchannel("A")), metadata)
    if image.mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    if image.mode not in ("L", "I", "F") and not image.mode.startswith("I;16"):
        return np.asarray(image.convert("RGB"))  # palette, RGBA, CMYK, YCbCr: colour as RGB
    return np.asarray(image)


def _png_16bit_colour_type(path: Path) -> int | None:
    """The colour type (IHDR) of a 16-bit PNG with colour or alpha, which Pillow would cut to 8 bits;
    None for anything else (a grey 16-bit PNG, which Pillow reads whole, an 8-bit PNG, a JPEG)."""
    with open(path, "rb") as stream:
        head = stream.read(_PNG_IHDR_END)
    if len(head) < _PNG_IHDR_END or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = head[_PNG_BIT_DEPTH_OFFSET], head[_PNG_BIT_DEPTH_OFFSET + 1]
    return colour_type if bit_depth == 16 and colour_type != _PNG_GREY else None


_READERS = {"nifti": _read_nifti, "itk": _read_itk, "dicom": _read_dicom, "pillow": _read_pillow}
