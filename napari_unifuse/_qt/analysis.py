"""What one click on "Run UniFuse" computes, off the GUI thread: fusion plus the review maps.

No Qt here: the workbench runs :func:`run_and_analyse` in a napari ``thread_worker`` and only
turns the returned :class:`RunOutcome` into layers, plots and tables. All numbers come from
``engine`` (fusion, overlays) and ``metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.labels import (
    checked_label,
    label_metrics,
    label_on_grid,
    label_units_warnings,
    run_moving_mapping,
)
from napari_unifuse.engine.overlays import (
    absolute_error,
    checkpoint_identity,
    display_grey,
    field_jacobian,
    folding_mask,
    grey_values,
    slice_of,
)
from napari_unifuse.engine.progress import CancelToken, ProgressCallback
from napari_unifuse.engine.provenance import describe_label
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import CheckpointError, UniFuseError
from napari_unifuse.io import ImageVolume
from napari_unifuse.metrics import (
    METRIC_NAMES,
    JacobianRegularity,
    fusion_metrics,
    jacobian_regularity,
    local_misalignment_map,
    mutual_information,
    q_cc,
    registration_metrics,
    ssim_gains,
)
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import checkpoint_method

UNTRAINED = "untrained (small preset)"
# The untrained preset is seeded so that reopening "the same run" really reproduces it.
_UNTRAINED_SEED = 0


@dataclass(frozen=True)
class RunRequest:
    """What the form asks for: the two images, the model, where and how to run it."""

    reference: ImageVolume
    moving: ImageVolume
    checkpoint: str  # bundled name, .safetensors path, or UNTRAINED
    device: str = "auto"
    tile_size: int | None = None
    task: str = "auto"  # the degradation the user knows the moving image has, or "auto"
    label: ImageVolume | None = None  # ground truth of the aligned moving image, when known
    # What the moving image is, where its header does not say (a colour PET or SPECT): "auto" reads it from
    # the header, else from the intensities (io.normalize), as `unifuse fuse --moving-modality` does.
    moving_modality: str = "auto"


@dataclass
class RunOutcome:
    """A fusion result with the grey views, maps and volume metrics the workbench shows."""

    result: FusionResult
    reference_grey: np.ndarray
    aligned_grey: np.ndarray  # in its own display window, for the views and the MIND error map
    # Both in the model's [0, 1] units, the fused image's: what the fusion metrics compare it with.
    reference_units: np.ndarray
    aligned_units: np.ndarray
    # The ground truth on the reference grid in those units too: the label metrics compare it with
    # ``aligned_units`` (engine.labels, as `unifuse fuse --label` does), not in a display window.
    label_units: np.ndarray | None
    error_map: np.ndarray
    error_kind: str
    jacobian: np.ndarray
    folding: np.ndarray
    notes: list[str] = field(default_factory=list)
    # None until ``volume_metrics`` has run: the workbench draws the layers first.
    volume_metrics: dict[str, float] | None = None


def build_engine(checkpoint: str, spatial_dims: int, device: str, tile_size: int | None) -> FusionEngine:
    """A FusionEngine for a bundled/file UniFuse checkpoint, or the seeded untrained small preset.

    A checkpoint of another method is refused from its header, before its weights load: the
    engine would run the method its header names, which the run form would report as UniFuse."""
    if checkpoint != UNTRAINED:
        method = checkpoint_method(checkpoint)
        if method != UniFuse.method:
            raise CheckpointError(f"{checkpoint} holds {method} weights, not UniFuse ones; compare other methods "
                                  "in the Methods tab")
        return FusionEngine(checkpoint, device=device, tile_size=tile_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_UNTRAINED_SEED)
        model = UniFuse(UniFuseConfig.small(spatial_dims))
    info = {"name": UNTRAINED, "note": f"random weights (seed {_UNTRAINED_SEED}); outputs are not meaningful"}
    return FusionEngine(model, device=device, tile_size=tile_size, checkpoint_info=info)


def engine_key(request: RunRequest) -> tuple:
    """What a run's loaded engine is cached under: the checkpoint as ``run_folder`` tells models
    apart (a file retrained in place, as ``train --resume`` rewrites ``last.safetensors``, is
    another model, loaded afresh), the dimensions it fuses in (a one-slice volume as a 2D image),
    the device and the tile size."""
    return (checkpoint_identity(request.checkpoint), model_dimensions(request.reference), request.device,
            request.tile_size)


# What the saved review maps hold, for their provenance (the error map by the kind computed, its
# ``{units}`` those of the moving image: grey values, or the luma a colour image is compared in).
ERROR_MAP_DESCRIPTIONS = {
    "|aligned − label|": "|aligned − label| per voxel, {units}, against the ground truth recorded as inputs.label; "
                         "the aligned moving image is also the restored one, so this is restoration and alignment "
                         "error together",
    "misalignment (MIND)": "no ground truth: the structural disagreement of the aligned moving image and the "
                           "reference, mean |MIND difference| in [0, 1] (metrics.local_misalignment_map)",
}
REVIEW_MAP_DESCRIPTIONS = {
    "jacobian_determinant": "det(∂φ/∂x) of φ(x) = x + u(x): 1 keeps volume, > 1 expands, < 1 compresses, "
                            "≤ 0 folds",
    "folding": "1 where the Jacobian determinant is ≤ 0 (the field folds space), else 0",
}


def run_and_analyse(
    request: RunRequest, engine: FusionEngine, progress: ProgressCallback, cancel: CancelToken
) -> RunOutcome:
    """Fuse the pair and compute the review maps; ``cancel`` is honoured between the steps of the
    analysis too (each takes seconds on a clinical volume), not only between the fusion's tiles."""
    # Before the fusion: a ground truth that misses the reference is refused, not scored against zeros;
    # one with NaN voxels (a layer made in napari) is scored as the CLI scores its file, the NaN replaced.
    label, label_warnings = (checked_label(request.label, request.reference) if request.label is not None
                             else (None, []))
    # Described as given (a layer by the hash of its values), not with the NaN checked_label replaced.
    label_input = describe_label(request.label) if request.label is not None else None
    result = engine.run_fusion(request.reference, request.moving, moving_modality=request.moving_modality,
                               progress=progress, cancel=cancel)
    # The outputs lie on the reference's grid in world axis order (run_fusion): a layer a script added
    # with its slices head to foot, or its axes permuted, is compared with them on that grid.
    reference = request.reference.in_world_axis_order()
    cancel.raise_if_cancelled()
    progress("analyse", 0, 1)
    if label is not None:
        label_warnings += label_units_warnings(label, request.moving, run_moving_mapping(result))
    notes = [*result.warnings, *label_warnings]
    if request.task != "auto":
        result.provenance["declared_task"] = request.task
        predicted = result.predicted_class
        if not result.class_probs:
            notes.append(f"{result.provenance['method']['name']} estimates no degradation: the declared "
                         f"'{request.task}' cannot be checked")
        elif predicted != request.task:
            notes.append(f"the degradation is set to '{request.task}' but the model estimates '{predicted}' "
                         f"(p = {result.class_probs[predicted]:.2f}); check the degradation plot")
    reference_grey = display_grey(reference)
    aligned_grey = display_grey(result.aligned)
    cancel.raise_if_cancelled()
    if label is not None:
        # In the moving image's units, its background where the label does not reach, as fuse scores it.
        label_on_reference = label_on_grid(label, reference, run_moving_mapping(result), result.aligned.is_rgb)
        error_map = absolute_error(grey_values(result.aligned), grey_values(label_on_reference))
        error_kind = "|aligned − label|"
        label_units = result.in_model_units("moving", label_on_reference)
        # What the error map and the label metrics were measured against, as the CLI's --label records it.
        result.provenance.setdefault("inputs", {})["label"] = label_input
    else:
        label_units = None
        # A one-slice volume's map is its slice's: 3D neighbourhoods would reach across nothing.
        axis = result.fused.single_slice_axis
        error_map = local_misalignment_map(slice_of(aligned_grey, axis, 0), slice_of(reference_grey, axis, 0))
        error_map = (error_map if axis is None else np.expand_dims(error_map, axis)).astype(np.float32)
        error_kind = "misalignment (MIND)"
    units = ("in BT.601 luma [0, 1] of the colour moving image" if result.aligned.is_rgb
             else "in the moving image's units")
    result.provenance["review_maps"] = {"alignment_error": ERROR_MAP_DESCRIPTIONS[error_kind].format(units=units),
                                        **REVIEW_MAP_DESCRIPTIONS}
    cancel.raise_if_cancelled()
    jacobian = field_jacobian(result.displacement, result.fused.single_slice_axis)
    cancel.raise_if_cancelled()
    outcome = RunOutcome(
        result=result, reference_grey=reference_grey, aligned_grey=aligned_grey,
        reference_units=result.in_model_units("reference", reference),
        aligned_units=result.in_model_units("moving", result.aligned), label_units=label_units,
        error_map=error_map, error_kind=error_kind,
        jacobian=jacobian, folding=folding_mask(jacobian), notes=notes,
    )
    progress("analyse", 1, 1)
    return outcome


