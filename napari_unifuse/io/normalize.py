"""normalize_intensity: map an image to float32 [0, 1] with a recorded, invertible linear map.

Defaults per modality:
* CT: fixed window [-1000, 2000] HU. It spans air (-1000) through soft tissue (~0-80) to dense
  cortical bone (~+1500-2000), so bone, the structure CT contributes to an MR/CT fusion, keeps its
  contrast; a brain window ([0, 80]) would saturate all bone. Metal (> 2000) saturates at 1.
* MR: percentiles 0.5-99.5 (MR intensities have no physical unit; clip the tails).
* PET/SPECT: percentiles 0-99.9 (zero is meaningful: no uptake; clip only the hottest voxels).
* 8-bit pictures (PNG/JPG, or 8-bit pixels handed in without a file), whatever the modality:
  subtract the darkest value and divide by 255. They were windowed when exported, so their contrast
  is kept; the darkest value is the background, and an export with a grey surround must still reach
  the model with the black background every training image had (given a PET/SPECT background of
  0.30, the bundled 2D checkpoint "restored" it to 0.18 / 0.14 on average:
  ``bench/probe_restoration_remap.py``).
* 8-bit volumes from a scanner format (NIfTI, MetaImage, DICOM, NRRD) hold values in their own units,
  often far below 255: they take their modality's rule, given or detected, like any other integer
  type (a quantised MR with values 2-38, divided by 255, reached the model at 0-0.14 and barely took
  part in the fusion). CT is the exception: 8 bits cannot hold Hounsfield units (air is -1000), so
  an 8-bit CT is a picture windowed when exported and takes the picture rule.

MR and PET/SPECT images of a small object in a large empty field (the darkest value fills all but a
few voxels) take the upper percentile over the voxels above that background: over the whole image it
falls on the background or on the object's brightest voxels and saturates the object.

"auto" reads the modality from the image's metadata, else takes CT where the intensities show
CT's signature in Hounsfield units (``_HounsfieldEvidence``), else MR. A threshold alone is fooled
by images in other units that go negative (PET with filtered back-projection undershoot, real-valued
MR); where the values below -500 lack CT's air peak the image is read as MR, and where only part of
the signature is there the mapping's ``warning`` says so and asks for the modality.

Non-finite voxels (NaN, ±inf), which a file's reader has already replaced but an array handed in
directly may hold, take no part in choosing the mapping: the percentiles and the CT evidence are
taken over the finite values, and an image with none is refused. ``apply`` leaves NaN voxels NaN
and takes ±inf to 1 / 0.

``apply`` clips to [0, 1]; ``scaled`` is the same map without the clip (saturating at float32's range,
as does ``inverse``: a float64 image may hold values past it, which would otherwise become ±inf), so that what the clip
removed (``scaled - apply``, zero inside the window) can be carried past the model and added back
before ``inverse``: the engine does so, and a moving image comes back in its own units, hottest
PET voxels and metal above the CT window included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from napari_unifuse.errors import InputError
from napari_unifuse.io.image import ImageVolume

CT_WINDOW_HU = (-1000.0, 2000.0)
CT_AIR_HU = -1000.0
PERCENTILES = {"mr": (0.5, 99.5), "pet": (0.0, 99.9), "spect": (0.0, 99.9)}
MODALITY_ALIASES = {"mri": "mr", "t1": "mr", "t2": "mr", "pd": "mr", "flair": "mr", "pt": "pet", "nm": "spect"}
MODALITIES = ("auto", "ct", *PERCENTILES, *MODALITY_ALIASES)
# Metadata key: the image was handed in without a file (a napari layer made or edited in memory),
# its ``source`` only a name for messages; an 8-bit one is a picture, as one with no source is.
WITHOUT_FILE = "without_file"
# CT's signature in Hounsfield units. Air is a narrow peak at -1000 HU (noise a few tens of HU) and
# scanners fill what lies outside the reconstructed field with one of a few fixed values; negative
# values in other units (noise about zero) spread smoothly instead: at most ~17 % of the values below
# -500 fall in the air band, whatever the noise's width. Soft tissue (fat to blood) fills much of
# the rest of a CT, and almost every value lies in the scanners' HU range (metal above it is rare).
_HU_BELOW_TISSUE = -500.0  # air, lung or padding in a CT; the share below it is what prompts a look
_HU_AIR = (-1100.0, -900.0)
_HU_PADDING = (-1024.0, -2000.0, -2048.0, -3024.0)
_HU_SOFT_TISSUE = (-150.0, 150.0)
_HU_RANGE = (-1100.0, 4000.0)
_MIN_SHARE_BELOW_TISSUE = 0.01  # fewer values this low: nothing here hints at CT
_MIN_AIR_SHARE_OF_LOW = 0.4
_MIN_SOFT_TISSUE_SHARE_OF_REST = 0.2
_MIN_SHARE_IN_HU_RANGE = 0.98
# The whole image's upper percentile stands for the object's only while the clipped tail, (100 - p) %
# of the image, is a small part of the object; past this part of it, the object's own is taken.
_MAX_TAIL_SHARE_OF_OBJECT = 0.1
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class IntensityMapping:
    """``out = clip((x - lower) / (upper - lower), 0, 1)``; everything needed to undo it."""

    method: str  # "window" | "percentile" | "scale8bit"
    modality: str
    lower: float
    upper: float
    percentiles: tuple[float, float] | None = None
    reason: str = ""
    warning: str = ""  # set where the choice is a guess the user should confirm

    def scaled(self, array: np.ndarray) -> np.ndarray:
        """The linear map alone, unclipped: values outside the window land outside [0, 1]."""
        return _saturated_float32((np.asarray(array, dtype=np.float64) - self.lower) / (self.upper - self.lower))

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.clip(self.scaled(array), 0.0, 1.0)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Back to the original intensity units: exact for ``scaled`` values; values clipped by
        ``apply`` come back at the window's bounds."""
        return _saturated_float32(self.lower + np.asarray(array, dtype=np.float64) * (self.upper - self.lower))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["percentiles"] = list(self.percentiles) if self.percentiles else None
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IntensityMapping:
        percentiles = values.get("percentiles")
        return cls(
            method=values["method"],
            modality=values["modality"],
            lower=float(values["lower"]),
            upper=float(values["upper"]),
            percentiles=tuple(percentiles) if percentiles else None,
            reason=values.get("reason", ""),
            warning=values.get("warning", ""),
        )


