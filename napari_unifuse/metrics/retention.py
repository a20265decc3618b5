"""How much of one source's bright structure survives in a fused image (CT bone in CT–MRI fusion).

A fusion that drops the CT (a copy of the MRI, or a rule that lets the MRI's dark bone win) shows
bone as dark; a fusion that keeps it shows it bright. ``bone_retention`` is the mean fused
intensity over the voxels where the clean, aligned CT is bone.
"""

from __future__ import annotations

from napari_unifuse.errors import InputError
from napari_unifuse.metrics._inputs import UNIT_SCALE_TOLERANCE, check_images

# On the [0, 1] intensities of io's CT window [-1000, 2000] HU, 0.8 is 1400 HU: cortical bone
# (Harvard's 8-bit CT slices put the skull at the same top of their range).
BONE_THRESHOLD = 0.8


def bone_retention(fused: object, ct: object, threshold: float = BONE_THRESHOLD) -> float:
    """Mean of ``fused`` where ``ct`` > ``threshold``; both on [0, 1], 2D or 3D, same shape.

    NaN when no voxel of ``ct`` exceeds the threshold (nothing to retain). Higher is better: a copy
    of the CT scores the CT's own bone brightness, a copy of the MRI (dark bone) scores low.
    """
    fused_values, ct_values = check_images(("fused", "ct"), fused, ct)
    for name, values in (("fused", fused_values), ("ct", ct_values)):
        if values.min() < 0.0 or values.max() > 1.0 + UNIT_SCALE_TOLERANCE:
            raise InputError(f"expected intensities in [0, 1], got [{values.min():g}, {values.max():g}] "
                             "(normalise first)", name)
    bone = ct_values > threshold
    return float(fused_values[bone].mean()) if bone.any() else float("nan")
