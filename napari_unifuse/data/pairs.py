"""Training/evaluation pairs as in UniFuse §4.1: a clean reference, and the other modality
degraded and then misaligned.

The paper's notation: ``I_R`` reference (high quality), ``I'_D`` the moving input (degraded AND
misaligned), ``I_D`` its label (clean, aligned to ``I_R``), and ``phi_gt`` the deformation label.
The paper synthesises the degradation on the aligned clean image and then "applies rigid and
non-rigid transformations to the degraded images", so we do the same: ``moving = misalign(degrade
(label))``. The order matters for motion and metal: the artifacts (ghosts along the phase-encode
axis, streaks) are tied to the scanner's axes and then move with the anatomy.

Colour PET/SPECT (``(y, x, 3)`` RGB) are handled in YCbCr: the degradation acts on the luma Y,
and Y, Cb and Cr are all warped with the same field (the model fuses Y and carries CbCr).

Intensities are taken as given: MR and PET/SPECT in [0, 1] (``io.normalize_intensity``), CT in
HU or normalised (the metal simulation then maps through the recorded window, see ``degrade``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from napari_unifuse.data.color import rgb_to_ycbcr, ycbcr_to_rgb
from napari_unifuse.data.degrade import DEGRADATION_CLASSES, Degradation, make_degradation
from napari_unifuse.data.misalign import RandomMisalignment
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume
from napari_unifuse.io.normalize import CT_WINDOW_HU


@dataclass(frozen=True)
class Task:
    """A fusion task: which modality is the reference, which is degraded, and how."""

    reference_modality: str
    moving_modality: str
    degradation: str


# The paper's three tasks (T1 + motion-corrupted T2, MRI + metal CT, CT + low-dose PET), the
# Harvard-style MRI + PET/SPECT pairs with low-dose noise, and each pair without degradation, so
# the model also learns to leave clean inputs alone.
_TASK_PAIRS = {
    "t1-t2": ("t1", "t2", "motion"),
    "mri-ct": ("mr", "ct", "metal"),
    "ct-pet": ("ct", "pet", "lowdose"),
    "mri-pet": ("mr", "pet", "lowdose"),
    "mri-spect": ("mr", "spect", "lowdose"),
}
TASKS: dict[str, Task] = {
    f"{pair}-{degradation}": Task(reference, moving, degradation)
    for pair, (reference, moving, paper_degradation) in _TASK_PAIRS.items()
    for degradation in (paper_degradation, "none")
}


@dataclass
class SyntheticPair:
    """One pair; ``displacement`` is ``u`` (ndim, *shape), voxels: ``moving(x + u(x)) ~ label(x)``."""

    reference: ImageVolume
    moving: ImageVolume
    label: ImageVolume
    displacement: np.ndarray
    degradation: str
    class_index: int
    params: dict = field(default_factory=dict)


def resolve_task(task: str | Task) -> tuple[str, Task | None]:
    """A task name from ``TASKS``, a ``Task``, or a bare degradation class for any modalities."""
    if isinstance(task, Task):
        return "custom", task
    if task in TASKS:
        return task, TASKS[task]
    if task in DEGRADATION_CLASSES:
        return task, None
    raise InputError(
        f"unknown task {task!r}; use one of {sorted(TASKS)} or a degradation class {DEGRADATION_CLASSES}",
        "make_pair",
    )


def _degradation_options(name: str, label: ImageVolume) -> dict:
    """What the physical degradation models need to know about the label's grid and units."""
    spacing = tuple(float(s) for s in label.geometry.spacing)
    if name == "motion":
        return {"voxel_size_mm": spacing}
    if name == "metal":
        mapping = label.metadata.get("intensity_mapping") or {}
        if mapping.get("method") == "window":
            window = (mapping["lower"], mapping["upper"])
        elif label.array.min() >= 0.0 and label.array.max() <= 1.0:
            window = CT_WINDOW_HU  # a normalised CT with no record of its window: io's default
        else:
            window = None  # Hounsfield units
        options: dict[str, object] = {"voxel_size_mm": spacing, "hu_window": window}
        if label.ndim == 3:  # scanned in axial planes, whatever axis the volume stores them along
            options["slice_axis"] = label.geometry.world_axis_order()[0]
        return options
    return {}


# Cubic splines: linear interpolation blurs fine anatomy visibly at 64-128 pixels.
MISALIGNMENT_ORDER = 3


@dataclass(frozen=True)
class DegradedLabel:
    """A label after its task's degradation: the array (luma degraded, in YCbCr, for an RGB label)
    and the degradation model that made it, which records the drawn parameters.

    ``beyond_window``: what the degradation made beyond the label's [0, 1] window (metal and bright
    streaks above a CT window), in the window's units and zero inside it, where ``degrade_label`` was
    asked to keep it; ``array`` is clipped to the window either way."""

    array: np.ndarray
    degradation: Degradation
    beyond_window: np.ndarray | None = None