def _saturated_float32(values: np.ndarray) -> np.ndarray:
    """Fresh float64 ``values`` as float32, held at float32's largest magnitude (a plain cast gives ±inf)."""
    return np.clip(values, -FLOAT32_MAX, FLOAT32_MAX, out=values).astype(np.float32)


def normalize_intensity(volume: ImageVolume, modality: str = "auto") -> tuple[ImageVolume, IntensityMapping]:
    """Return the volume mapped to float32 [0, 1] and the mapping (also stored in its metadata)."""
    mapping = intensity_mapping(volume, modality)
    normalized = replace(
        volume,
        array=mapping.apply(volume.array),
        metadata={**volume.metadata, "intensity_mapping": mapping.to_dict()},
    )
    return normalized, mapping


def intensity_mapping(volume: ImageVolume, modality: str = "auto") -> IntensityMapping:
    """Choose the mapping for ``volume`` (see the module docstring for the defaults)."""
    key = modality.lower()
    if key not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}", volume.source)
    eight_bit = volume.array.dtype == np.uint8
    if eight_bit and _is_picture(volume):
        return darkest_to_zero(volume.array, 255.0, "scale8bit", MODALITY_ALIASES.get(key, key),
                               "8-bit pixels, already windowed when exported")
    values = _finite_values(volume)
    warning = ""
    if key == "auto":
        key, reason, warning = _detect_modality(volume.metadata, values)
    else:
        key, reason = MODALITY_ALIASES.get(key, key), "chosen by the caller"
    if key == "ct" and eight_bit:
        return darkest_to_zero(volume.array, 255.0, "scale8bit", key, f"{reason}; 8-bit pixels cannot hold "
                               "Hounsfield units (air is -1000 HU): a CT picture, already windowed when exported")
    if key == "ct":
        return IntensityMapping("window", "ct", *CT_WINDOW_HU, reason=reason, warning=warning)
    percentiles = PERCENTILES[key]
    lower, upper, window_note = _percentile_window(values, percentiles)
    return IntensityMapping("percentile", key, lower, upper, percentiles, reason + window_note, warning)


def _is_picture(volume: ImageVolume) -> bool:
    """Whether ``volume`` is a picture exported for display: read from a PNG or JPG, or handed in without
    a file (the evaluation's atlas pictures, an edited layer), not a scanner format's stored values."""
    from napari_unifuse.io.readers import is_picture  # readers imports this module for CT's air

    return volume.source is None or bool(volume.metadata.get(WITHOUT_FILE)) or is_picture(volume)


def _finite_values(volume: ImageVolume) -> np.ndarray:
    """The image's values the mapping is chosen from: all of them, or the finite ones (flattened)
    where some are NaN or infinite; InputError where none is finite."""
    if not np.issubdtype(volume.array.dtype, np.inexact):
        return volume.array  # integers (most CT and MR) hold no NaN: no full-size mask to build
    finite = np.isfinite(volume.array)
    if finite.all():
        return volume.array
    if not finite.any():
        raise InputError("every voxel is NaN or infinite: there is no intensity to normalise; "
                         "give an image with measured values", volume.source)
    return volume.array[finite]


