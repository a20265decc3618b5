"""The outcome of one fusion: images on the reference grid, the field, the degradation estimate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unifuse.engine.alignment_guard import GuardDecision
from napari_unifuse.engine.class_evidence import ClassEvidence
from napari_unifuse.engine.fusion_balance import BalanceRecord
from napari_unifuse.engine.overlays import grey_values
from napari_unifuse.engine.quality import QualityMaps, is_one_image
from napari_unifuse.io import ImageVolume, IntensityMapping

# What a method that estimates no degradation (fusion only, classical pipelines) reports.
UNKNOWN_CLASS = "unknown"


@dataclass
class FusionResult:
    """Everything ``run_fusion`` produced, all on the reference's grid and geometry.

    ``fused``: the fused image (float32 in [0, 1]; RGB when an input was RGB).
    ``aligned``: the restored moving image warped onto the reference. Grey: in the moving image's own
    intensity units (an integer pixel type kept, floats as float32). RGB: float32 in [0, 1], as the
    package holds colour (``io.resample_to_reference``), whatever the input's pixel type (a PNG
    output is 8-bit again).
    ``displacement``: ``u`` of shape ``(ndim, *spatial)`` in reference voxels; sampling the
    (resampled) moving image at ``x + u(x)`` aligns it to the reference.
    ``class_probs``: degradation class name → probability for the whole input; empty for a method
    that estimates no degradation (``predicted_class`` is then ``UNKNOWN_CLASS``).
    ``slice_class_probs``: ``(S, Ñ)``, one row per slice along z (3D) or a single row (2D), columns
    in the order of ``class_names``.
    ``output_extension``: ``"png"`` for a raster-image reference, ``"mha"`` for a colour result on
    another grid (NIfTI holds no colour), else ``"nii.gz"``.
    ``alignment_guard``: which displacement estimate ``displacement`` is (identity, the structural
    matching's or the network's) and the similarity scores and noise it was chosen on.
    ``quality``: where not to trust the result (``engine.quality``); None when not computed.
    ``class_evidence``: the checkpoint's calibration behind the named class, a degradation or
    "none" (``engine.class_evidence``); None when it has none for that call.
    ``fusion_balance``: what the checkpoint's cap on the reference's share of the blend did
    (``engine.fusion_balance``); None when the checkpoint calibrated none or the method does not blend.
    ``moving_itk_placement``: where ITK places the moving input relative to the package
    (``io.fields.itk_placement``: the identity unless it is a NIfTI without orientation), for the
    field to be written in ITK's terms; None for a result that did not record it (the field is then
    written for a moving image that ITK places as it places the reference).
    """

    fused: ImageVolume
    aligned: ImageVolume
    displacement: np.ndarray
    class_names: tuple[str, ...]
    class_probs: dict[str, float]
    slice_class_probs: np.ndarray
    output_extension: str
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    alignment_guard: GuardDecision | None = None
    quality: QualityMaps | None = None
    class_evidence: ClassEvidence | None = None
    fusion_balance: BalanceRecord | None = None
    moving_itk_placement: np.ndarray | None = None

    def in_model_units(self, role: str, image: ImageVolume) -> np.ndarray:
        """``image`` (the run's ``"reference"``, or its aligned output as ``"moving"``) as the grey
        values the model fused, float32 in [0, 1]: its luma (RGB) or values through the intensity
        mapping the run recorded for that input. ``fused`` is already in these units; fusion metrics
        compare it with its sources in them, not in each image's display window."""
        mapping = IntensityMapping.from_dict(self.provenance["intensity_mappings"][role])
        return np.asarray(mapping.apply(grey_values(image)), dtype=np.float32)

    @property
    def predicted_class(self) -> str:
        """The most probable degradation class for the whole input, or ``UNKNOWN_CLASS``."""
        return max(self.class_probs, key=self.class_probs.get) if self.class_probs else UNKNOWN_CLASS

    @property
    def class_caveat(self) -> str | None:
        """A short line for the degradation plot when the named class is not evidence of the
        artefact, or for "none" of a clean image (``ClassEvidence.informative``), else None."""
        evidence = self.class_evidence
        return None if evidence is None or evidence.informative else evidence.caveat

    def degradation_report(self) -> dict[str, Any]:
        """The JSON-ready degradation estimate: global and per-slice probabilities with names. The
        per-slice axis is "z", array axis 0 (quality.json's ``slice_axis`` 0), where the outputs
        have slices, and None for one image, a one-slice volume too, as quality.json has it."""
        return {
            "classes": list(self.class_names),
            "global": {name: float(p) for name, p in self.class_probs.items()},
            "predicted": self.predicted_class,
            "evidence": self.class_evidence.to_dict() if self.class_evidence is not None else None,
            "per_slice": {
                "axis": None if is_one_image(self.fused.spatial_shape) else "z",
                "probabilities": np.asarray(self.slice_class_probs, dtype=float).round(6).tolist(),
            },
        }
