"""Where not to trust the fusion: fidelity and alignment-uncertainty maps, summarised per slice.

Each map is a voxel array on the reference grid with a flag threshold (``docs/quality_maps.md``
gives the definitions, units and why each threshold sits where it does):

* ``invented``: structure in the fused image that neither aligned source has;
* ``lost``: a source's structure missing from the fused image;
* ``restoration_change``: how much the restoration altered the aligned moving image;
* ``uncertainty_mm``: the spread of the displacement under small perturbations of the input
  (``engine.uncertainty``), in mm; optional.

Beside the maps, where the moving image covers only part of the reference grid, ``outside_moving``
gives each slice's fraction of voxels the moving image does not reach: there the aligned image holds
only what the alignment moved in, so the maps on those voxels are no evidence of alignment.

A slice's score for a map is the fraction of its voxels above that map's threshold, so it reads as
"how much of this slice is flagged" and is 0 when nothing is. A slice's suspicion is the largest
of its scores; it is *suspicious* when one map's score exceeds ``flag_level`` (a small area, so
that single noisy voxels do not send a reviewer to a slice) **and**, in a volume of at least
``MIN_SLICES_FOR_BASELINE`` slices, stands out from that map's score on the rest of the volume
(above its median over the slices the moving image reaches by ``OUTLIER_SPREADS`` robust standard
deviations). A map that flags a little
of every slice (the bundled phantom's T1 scalp edges, which the fusion keeps at less than half)
then sends a reviewer only to the slices where it flags much more; one that flags most of a typical
slice (over ``WHOLE_VOLUME_LEVEL``, as the uncertainty does on a pure-noise moving volume) leaves no
slice to stand out, and is named as flagging the whole volume (``whole_volume_flags``). 3D maps are scored per slice
along array axis 0 of the grid they are computed on. The engine computes them on the reference in
world axis order (``FusionEngine.run_fusion`` takes every 3-D pair by ``ImageVolume.in_world_axis_order``,
as the workbench shows it), so that axis 0 runs along world z: axial slices, the axis napari scrolls
and the per-slice degradation plot's, however the files store the volume (a coronal or sagittal NIfTI
included). The voxel maps themselves do not depend on the array order (edges are measured in the plane
of finest spacing, ``metrics.fidelity.in_plane_axes``); only which slices they are summarised over does. A 2D image is one slice, and so is a one-slice volume whichever axis
holds the slice (a sagittal slice stored as x = 1 voxel): the engine fuses it as the 2D image it is
(``engine.input_checks.model_dimensions``), and its lines along axis 0 are no slices to review.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unifuse.io.image import single_slice_axis_of
from napari_unifuse.metrics.fidelity import DEFINITIONS as FIDELITY_DEFINITIONS
from napari_unifuse.metrics.fidelity import fidelity_maps

INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY = "invented", "lost", "restoration_change", "uncertainty_mm"
# Each map's name wherever it is shown: the workbench's layers and plot, the QC report.
MAP_LABELS: dict[str, str] = {INVENTED: "invented structure", LOST: "lost structure",
                              RESTORATION_CHANGE: "restoration change", UNCERTAINTY: "alignment uncertainty"}
# What a reviewer would call each map's defect; the annotation panel's categories where one fits.
PROBLEM_NAMES: dict[str, str] = {
    INVENTED: "hallucinated structure",
    LOST: "lost structure",
    UNCERTAINTY: "misalignment",
    RESTORATION_CHANGE: "restoration change",
}
# Voxel units of each map, for the JSON summary, the report and the layers' names.
MAP_UNITS: dict[str, str] = {
    INVENTED: "edge height, fraction of the fused image's [0, 1] window",
    LOST: "edge height, fraction of the source's [0, 1] window",
    RESTORATION_CHANGE: "fraction of the moving image's [0, 1] window",
    UNCERTAINTY: "mm",
}
# A slice is suspicious when more than this fraction of it is flagged by one map: 0.1 % is about
# a 4 × 4 voxel patch of a 128 × 128 slice, the smallest defect a reviewer would go and look at.
DEFAULT_FLAG_LEVEL = 1e-3
# A volume's typical score per map is its median over slices; a slice stands out above it by this
# many robust standard deviations (1.4826 × the median absolute deviation), the usual outlier rule.
OUTLIER_SPREADS = 3.0
# With fewer slices than this a median says little about "typical": the flag level alone decides.
MIN_SLICES_FOR_BASELINE = 8
# A map that flags more than this share of a volume's typical slice flags the volume as a whole: no
# slice can stand out from a volume affected throughout, so the per-slice rule would flag none. Most
# of the voxels: the bundled 3D samples' typical slices (test size) sit at 14 % at most (the
# uncertainty, CT-PET), a pure-noise or blank moving volume's at 99-100 % (docs/quality_maps.md).
WHOLE_VOLUME_LEVEL = 0.5
WHOLE_VOLUME_DEFINITION = ("maps whose typical slice score (median over the slices the moving image reaches) "
                           "exceeds level: they flag most of every slice, so no slice stands out and the per-slice "
                           "verdict flags none; the volume as a whole is not to be trusted for that map's problem")
OUTSIDE_MOVING_DEFINITION = ("fraction of each slice's voxels the moving image does not reach (outside its field of "
                             "view): the aligned image there holds only what the alignment moved in; slices lists "
                             "those more than half outside, which are no evidence of alignment")


@dataclass
class QualityMaps:
    """The quality maps of one run, their thresholds and per-slice summaries.

    ``invented``, ``lost``, ``restoration_change``: float32 maps of the reference's spatial shape
    (units in ``MAP_UNITS``); ``uncertainty_mm`` likewise, or None when it was not computed.
    ``thresholds``: map name → the value above which a voxel is flagged.
    ``slice_scores``: map name → (S,) fraction of each slice's voxels above the threshold
    (S = number of slices along array axis 0 in 3D, 1 in 2D and for a one-slice volume,
    ``is_one_image``); ``suspicion``: (S,) the largest of those per slice.
    ``flag_level``: the score a map must exceed on a slice to list it as suspicious; in a volume
    the map must also stand out from its typical slice (``cutoffs`` gives both as one number per map).
    ``definitions``: map name → a one-line definition, recorded in provenance and the report.
    ``seconds``: wall time per part (maps, uncertainty), for provenance and the overhead bench.
    ``outside_moving``: (S,) fraction of each slice's voxels outside the moving image's field of
    view, or None when it reaches every voxel.
    """

    invented: np.ndarray
    lost: np.ndarray
    restoration_change: np.ndarray
    uncertainty_mm: np.ndarray | None
    thresholds: dict[str, float]
    slice_scores: dict[str, np.ndarray]
    suspicion: np.ndarray
    flag_level: float = DEFAULT_FLAG_LEVEL
    definitions: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outside_moving: np.ndarray | None = None

    @classmethod
    def from_maps(
        cls,
        maps: Mapping[str, np.ndarray | None],
        thresholds: Mapping[str, float],
        *,
        flag_level: float = DEFAULT_FLAG_LEVEL,
        definitions: Mapping[str, str] | None = None,
        seconds: Mapping[str, float] | None = None,
        field_of_view: np.ndarray | None = None,
    ) -> QualityMaps:
        """Score ``maps`` (the three fidelity maps, and ``uncertainty_mm`` or None) per slice, and
        the part of each slice outside ``field_of_view`` (where the moving image has data; None: everywhere)."""
        present = {name: np.asarray(array, dtype=np.float32) for name, array in maps.items() if array is not None}
        missing = [name for name in (INVENTED, LOST, RESTORATION_CHANGE) if name not in present]
        if missing:
            raise ValueError(f"quality maps missing: {', '.join(missing)}")
        shapes = {array.shape for array in present.values()}
        if len(shapes) != 1:
            raise ValueError(f"quality maps differ in shape: {sorted(shapes)}")
        scores = {name: _flagged_fraction_per_slice(array, float(thresholds[name])) for name, array in present.items()}
        outside = None if field_of_view is None else _flagged_fraction_per_slice(~np.asarray(field_of_view, bool), 0.5)
        return cls(
            invented=present[INVENTED],
            lost=present[LOST],
            restoration_change=present[RESTORATION_CHANGE],
            uncertainty_mm=present.get(UNCERTAINTY),
            thresholds={name: float(thresholds[name]) for name in present},
            slice_scores=scores,
            suspicion=np.max(np.stack(list(scores.values())), axis=0),
            flag_level=flag_level,
            definitions=dict(definitions or {}),
            seconds=dict(seconds or {}),
            outside_moving=outside,
        )

    @property
    def slice_count(self) -> int:
        return int(self.suspicion.shape[0])

    @property
    def slice_axis(self) -> int | None:
        """The array axis the slices are taken along (0), as annotations record it: not a world
        direction; None for one image (a 2D image or a one-slice volume)."""
        return None if is_one_image(self.invented.shape) else 0

    def maps(self) -> dict[str, np.ndarray]:
        """Map name → voxel array, the uncertainty only when it was computed."""
        arrays = {INVENTED: self.invented, LOST: self.lost, RESTORATION_CHANGE: self.restoration_change}
        if self.uncertainty_mm is not None:
            arrays[UNCERTAINTY] = self.uncertainty_mm
        return arrays

    def suspicious_slices(self) -> list[int]:
        """Indices of the slices where one map flags more than ``flag_level`` of the slice and (in a
        volume) more than it does on a typical slice of the volume (module docstring); slice order."""
        flagged = np.zeros(self.slice_count, dtype=bool)
        for passes in self._flag_test().values():
            flagged |= passes
        return [int(index) for index in np.flatnonzero(flagged)]

    def flagged_by(self, index: int) -> list[str]:
        """The maps that make slice ``index`` suspicious (each passes the flag test on its own),
        the largest score first; empty for a slice that is not suspicious. A map with a higher raw
        score that is as high on a typical slice (the uncertainty in air) is not among them."""
        passing = [name for name, passes in self._flag_test().items() if passes[index]]
        return sorted(passing, key=lambda name: -float(self.slice_scores[name][index]))

    def slices_flagged_by_map(self) -> dict[str, list[int]]:
        """Map name → the slices that map alone makes suspicious (those above its ``cutoffs`` value)."""
        return {name: [int(index) for index in np.flatnonzero(passes)] for name, passes in self._flag_test().items()}

    def cutoffs(self) -> dict[str, float]:
        """Map name → the score a slice must exceed for that map alone to make it suspicious:
        ``flag_level``, or in a volume the map's typical score plus its outlier margin where that is
        higher (module docstring). The workbench's plot draws them, so that what sits above a line is
        what navigation and the report call suspicious. The typical slice is one the moving image
        reaches: slices it barely reaches have next to nothing to lose or invent, and counted in they
        pulled the typical score down, so that aligned slices beside them were flagged."""
        reached = self.reached_slices()
        return {name: max(self.flag_level, _typical_ceiling(scores[reached]))
                for name, scores in self.slice_scores.items()}

    def reached_slices(self) -> np.ndarray:
        """(S,) whether the moving image reaches at least half of each slice (all, where it reaches
        every voxel): the slices whose maps are evidence about the alignment."""
        if self.outside_moving is None:
            return np.ones(self.slice_count, dtype=bool)
        return self.outside_moving <= 0.5

    def whole_volume_flags(self) -> dict[str, float]:
        """Map name → its typical slice score (median over the slices the moving image reaches), for
        the maps that flag more than ``WHOLE_VOLUME_LEVEL`` of a typical slice of a volume: every
        slice is affected, so none stands out (``cutoffs``) and the volume as a whole is flagged.
        Empty for one image and for fewer reached slices than ``MIN_SLICES_FOR_BASELINE``: there the
        flag level alone decides, and such a map already flags each slice on its own."""
        reached = self.reached_slices()
        if int(reached.sum()) < MIN_SLICES_FOR_BASELINE:
            return {}
        typical = {name: float(np.median(scores[reached])) for name, scores in self.slice_scores.items()}
        return {name: score for name, score in typical.items() if score > WHOLE_VOLUME_LEVEL}

    def _flag_test(self) -> dict[str, np.ndarray]:
        """Map name → (S,) whether the map alone makes each slice suspicious. The uncertainty flags
        only slices the moving image reaches: where it has no data the aligner is blind, and the map
        holds the probe's shift, not a measurement (``slices_outside_moving`` names those slices)."""
        cutoffs = self.cutoffs()
        reached = self.reached_slices()
        return {name: (scores > cutoffs[name]) & (reached if name == UNCERTAINTY else True)
                for name, scores in self.slice_scores.items()}

    def next_suspicious(self, current: int, step: int = 1) -> int | None:
        """The next (``step`` > 0) or previous (``step`` < 0) suspicious slice from ``current``,
        wrapping around the ends; ``current`` itself only when it is the one suspicious slice.
        None when no slice is suspicious."""
        flagged = self.suspicious_slices()
        if not flagged:
            return None
        if step >= 0:
            return next((index for index in flagged if index > current), flagged[0])
        return next((index for index in reversed(flagged) if index < current), flagged[-1])

    def worst_slices(self, count: int) -> list[int]:
        """The ``count`` slices with the highest suspicion, worst first (ties: lower index first),
        flagged or not, so that a report always has key slices to show."""
        order = sorted(range(self.slice_count), key=lambda index: (-float(self.suspicion[index]), index))
        return order[: max(count, 0)]

    def key_slices(self, count: int) -> list[int]:
        """The ``count`` slices a reviewer should see first: the suspicious ones, by the largest
        score of a map that flags them, then the most suspicious others (``worst_slices``' order).
        The plain ranking alone showed slices of air that the uncertainty scores high on every
        slice of a volume, and none of the slices the verdict names."""
        flagged = sorted(self.suspicious_slices(),
                         key=lambda index: (-float(self.slice_scores[self.flagged_by(index)[0]][index]), index))
        others = [index for index in self.worst_slices(self.slice_count) if index not in flagged]
        return (flagged + others)[: max(count, 0)]

    def dominant_problem(self, index: int) -> str:
        """What slice ``index`` is flagged for, in a reviewer's words (``PROBLEM_NAMES``): the problem
        of the map with the largest score among those that flag it (``flagged_by``); for a slice that
        is not suspicious, of the map with the largest score. On ties the order of ``slice_scores``
        decides (invented first)."""
        candidates = self.flagged_by(index) or list(self.slice_scores)
        name = max(candidates, key=lambda key: float(self.slice_scores[key][index]))
        return PROBLEM_NAMES[name]

    def slices_outside_moving(self) -> list[int]:
        """The slices of which the moving image reaches less than half: what the aligned image shows
        there was moved in, and is no evidence of alignment. Empty when it reaches every voxel."""
        if self.outside_moving is None:
            return []
        return [int(index) for index in np.flatnonzero(self.outside_moving > 0.5)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary written as ``quality.json``: no voxel arrays. ``whole_volume`` only where
        a map flags most of a typical slice (``whole_volume_flags``), so ordinary runs' files keep their keys."""
        whole_volume = self.whole_volume_flags()
        summary = {
            name: {
                "units": MAP_UNITS[name],
                "threshold": self.thresholds[name],
                "definition": self.definitions.get(name, ""),
                "max": float(array.max()) if array.size else 0.0,
                "p95": float(np.percentile(array, 95)) if array.size else 0.0,
                "flagged_fraction": float(np.mean(array > self.thresholds[name])) if array.size else 0.0,
            }
            for name, array in self.maps().items()
        }
        return {
            "maps": summary,
            "thresholds": dict(self.thresholds),
            "flag_level": self.flag_level,
            "slice_axis": self.slice_axis,
            "per_slice": {name: np.asarray(scores, dtype=float).round(6).tolist()
                          for name, scores in self.slice_scores.items()},
            "suspicion": np.asarray(self.suspicion, dtype=float).round(6).tolist(),
            "max_suspicion": float(self.suspicion.max()) if self.suspicion.size else 0.0,
            "suspicious_slices": self.suspicious_slices(),
            "problems": {str(index): self.dominant_problem(index) for index in self.suspicious_slices()},
            "flagged_by": {str(index): self.flagged_by(index) for index in self.suspicious_slices()},
            "seconds": dict(self.seconds),
            **({} if not whole_volume else {"whole_volume": {
                "definition": WHOLE_VOLUME_DEFINITION,
                "level": WHOLE_VOLUME_LEVEL,
                "typical_slice_score": {name: round(score, 6) for name, score in whole_volume.items()}}}),
            **({} if self.outside_moving is None else {"outside_moving": {
                "definition": OUTSIDE_MOVING_DEFINITION,
                "per_slice": np.asarray(self.outside_moving, dtype=float).round(6).tolist(),
                "slices": self.slices_outside_moving()}}),
        }


def quality_maps(
    reference: np.ndarray,
    warped_moving: np.ndarray,
    restored: np.ndarray,
    fused: np.ndarray,
    *,
    uncertainty_mm: np.ndarray | None = None,
    uncertainty_threshold_mm: float | None = None,
    uncertainty_definition: str = "",
    seconds: Mapping[str, float] | None = None,
    spacing: Sequence[float] | None = None,
    field_of_view: np.ndarray | None = None,
) -> QualityMaps:
    """The fidelity maps of one fused pair (``metrics.fidelity``; every image in the [0, 1] window
    on the reference grid, of voxel ``spacing``, None for isotropic) and, when given, the
    uncertainty map with its threshold and the moving image's ``field_of_view`` (boolean, where it
    has data on the grid)."""
    fidelity = fidelity_maps(reference, warped_moving, restored, fused, spacing)
    maps = {INVENTED: fidelity.invented, LOST: fidelity.lost, RESTORATION_CHANGE: fidelity.restoration_change,
            UNCERTAINTY: uncertainty_mm}
    thresholds = dict(fidelity.thresholds)
    definitions = dict(FIDELITY_DEFINITIONS)
    if uncertainty_mm is not None:
        if uncertainty_threshold_mm is None:
            raise ValueError("an uncertainty map needs its threshold (mm)")
        thresholds[UNCERTAINTY] = uncertainty_threshold_mm
        definitions[UNCERTAINTY] = uncertainty_definition
    return QualityMaps.from_maps(maps, thresholds, definitions=definitions, seconds=seconds,
                                 field_of_view=field_of_view)


def is_one_image(shape: Sequence[int]) -> bool:
    """Whether maps of ``shape`` are scored as one image: a 2D one, or a one-slice volume along any
    axis (``io.image.single_slice_axis_of``; the module docstring says why)."""
    return len(shape) == 2 or single_slice_axis_of(shape) is not None


def _flagged_fraction_per_slice(array: np.ndarray, threshold: float) -> np.ndarray:
    """(S,) fraction of the voxels above ``threshold`` in each slice along array axis 0; one image
    (``is_one_image``) is one slice."""
    flagged = array > threshold
    if is_one_image(flagged.shape):
        return np.array([flagged.mean()], dtype=np.float32)
    return flagged.reshape(flagged.shape[0], -1).mean(axis=1).astype(np.float32)


def _typical_ceiling(scores: np.ndarray) -> float:
    """The score above which a slice stands out from the rest of its volume (-inf for too few slices)."""
    if scores.shape[0] < MIN_SLICES_FOR_BASELINE:
        return -np.inf
    median = float(np.median(scores))
    return median + OUTLIER_SPREADS * 1.4826 * float(np.median(np.abs(scores - median)))