def _percentile_window(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float, str]:
    """The window between ``percentiles`` of ``array``, and a note on how it was found where that
    is not over the whole image (a small object on an empty field, tied percentiles)."""
    lower, upper = (float(v) for v in np.percentile(array, percentiles))
    darkest = array.min()
    object_share = np.count_nonzero(array > darkest) / array.size
    tail_share = (100.0 - percentiles[1]) / 100.0
    if 0 < object_share and tail_share > _MAX_TAIL_SHARE_OF_OBJECT * object_share:
        upper = float(np.percentile(array[array > darkest], percentiles[1]))
        return lower, upper, (f"; upper percentile over the {object_share:.2%} of voxels above the background "
                              f"value {float(darkest):g}, which fills the rest")
    if upper > lower:
        return lower, upper, ""
    if object_share > 0:  # most voxels share one value: span the image rather than a zero-width window
        return float(darkest), float(array.max()), "; percentiles tied, full value range used"
    return lower, lower + 1.0, ""  # constant image: map it to 0 instead of dividing by zero

def darkest_to_zero(array: np.ndarray, unit: float, method: str, modality: str, reason: str) -> IntensityMapping:
    """``(x - min) / unit`` for an image already windowed for display (``unit`` = its white):
    its contrast is kept and its darkest value, the background, becomes 0. Never clips."""
    lower = float(np.min(array))
    return IntensityMapping(method, modality, lower, lower + unit,
                            reason=f"{reason}; darkest value {lower:g} taken to 0, scale kept")


@dataclass(frozen=True)
class _HounsfieldEvidence:
    """How far an image's values show CT's signature in HU (shares of its voxels; see the constants)."""

    below_tissue: float  # share below -500 HU
    air_of_low: float  # share of those at air or padding values
    soft_tissue_of_rest: float  # share of the voxels that are not air or padding
    in_range: float

    @classmethod
    def of(cls, array: np.ndarray) -> _HounsfieldEvidence:
        air = np.isin(array, _HU_PADDING) | ((array >= _HU_AIR[0]) & (array <= _HU_AIR[1]))
        air_count = np.count_nonzero(air)
        low_count = np.count_nonzero(array < _HU_BELOW_TISSUE)
        rest_count = array.size - air_count
        soft_tissue = np.count_nonzero((array >= _HU_SOFT_TISSUE[0]) & (array <= _HU_SOFT_TISSUE[1]))
        in_range = np.count_nonzero(air | ((array >= _HU_RANGE[0]) & (array <= _HU_RANGE[1])))
        return cls(low_count / array.size, air_count / low_count if low_count else 0.0,
                   soft_tissue / rest_count if rest_count else 0.0, in_range / array.size)

    @property
    def prompts_a_look(self) -> bool:
        return self.below_tissue >= _MIN_SHARE_BELOW_TISSUE

    @property
    def has_air(self) -> bool:
        """Values below soft tissue gathered at air and padding, all in the HU range: CT's own units."""
        return self.air_of_low >= _MIN_AIR_SHARE_OF_LOW and self.in_range >= _MIN_SHARE_IN_HU_RANGE

    @property
    def has_soft_tissue(self) -> bool:
        return self.soft_tissue_of_rest >= _MIN_SOFT_TISSUE_SHARE_OF_REST

    def describe(self) -> str:
        return (f"{self.below_tissue:.0%} of the values below {_HU_BELOW_TISSUE:g}, {self.air_of_low:.0%} of those "
                f"at air ({_HU_AIR[0]:g} to {_HU_AIR[1]:g} HU) or scanner padding; {self.soft_tissue_of_rest:.0%} "
                f"of the rest soft tissue ({_HU_SOFT_TISSUE[0]:g} to {_HU_SOFT_TISSUE[1]:g} HU); "
                f"{self.in_range:.1%} within the HU range")


def shows_ct_air(values: np.ndarray) -> bool:
    """Whether ``values`` gather below soft tissue at CT's air or scanner padding, all in the HU range:
    an image in Hounsfield units, whose background is air (-1000 HU), not 0 (water)."""
    return _HounsfieldEvidence.of(values).has_air


def _detect_modality(metadata: dict[str, Any], values: np.ndarray) -> tuple[str, str, str]:
    """(modality, reason, warning) of an image with ``metadata`` and finite ``values``: the warning
    is empty unless the evidence is ambiguous."""
    tagged = str(metadata.get("modality", "")).lower()
    tagged = MODALITY_ALIASES.get(tagged, tagged)
    if tagged == "ct" or tagged in PERCENTILES:
        return tagged, "modality recorded in the image metadata", ""
    evidence = _HounsfieldEvidence.of(values)
    if not evidence.prompts_a_look:
        return "mr", "no modality in the header and no HU air: MR percentile clipping", ""
    if evidence.has_air and evidence.has_soft_tissue:
        return "ct", f"CT's signature in HU: {evidence.describe()}", ""
    if evidence.has_air:
        return ("ct", f"CT air but little soft tissue: {evidence.describe()}",
                "read as CT for its air at -1000 HU, but little of the rest is soft tissue; "
                "give the modality if it is not CT")
    return ("mr", f"values below {_HU_BELOW_TISSUE:g} without CT's air peak: {evidence.describe()}; "
                  "MR percentile clipping",
            f"{evidence.below_tissue:.0%} of the values lie below {_HU_BELOW_TISSUE:g} but not at CT's air "
            "(-1000 HU) or padding, as PET undershoot or real-valued MR do: read as MR; "
            "give the modality if it is CT or PET")