def volume_metrics(outcome: RunOutcome) -> dict[str, float]:
    """Fusion metrics (fused vs reference and aligned), field regularity, and label metrics if any.

    A metric that does not apply to these inputs (e.g. slices under Q_vif's 41×41 minimum) is NaN,
    shown as "n/a", rather than failing the run. A one-slice volume is scored as the 2D image it
    is (its only slice): 3D windows and border margins do not fit in one slice.
    """
    axis = outcome.result.fused.single_slice_axis

    def whole(array: np.ndarray) -> np.ndarray:
        return slice_of(array, axis, 0)

    fused, reference, aligned = (whole(grey_values(outcome.result.fused)), whole(outcome.reference_units),
                                 whole(outcome.aligned_units))
    # The per-source gain first: unlike Q_ssim or Q_abf, a fusion that copies one source scores 0 on it.
    values = {"gain min": _or_nan(lambda: ssim_gains(fused, reference, aligned).minimum)}
    values.update(_or_nan(lambda: fusion_metrics(fused, reference, aligned), METRIC_NAMES))
    # From the determinant map the layers show: computing it again per figure cost seconds in 3D.
    regularity = _or_nan(lambda: jacobian_regularity(whole(outcome.jacobian))._asdict(), JacobianRegularity._fields)
    values["folding %"], values["SDlogJ"] = regularity["folding_percentage"], regularity["sd_log_jacobian"]
    label_units = outcome.label_units
    if label_units is not None:
        # engine.labels.label_metrics: the numbers `unifuse fuse --label` writes for this run and label.
        values.update(_named_label_metrics(lambda: label_metrics(outcome.result, label_units)))
    return values