def degrade_label(label: ImageVolume, task: str | Task, rng: np.random.Generator,
                  severity: float = 0.5, *, keep_beyond_window: bool = False) -> DegradedLabel:
    """The first half of ``make_pair``: ``label`` degraded as ``task`` says, on its own grid.

    ``keep_beyond_window``: also return what the degradation made beyond the window of a normalised
    CT (``DegradedLabel.beyond_window``), for an output in the input's units; ``array`` and the
    draws from ``rng`` stay those made without it.
    """
    task_name, task_spec = resolve_task(task)
    name = task_spec.degradation if task_spec else task_name
    options = _degradation_options(name, label)
    clean = np.asarray(label.array, dtype=np.float32)
    window = options.get("hu_window")
    if keep_beyond_window and window is not None and not label.is_rgb:
        # The metal model clips its windowed output to [0, 1], metal at 3071 HU included: unclipped,
        # the clip is done here, and the [0, 1] part is bit for bit what the clipped model gives.
        degradation = make_degradation(name, severity, **options, clip_to_window=False)
        scaled = degradation(clean, rng)
        within = np.clip(scaled, 0.0, 1.0)
        return DegradedLabel(within, degradation, scaled - within)
    degradation = make_degradation(name, severity, **options)
    if label.is_rgb:
        ycbcr = rgb_to_ycbcr(label.array)  # from its own dtype: uint8 as read is in 0-255, not [0, 1]
        ycbcr[..., 0] = degradation(ycbcr[..., 0], rng)
        return DegradedLabel(ycbcr, degradation)
    return DegradedLabel(degradation(clean, rng), degradation)


def make_pair(
    reference: ImageVolume,
    label: ImageVolume,
    task: str | Task,
    rng: np.random.Generator | int,
    *,
    severity: float = 0.5,
    misalignment: RandomMisalignment | None = None,
    interpolation_order: int = MISALIGNMENT_ORDER,
    degraded: DegradedLabel | None = None,
    beyond_window: np.ndarray | None = None,
) -> SyntheticPair:
    """Degrade the aligned clean ``label``, then misalign it; the reference stays as it is.

    ``degraded``: the label already degraded by ``degrade_label`` with this task (training
    degrades a whole volume and then crops it, ``training.datasets``); only the misalignment is
    drawn then, and ``severity`` is not used.

    ``beyond_window``: what intensity normalisation clipped off a grey-level label (``mapping.scaled
    - mapping.apply`` of ``io.normalize``, zero inside the window). The degradation models work on
    the window's [0, 1] range, so it is added to the degraded label before the misalignment: the
    moving image then keeps what lies beyond the window (hot PET lesions, metal above the CT
    window), undegraded, as the engine carries it past the model. What the degradation itself made
    beyond the window (simulated metal and bright streaks up to 3071 HU) is added too, when the
    label is degraded here (``DegradedLabel.beyond_window``); without ``beyond_window`` the moving
    image stays in [0, 1], as the model takes it.

    The misalignment resamples with cubic splines by default (linear blurs fine anatomy visibly
    at 64-128 pixels), clipped to the range of the image it moves so no ringing values appear.

    ``rng`` may be a seed (recorded in ``params``) or a Generator. ``label`` must lie on the
    reference's grid (resample it first with ``io.resample_to_reference``).
    """
    task_name, task_spec = resolve_task(task)
    degradation_name = task_spec.degradation if task_spec else task_name
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    generator = np.random.default_rng(seed) if seed is not None else rng
    if not isinstance(generator, np.random.Generator):
        raise InputError(f"rng must be a seed or a numpy Generator, got {type(rng).__name__}", "make_pair")
    if not label.on_grid_of(reference, atol=1e-3):
        raise InputError(
            f"the label ({label.spatial_shape}, {label.geometry}) is not on the reference grid "
            f"({reference.spatial_shape}, {reference.geometry}); resample it first",
            label.source or "label",
        )

    if degraded is None:
        # Training's path (no beyond_window) makes the very call it always made.
        degraded = (degrade_label(label, task, generator, severity) if beyond_window is None
                    else degrade_label(label, task, generator, severity, keep_beyond_window=True))
    elif degraded.degradation.name != degradation_name or degraded.array.shape != label.array.shape:
        raise InputError(
            f"the degraded label ({degraded.degradation.name}, {degraded.array.shape}) does not belong to "
            f"this task ({degradation_name}) and label ({label.array.shape})", "make_pair")
    degradation = degraded.degradation
    to_misalign = degraded.array
    if beyond_window is not None:
        if label.is_rgb or beyond_window.shape != label.array.shape:
            raise InputError(f"beyond_window ({beyond_window.shape}) must be the shape of a grey-level label "
                             f"({label.array.shape}{', RGB' if label.is_rgb else ''})", "make_pair")
        to_misalign = to_misalign + beyond_window
        if degraded.beyond_window is not None:
            to_misalign = to_misalign + degraded.beyond_window
    misalignment = misalignment or RandomMisalignment()
    clean = np.asarray(label.array, dtype=np.float32)
    draw = misalignment.draw(label.spatial_shape, generator, spacing=tuple(label.geometry.spacing))
    moving_array = np.clip(draw.apply(to_misalign, order=interpolation_order), to_misalign.min(),
                           to_misalign.max())
    if label.is_rgb:
        moving_array = ycbcr_to_rgb(moving_array)

    params = {
        "task": task_name,
        "reference_modality": task_spec.reference_modality if task_spec else reference.metadata.get("modality"),
        "moving_modality": task_spec.moving_modality if task_spec else label.metadata.get("modality"),
        "seed": seed,
        "degradation": degradation.last_params,
        "misalignment": draw.params,
        "colour": "YCbCr (BT.601 full range): Y degraded, all channels warped" if label.is_rgb else None,
        "interpolation_order": interpolation_order,
    }
    moving = replace(
        label,
        array=np.asarray(moving_array, dtype=np.float32),
        metadata={**label.metadata, "role": "moving", "degradation": degradation.name},
        source=None,
    )
    return SyntheticPair(
        reference=reference,
        moving=moving,
        label=replace(label, array=clean, metadata={**label.metadata, "role": "label"}),
        displacement=draw.displacement(),
        degradation=degradation.name,
        class_index=degradation.class_index,
        params=params,
    )
