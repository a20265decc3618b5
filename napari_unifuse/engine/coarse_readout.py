"""A second degradation read-out on a coarser copy of the moving image, for artefacts larger than
what the head reads.

Why. UniFuse's degradation head reads fine-scale statistics (bands of 0.5-1.5 voxels) in windows of
its training crop (32³ for ``unifuse-3d-phantom``). Motion ghosts are copies of the whole field of
view: at 1 mm a window spans 32 mm and its finest bands hold mostly anatomy. On the bundled 1 mm
T1 + motion-T2 sample the head, reading the image as given, says motion 0.43 with no brain slice at
p >= 0.6; on a 2.8 mm copy (the coarsest voxels of the phantoms it was trained on) motion 0.72, 124
of 162 slices. The same copy averages away what is finer: low-dose noise (PET 0.58 -> 0.45) and metal
streaks (CT 0.87 -> 0.20) (``bench/coarse_readout.py``, bench/results/coarse_readout.md). So the
coarse reading only ever raises the classes the checkpoint's sidecar lists: each takes the larger of
its two probabilities, and the other classes share what is left in their native proportions.

The sidecar section (written by ``bench/coarse_readout.py --write``)::

    "coarse_readout": {"spacing_mm": 2.8, "classes": ["motion"], "command": "..."}

A moving image whose voxels are all within ``COARSER_BY`` of that spacing is read once, as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METADATA_KEY = "coarse_readout"
# The coarse copy is made only where it is at least this much coarser than the finest axis.
COARSER_BY = 1.25


@dataclass(frozen=True)
class CoarseReadout:
    spacing_mm: float
    classes: tuple[str, ...]

    def applies_to(self, spacing: Sequence[float]) -> bool:
        """Whether a moving image of voxel ``spacing`` (mm per axis) gets a coarse reading."""
        return min(spacing) * COARSER_BY <= self.spacing_mm

    def combine(self, native: np.ndarray, coarse: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """(..., Ñ) probabilities: the listed classes take max(native, coarse); the others scale so
        that each row still sums to 1, keeping their native ratios."""
        listed = np.array([name in self.classes for name in class_names])
        combined = native.astype(np.float64).copy()
        combined[..., listed] = np.maximum(native[..., listed], coarse[..., listed])
        rest = native[..., ~listed].sum(axis=-1, keepdims=True)
        left = np.clip(1.0 - combined[..., listed].sum(axis=-1, keepdims=True), 0.0, None)
        combined[..., ~listed] = native[..., ~listed] * left / np.maximum(rest, 1e-12)
        return (combined / combined.sum(axis=-1, keepdims=True)).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return {"spacing_mm": self.spacing_mm, "classes": list(self.classes)}


def coarse_readout(metadata: Mapping[str, object], class_names: Sequence[str]) -> CoarseReadout | None:
    """The sidecar's ``coarse_readout`` section, checked; None when there is none. Raises ValueError
    on a malformed one."""
    section = metadata.get(METADATA_KEY)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ValueError(f"{METADATA_KEY} must be a mapping, got {type(section).__name__}")
    spacing, classes = section.get("spacing_mm"), section.get("classes")
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not math.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"{METADATA_KEY}.spacing_mm must be a positive number, got {spacing!r}")
    if (not isinstance(classes, list) or not classes
            or any(name not in class_names or name == "none" for name in classes)):
        degradations = [name for name in class_names if name != "none"]
        raise ValueError(f"{METADATA_KEY}.classes must list degradation classes among {degradations}, got {classes!r}")
    return CoarseReadout(float(spacing), tuple(classes))