def slice_metrics(outcome: RunOutcome, slice_axis: int | None, slice_index: int) -> dict[str, float]:
    """Cheap per-slice numbers, recomputed whenever the viewed slice changes."""
    def cut(array: np.ndarray) -> np.ndarray:
        return slice_of(array, slice_axis, slice_index)

    fused, reference, aligned = cut(grey_values(outcome.result.fused)), cut(outcome.reference_units), cut(outcome.aligned_units)
    values = {
        "MI": _or_nan(lambda: mutual_information(fused, reference, aligned)),
        "Q_cc": _or_nan(lambda: q_cc(fused, reference, aligned)),
        "folding %": float(100.0 * cut(outcome.folding).mean()),
        f"mean {outcome.error_kind}": float(cut(outcome.error_map).mean()),
    }
    label_units = outcome.label_units
    if label_units is not None:
        values.update(_named_label_metrics(lambda: registration_metrics(cut(outcome.aligned_units), cut(label_units))))
    return values


# The Metrics tab's name for each label metric -> the key ``unifuse fuse --label`` writes it under.
LABEL_METRICS_IN_FILE = {f"{key.upper()} to label": key for key in ("mse", "ncc", "ssim")}
# The Metrics tab's name of each volume metric that metrics.json names otherwise: the column
# ``unifuse evaluate`` writes the same quantity under, and the label metrics' keys above.
METRIC_KEYS_IN_FILE = {"gain min": "gain_min", "folding %": "folding_pct", "SDlogJ": "sdlogj", **LABEL_METRICS_IN_FILE}


def _named_label_metrics(compute) -> dict[str, float]:
    """``compute()``'s registration metrics named for the Metrics tab ("NCC to label"), NaN where
    they do not apply."""
    metrics = _or_nan(compute, tuple(LABEL_METRICS_IN_FILE.values()))
    return {name: metrics[key] for name, key in LABEL_METRICS_IN_FILE.items()}


def _or_nan(compute, keys: tuple[str, ...] | None = None) -> Any:
    """``compute()``, or NaN (a dict of NaN for ``keys``) when the metric does not apply here."""
    try:
        return compute()
    except UniFuseError:
        return float("nan") if keys is None else {key: float("nan") for key in keys}
