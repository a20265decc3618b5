"""normalize_intensity: map an image to float32 [0, 1] with a recorded, invertible linear map.

Defaults per modality:
* CT: fixed window [-1000, 2000] HU. It spans air (-1000) through soft tissue (~0-80) to dense
  cortical bone (~+1500-2000), so bone, the structure CT contributes to an MR/CT fusion, keeps its
  contrast; a brain window ([0, 80]) would saturate all bone. Metal (> 2000) saturates at 1.
* MR: percentiles 0.5-99.5 (MR intensities have no physical unit; clip the tails).
* PET/SPECT: percentiles 0-99.9 (zero is meaningful: no uptake; clip only the hottest voxels).
* 8-bit images (PNG/JPG): subtract the darkest value and divide by 255. They were windowed when
  exported, so their contrast is kept; the darkest value is the background, and an export with a
  grey surround must still reach the model with the black background every training image had
  (given a PET/SPECT background of 0.30, the bundled 2D checkpoint "restored" it to 0.18 / 0.14
  on average: ``bench/probe_restoration_remap.py``).

``apply`` clips to [0, 1]; ``scaled`` is the same map without the clip, so that what the clip
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
PERCENTILES = {"mr": (0.5, 99.5), "pet": (0.0, 99.9), "spect": (0.0, 99.9)}
MODALITY_ALIASES = {"mri": "mr", "t1": "mr", "t2": "mr", "pd": "mr", "flair": "mr", "pt": "pet", "nm": "spect"}
MODALITIES = ("auto", "ct", *PERCENTILES, *MODALITY_ALIASES)
# CT stores air as about -1000 HU; no MR or PET image has intensities this low.
_HU_AIR_THRESHOLD = -500.0


@dataclass(frozen=True)
class IntensityMapping:
    """``out = clip((x - lower) / (upper - lower), 0, 1)``; everything needed to undo it."""

    method: str  # "window" | "percentile" | "scale8bit"
    modality: str
    lower: float
    upper: float
    percentiles: tuple[float, float] | None = None
    reason: str = ""

    def scaled(self, array: np.ndarray) -> np.ndarray:
        """The linear map alone, unclipped: values outside the window land outside [0, 1]."""
        return ((np.asarray(array, dtype=np.float64) - self.lower) / (self.upper - self.lower)).astype(np.float32)

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.clip(self.scaled(array), 0.0, 1.0)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Back to the original intensity units: exact for ``scaled`` values; values clipped by
        ``apply`` come back at the window's bounds."""
        return (self.lower + np.asarray(array, dtype=np.float64) * (self.upper - self.lower)).astype(np.float32)

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
        )


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
    array = volume.array
    if array.dtype == np.uint8:
        return darkest_to_zero(array, 255.0, "scale8bit", MODALITY_ALIASES.get(key, key),
                               "8-bit pixels, already windowed when exported")
    if key == "auto":
        key, reason = _detect_modality(volume)
    else:
        key, reason = MODALITY_ALIASES.get(key, key), "chosen by the caller"
    if key == "ct":
        return IntensityMapping("window", "ct", *CT_WINDOW_HU, reason=reason)
    percentiles = PERCENTILES[key]
    lower, upper = (float(v) for v in np.percentile(array, percentiles))
    if upper <= lower:
        upper = lower + 1.0  # constant image: map it to 0 instead of dividing by zero
    return IntensityMapping("percentile", key, lower, upper, percentiles, reason)


def darkest_to_zero(array: np.ndarray, unit: float, method: str, modality: str, reason: str) -> IntensityMapping:
    """``(x - min) / unit`` for an image already windowed for display (``unit`` = its white):
    its contrast is kept and its darkest value, the background, becomes 0. Never clips."""
    lower = float(np.min(array))
    return IntensityMapping(method, modality, lower, lower + unit,
                            reason=f"{reason}; darkest value {lower:g} taken to 0, scale kept")


def _detect_modality(volume: ImageVolume) -> tuple[str, str]:
    tagged = str(volume.metadata.get("modality", "")).lower()
    tagged = MODALITY_ALIASES.get(tagged, tagged)
    if tagged == "ct" or tagged in PERCENTILES:
        return tagged, "modality recorded in the image metadata"
    low = float(np.percentile(volume.array, 1))
    if low < _HU_AIR_THRESHOLD:
        return "ct", f"intensities reach CT air (1st percentile {low:g} < {_HU_AIR_THRESHOLD:g} HU)"
    return "mr", "no modality in the header and no HU air: MR percentile clipping"
