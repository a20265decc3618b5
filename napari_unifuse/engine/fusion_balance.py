"""A checkpoint's calibrated cap on how much of its fused image the reference may take (issue 16).

Why. UniFuse fuses by a per-voxel convex blend, ``fused = w · reference + (1 − w) · restored``
(``model.ufrf``). The 2-D checkpoint's w leans toward the MRI on PET and SPECT pairs (mean w about
0.55 where the two sources differ), so on PET under large misalignment the fused luma keeps far
more of the MRI than of the PET (per-source gains 0.47 and 0.08 on the Harvard validation split).
Refitting w, or shifting its logit by one constant for every pair, traded that against CT-MRI,
whose blend already leans toward the CT: co-registered CT-MRI lost its MRI, and a constructed MRI/CT
pair came out as a copy of the CT (``bench/results/fusion_balance.md``).

How. A pair whose mean w exceeds the checkpoint's ``max_mean_weight`` has w's logit lowered by one
shift for the whole pair, the one that brings its mean w down to the cap; a pair at or below the
cap keeps its blend. The network still decides where each source dominates; the cap only bounds
how much of the image the reference takes overall, and only from above, so a blend that already
gives the moving image its share is left alone. Unlike one shift for every pair, the shift is
larger where the network leaned further toward the reference (on the Harvard validation split
every pair was above the cap of 0.3: CT-MRI at a mean w of about 0.4, PET and SPECT about 0.55).
The mean is taken where the choice of w matters: voxels where the two blended images differ by
more than ``DIFFERENT_BY`` (elsewhere any w gives the same voxel).
``bench/probe_fusion_balance.py`` calibrates the cap on the checkpoint's training split (the cap
that maximises the smallest per-source gain over every task and misalignment regime) and
``--write`` stores it in the sidecar::

    "fusion_balance": {"max_mean_weight": 0.3, "calibration": "<the command>"}

A checkpoint without the section fuses as its network does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import optimize

METADATA_KEY = "fusion_balance"
# Where reference and restored differ by less than this (intensities in [0, 1]) w is not counted.
DIFFERENT_BY = 0.02
# w is kept inside (EPSILON, 1 − EPSILON) before taking its logit.
_EPSILON = 1e-4


@dataclass(frozen=True)
class BalanceRecord:
    """What the cap did to one pair (for the provenance)."""

    max_mean_weight: float
    mean_weight: float  # before, over the voxels where the sources differ
    shift: float  # subtracted from w's logit (0: the blend was kept)
    voxels: int  # voxels the mean was taken over

    @property
    def applied(self) -> bool:
        return self.shift > 0.0

    @property
    def message(self) -> str:
        """One line for people: how much of the fused image the reference takes, and why."""
        if self.applied:
            return (f"fusion balance: the reference's mean share of the fused image capped at "
                    f"{self.max_mean_weight:.2f} (the network gave it {self.mean_weight:.2f})")
        return (f"fusion balance: the network's blend kept (the reference's mean share "
                f"{self.mean_weight:.2f}, cap {self.max_mean_weight:.2f})")

    def to_dict(self) -> dict[str, object]:
        return {"max_mean_weight": self.max_mean_weight, "mean_weight": self.mean_weight,
                "logit_shift": self.shift, "voxels": self.voxels, "applied": self.applied, "message": self.message,
                "rule": f"w's logit lowered by one shift per pair where its mean over voxels whose sources "
                        f"differ by > {DIFFERENT_BY:g} exceeds max_mean_weight (engine.fusion_balance)"}


@dataclass(frozen=True)
class FusionBalance:
    max_mean_weight: float

    def apply(self, reference: np.ndarray, restored: np.ndarray,
              weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, BalanceRecord]:
        """(fused, weight, record): the pair's blend with w capped. ``reference``, ``restored`` and
        ``weight`` (w) are arrays of one shape, the images in [0, 1]."""
        weight = np.clip(weight.astype(np.float64), _EPSILON, 1.0 - _EPSILON)
        counted = np.abs(reference - restored) > DIFFERENT_BY
        mean = float(weight[counted].mean()) if counted.any() else float("nan")
        shift = 0.0
        if counted.any() and mean > self.max_mean_weight:
            logits = np.log(weight) - np.log1p(-weight)
            counted_logits = logits[counted]

            def excess(value: float) -> float:
                return float(_sigmoid(counted_logits - value).mean()) - self.max_mean_weight

            # The mean falls monotonically with the shift; at the upper bound every w is below the cap.
            upper = float(counted_logits.max()) - _logit(self.max_mean_weight) + 1.0
            shift = float(optimize.brentq(excess, 0.0, upper, xtol=1e-6))
            weight = _sigmoid(logits - shift)
        fused = weight * reference + (1.0 - weight) * restored
        record = BalanceRecord(self.max_mean_weight, mean, shift, int(counted.sum()))
        return fused.astype(np.float32), weight.astype(np.float32), record


def fusion_balance(metadata: Mapping[str, object]) -> FusionBalance | None:
    """The sidecar's ``fusion_balance`` section, checked; None when there is none. Raises
    ValueError on a malformed one."""
    section = metadata.get(METADATA_KEY)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ValueError(f"{METADATA_KEY} must be a mapping, got {type(section).__name__}")
    cap = section.get("max_mean_weight")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or not 0 < cap < 1:
        raise ValueError(f"{METADATA_KEY}.max_mean_weight must be a number between 0 and 1, got {cap!r}")
    return FusionBalance(float(cap))


def _logit(value: float) -> float:
    return math.log(value) - math.log1p(-value)


def _sigmoid(value: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-value))
