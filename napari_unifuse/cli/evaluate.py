"""`unifuse evaluate`: fusion methods beside the classical pipelines, every metric side by side.

Pairs come from a CSV (columns ``reference,moving,label[,displacement][,task][,degradation]``,
paths relative to the CSV; ``label`` is the clean moving image aligned to the reference (an
intensity image in the moving image's units, not a segmentation),
``displacement`` the ground-truth field as an ITK displacement file, ``degradation`` the true
class as ``unifuse synth`` records it in meta.json; any other column, a misspelled ``lable`` say,
is refused, and so is a pair (the same reference, moving and label files) listed twice, which would
count twice in every mean and test; a label is checked against its reference as ``unifuse fuse
--label`` checks it, before any pair is computed: another dimensionality, or no overlap in space,
refuses its row, and under half the reference grid is a warning, printed and listed in
``evaluation.md``, as are the other warnings ``unifuse fuse --label`` gives of a label (its reader's
notes, a picture of another size, a constant label, values the moving image's window clips, a
label in much smaller units, a segmentation's ids) and those it gives of the reference and moving image
(pictures of different sizes, an ignored alpha channel, ...; a moving image outside the reference
refuses its row, as do a moving image of another dimensionality than its reference (but a one-slice
volume (x, y, 1) beside a 2-D image is scored as the 2-D pair ``unifuse fuse`` fuses, a one-slice label
as its slice), a displacement on another grid than the reference's (spacing, origin, direction or
shape) and the task ``all``, the name of the summary over all tasks); a pair is named by its moving
path as the CSV gives it) or from the Harvard AANLIB folder, where the degraded, misaligned moving images are
synthesised exactly as training's validation set does (``training.datasets.build_datasets``: same
patient-independent split, seeded per pair).

With ``--harvard``, ``--misalignment`` picks the misalignment regime of the synthesised pairs
(``data.misalign.MISALIGNMENT_REGIMES``: large, mild, none) or runs each of them (``all``, the
default); every row carries its ``regime`` (``given`` for CSV pairs) and the report has one
section per regime. Given with ``--pairs``, this and every other Harvard option (``--limit``,
``--tasks``, ``--seed``, ...) is refused, not ignored: CSV pairs are scored as the CSV gives them.

Methods (rows): ``UniFuse (CHECKPOINT)`` (``--checkpoint``, a UniFuse checkpoint) and each of
``--methods`` (``engine.methods``: bsafusion, mmif-amin, ...; ``NAME=CHECKPOINT`` for weights other
than the bundled ones, the row then named ``NAME (STEM)`` after the checkpoint's file name (for a
training run's ``RUN/checkpoints/last.safetensors``, ``NAME (RUN/last)``; ``--checkpoint``'s row
likewise), and the report's header gives each checkpoint's path; ``--checkpoint``'s weights given
again to ``--methods``, ``unifuse`` with the bundled ones say, are refused as named twice) through
``engine.FusionEngine`` (the shipped path; each built for the pairs' dimensionality as ``unifuse
fuse`` builds it, so a classical pipeline scores a 3D pair in 3D and a 2D-only method refuses one),
and each classical registration (``engine.classical``: identity, SimpleITK rigid + B-spline, ANTs SyN,
UniFuse's parameter-free matching) followed by each classical fusion rule (max, average,
wavelet). The classical pipelines fuse the reference with *their* aligned moving image, i.e. the
still-degraded one: the honest baseline, since they restore nothing. Where the moving image covers
only part of the reference grid, their registrations (the copy pipelines' too) see the reference as
the engine's alignment estimates see it, blanked outside the moving image's field of view
(``engine.inference.within_field_of_view``), so that none slides the covered part into the
reference's uncovered tissue; their fusion and every score take the whole reference. Where a field reads beyond
the image, their warp repeats its edge voxels and the engine's reads 0, so the engine method
``matching+average`` and the row ``matching + average`` share a field but score differently near
the edge. Two sanity pipelines fuse nothing: ``copy-reference`` (fused = the reference) and
``copy-moving`` (fused = the aligned moving image), both on the ``matching`` registration when it
is among ``--baselines``, else on ``identity`` (computed for them if need be). A metric on which a copy scores better than any
fusion rule of the same aligned pair (``<that registration> + max``, ``+ average`` or ``+ wavelet``,
those evaluated) on some task rewards not fusing; the report marks it with † (issue 16). The check
needs that registration among ``--baselines`` and a ``--fusion-rules`` rule (the default
baselines and rules have both); without them ``evaluation.md`` says it was skipped and what to add.

Metrics (columns), all on [0, 1] intensities (the moving image's normalisation; RGB PET/SPECT on
the luma Y: an engine row's from its RGB output, fused from the luma shifted to put its darkest
value at 0, a classical row's from the luma as read; docs/evaluation.md): alignment NCC / MSE /
SSIM of the aligned moving image vs the label, folding % and SDlogJ of the field, the mean
end-point error against the ground-truth field (EPE, voxels; in mm by the reference's spacing as
``epe_mm`` / ``epe_tissue_mm``: on thick slices a voxel across them is several in-plane voxels
long; NaN for a CSV pair whose reference is a picture, a PNG or JPG, which has no pixel size,
while the Harvard pairs have the atlas' 1 mm at 256 pixels) when it is known, over the whole
grid (``epe``) and over the reference's tissue (``epe_tissue``, where
``engine.alignment_guard.tissue_mask`` sees it: the background's true field is invisible to every
method; NaN, with a warning, on a reference without tissue); the fusion metrics of the fused image
vs (reference, label): those of ``metrics.fusion_metrics``, the SSIM gains ``gain_ref`` (over the
label's own SSIM to the reference), ``gain_mov`` (over the reference's SSIM to the label) and ``gain_min`` (the smaller;
0 for a copy of the reference or of the label; ``copy-moving`` copies the aligned, still degraded
moving image, which scores above 0 where the degradation makes it resemble the reference more than
the label does), Chen–Blum ``Q_CB`` and Han's ``VIF_F``; ``bone_retention``, the mean fused
intensity where the label is bone (> 0.8), for CT moving images only (Harvard CT-MRI, or a CSV
moving image that io's normalisation recognises as CT; NaN elsewhere); and seconds per pair (the
fusion alone, without ``unifuse fuse``'s quality maps; a run's first pair also pays the libraries'
one-off start-up, which weighs on the mean of a few pairs only). For
UniFuse also ``class_accuracy``, whether its global degradation class is the true one (when
known; the classical pipelines estimate no class), and the restoration check: ``restored_ssim``
(its restored, aligned output vs the label, as ``ssim``) beside ``warped_input_ssim`` (the
degraded input warped by UniFuse's own field, ``data.misalign.warp_array``, vs the label), so that
restoration and alignment are told apart; NaN for the classical pipelines, which restore nothing.
A registration that fails on a pair (SimpleITK on a constant image, say) leaves every metric of
that method and pair NaN, with a line on stderr: the means and the pair-by-pair tests leave the
pair out for that method, and the run goes on. A pair that fails altogether (out of memory even
with the smallest tiles, say) does not stop the evaluation either: one line on stderr names it,
every method's row of that pair is NaN, with the reason in an ``error`` column of ``per_pair.csv``
(there only when a pair failed), ``evaluation.md`` lists it under "Failed pairs", and the command
ends saying how many pairs failed, with exit status 2.
Written to ``OUT/evaluation.csv`` and ``OUT/evaluation.md`` (per regime: mean ± std, the
population std (``ddof=0``), each over the pairs where the metric is defined (bone retention
without CT, a failed registration, a metric whose window does not fit a small pair: NaN, left out;
``evaluation.csv`` gives that count as ``<metric>_n`` and the table adds ``(n=K)`` where it is below
the row's n), per method and task, and over all tasks, the metrics a copy fools,
then UniFuse against each pipeline pair by pair: mean difference, wins (better by more than float
rounding; closer values are ties, ``rounding_ties``), Wilcoxon p; with ``--methods``, every engine
method against every other row), ``OUT/paired.csv`` (that comparison) and
``OUT/per_pair.csv`` (every value). A folder that already holds these results is refused unless
``--overwrite`` is given, and one that cannot be created or written to, before any pair is computed;
so is, even with ``--overwrite``, a pairs CSV that a result file would replace (an input named
``evaluation.csv`` in ``OUT``). ``OUT``'s lock (``engine.outputs.output_folder_lock``) is held for
the whole run: a second evaluation into it is refused at once (it would find no results there yet,
and later replace this run's).
The files are written into a hidden staging folder in ``OUT`` and moved into place together once
all are written; only then go the earlier results this run does not produce. A write that fails (a
full disk) is a one-line error that leaves the earlier results whole, and so does an interrupted
run (Ctrl-C), which writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_unifuse.cli.arguments import (
    CsvRow,
    add_device_argument,
    non_negative_int,
    positive_int,
    read_pairs_rows,
    user_path,
)
from napari_unifuse.data.color import rgb_to_ycbcr, ycbcr_to_rgb
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.misalign import MISALIGNMENT_REGIMES, warp_array
from napari_unifuse.engine import classical
from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.classical import FUSION_RULES, REGISTRATION_METHODS
from napari_unifuse.engine.device import out_of_memory_explained
from napari_unifuse.engine.inference import (
    FusionEngine,
    moving_field_of_view,
    one_slice_beside_2d,
    overlap_warnings,
    picture_placement_warnings,
    reader_and_content_warnings,
    refuse_mixed_dimensions,
    single_slice_pair,
    within_field_of_view,
)
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.labels import checked_label, label_on_grid, label_units_warnings
from napari_unifuse.engine.methods import load_method, split_name
from napari_unifuse.engine.outputs import (
    FolderLock,
    check_writable_folder,
    output_folder_lock,
    same_file,
    write_files_together,
)
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError, RegistrationError, UniFuseError
from napari_unifuse.io import ImageVolume, IntensityMapping, normalize_intensity, read_image, resample_to_reference
from napari_unifuse.io.fields import read_displacement
from napari_unifuse.io.readers import is_picture
from napari_unifuse.metrics import (
    METRIC_NAMES,
    bone_retention,
    end_point_error,
    fusion_metrics,
    jacobian_determinant,
    jacobian_regularity,
    q_cb,
    registration_metrics,
    ssim_gains,
    vif_f,
)
from napari_unifuse.model.checkpoint import DEFAULT_METHOD, checkpoint_method, read_metadata
from napari_unifuse.training.datasets import DEFAULT_VAL_FRACTION
from napari_unifuse.training.harvard import HARVARD_TASKS, RECORDED_SPLIT_KEY, case_of, recorded_split
from napari_unifuse.training.trainer import CHECKPOINTS_FOLDER

ALIGNMENT_COLUMNS = ("ncc", "mse", "ssim", "folding_pct", "sdlogj", "epe", "epe_tissue", "epe_mm", "epe_tissue_mm")
RESTORATION_COLUMNS = ("restored_ssim", "warped_input_ssim")
# A = the reference, B = the label (the clean moving image), as for every fusion metric here.
GAIN_COLUMNS = ("gain_ref", "gain_mov", "gain_min")
PERCEPTUAL_COLUMNS = ("Q_CB", "VIF_F")
BONE_COLUMN = "bone_retention"
FUSION_COLUMNS = (*METRIC_NAMES, *GAIN_COLUMNS, *PERCEPTUAL_COLUMNS, BONE_COLUMN)
CLASS_COLUMN = "class_accuracy"
TIME_COLUMN = "seconds"  # last: a run's values differ from another's only in this column
METRIC_COLUMNS = (*ALIGNMENT_COLUMNS, *RESTORATION_COLUMNS, *FUSION_COLUMNS, CLASS_COLUMN, TIME_COLUMN)
ALL_TASKS = "all"
HARVARD_TASK_FOLDERS = {"CT": "CT-MRI", "PET": "PET-MRI", "SPECT": "SPECT-MRI"}
UNIFUSE_METHOD = "UniFuse"
# The columns a constant label makes NaN (correlations with it): its warning names them all.
CONSTANT_LABEL_NAN_COLUMNS = ("ncc", "Q_cc", "Q_scd", "Q_CB")
# The issue's claims (alignment and fusion quality), compared pair by pair; errors: lower is better.
PAIRED_COLUMNS = ("ncc", "epe", "epe_tissue", "Q_abf", "Q_ssim", "gain_min", *PERCEPTUAL_COLUMNS)
# Two values of a metric closer than this are tied in the pair-by-pair tests (``rounding_ties``).
TIE_RTOL, TIE_ATOL = 1e-6, 1e-9
LOWER_IS_BETTER = frozenset({"mse", "epe", "epe_tissue", "epe_mm", "epe_tissue_mm", "folding_pct", "sdlogj", "Q_mse",
                             "Q_cv", TIME_COLUMN})
# Sanity pipelines: fusion rules that fuse nothing, scored against every real rule on the same pair.
COPY_RULES = ("copy-reference", "copy-moving")
# The registration the copies sit on when it is evaluated (UniFuse's own first step); else identity.
COPY_REGISTRATION = "matching"
FOOLED_MARK = "†"
REGIME_CHOICES = (*MISALIGNMENT_REGIMES, "all")
CSV_REGIME = "given"  # CSV pairs come misaligned as they are
RESULT_FILES = ("per_pair.csv", "evaluation.csv", "paired.csv", "evaluation.md")
PAIRS_REQUIRED_COLUMNS = ("reference", "moving", "label")
PAIRS_OPTIONAL_COLUMNS = ("displacement", "task", "degradation")
# The [0, 1] luma an RGB moving image is scored in (unit_intensities): a grey label beside it goes through it.
UNIT_LUMA = IntensityMapping("luma", "rgb", 0.0, 1.0, reason="BT.601 luma of an RGB image, as evaluate scores it")
# Each Harvard option's value when it is not given. Their argparse default is None, so that one given
# with --pairs, which would be ignored, is told from one left out (and refused).
HARVARD_DEFAULTS: dict[str, Any] = {"split": "val", "tasks": ",".join(HARVARD_TASK_FOLDERS), "limit": None,
                                    "val_fraction": None, "split_seed": None, "size": None, "seed": 0,
                                    "misalignment": "all", "none_fraction": 0.0}


@dataclasses.dataclass(frozen=True)
class EvaluationPair:
    """One pair as a user would hand it to ``unifuse fuse``, plus what it is scored against."""

    name: str
    task: str
    reference: ImageVolume
    moving: ImageVolume
    label: np.ndarray  # clean aligned moving, [0, 1] in the moving image's normalisation (Y if RGB)
    displacement: np.ndarray | None = None  # ground-truth u (ndim, *spatial), voxels
    degradation: str | None = None  # true class, one of data.degrade.DEGRADATION_CLASSES
    moving_modality: str | None = None  # "ct" enables bone_retention
    warnings: tuple[str, ...] = ()  # what its scores should be read with (fuse's input warnings, label coverage)
    # False for a picture reference (PNG, JPG: no pixel size, read as 1 mm pixels): its *_mm errors are NaN.
    spacing_in_mm: bool = True


# ---- pair sources --------------------------------------------------------------------------------
def unit_intensities(image: ImageVolume) -> tuple[np.ndarray, IntensityMapping | None]:
    """An image on [0, 1] as the engine feeds it to the model: luma of RGB, else ``normalize_intensity``."""
    if image.is_rgb:
        return rgb_to_ycbcr(image.array)[..., 0].astype(np.float32), None
    normalised, mapping = normalize_intensity(image)
    return normalised.array.astype(np.float32), mapping


def pairs_from_csv(path: Path) -> list[EvaluationPair]:
    """The pairs of a ``--pairs`` CSV (``PAIRS_REQUIRED_COLUMNS`` and any of ``PAIRS_OPTIONAL_COLUMNS``;
    another column is refused: a misspelled ``displacment`` would score no end-point error, unnoticed),
    none of them listed twice."""
    numbered = read_pairs_rows(path, required=PAIRS_REQUIRED_COLUMNS, optional=PAIRS_OPTIONAL_COLUMNS)
    refuse_repeated_pairs(numbered, path)
    names = csv_pair_names([(line, row["moving"]) for line, row in numbered])
    pairs = []
    for name, (line, row) in zip(names, numbered, strict=True):
        task = row.get("task") or "pairs"
        if task.lower() == ALL_TASKS:
            raise InputError(f"line {line} of the CSV: the task {task!r} is the name of the summary over all tasks, "
                             "whose rows it would join; name the task otherwise", path)
        # 3-D images in world axis order, as run_fusion fuses them: every row, classical ones included,
        # scores the pair on the grid `unifuse fuse` writes, however its files store it.
        stored_reference = read_csv_image(path, line, row, "reference")
        reference = stored_reference.in_world_axis_order()
        moving = read_csv_image(path, line, row, "moving").in_world_axis_order()
        label_image = read_csv_image(path, line, row, "label").in_world_axis_order()
        try:
            beside = one_slice_beside_2d(reference, moving)
            if beside is None:
                refuse_mixed_dimensions(reference, moving)
            warnings = tuple(input_warnings(*(beside or (reference, moving))))
        except InputError as error:
            raise on_csv_line(error, path, line, row, "moving") from error
        displacement = None
        if row.get("displacement"):
            try:  # on the reference grid, a one-slice reference's included
                displacement = displacement_in_world_axis_order(path.parent / row["displacement"],
                                                                stored_reference, reference)
            except InputError as error:
                raise on_csv_line(error, path, line, row, "displacement") from error
        # Scored as the 2D pair `unifuse fuse` fuses it as; the field loses its component across the slice.
        slice_axis = reference.single_slice_axis
        if slice_axis is not None and displacement is not None:
            displacement = np.delete(displacement, slice_axis, axis=0).take(0, axis=slice_axis + 1)
        if beside is not None:
            reference, moving = beside
        try:
            label_image, label_warnings = checked_label(label_image, reference, CONSTANT_LABEL_NAN_COLUMNS)
        except InputError as error:
            raise on_csv_line(error, path, line, row, "label") from error
        # A grey label is scored in the moving image's [0, 1] units: the moving image's mapping, its
        # luma's for an RGB one; an RGB label by its own luma.
        _, mapping = unit_intensities(moving)
        label_mapping = None if label_image.is_rgb else (mapping or UNIT_LUMA)
        warnings += (*label_warnings, *label_units_warnings(label_image, moving, label_mapping))
        label_image = label_on_grid(label_image, reference, label_mapping, moving.is_rgb)
        if label_mapping is None:
            label, _ = unit_intensities(label_image)
        else:
            label = label_mapping.apply(label_image.array)
        if slice_axis is not None and beside is None:
            # A one-slice reference with a moving volume or slice: on the slice's in-plane grid.
            reference, moving = single_slice_pair(reference, moving)
            label = np.take(label, 0, axis=slice_axis)
        if displacement is not None and not has_tissue(unit_intensities(reference)[0]):
            warnings += (f"{reference.source}: the reference shows no tissue, so epe_tissue (the end-point error "
                         "over its tissue) is NaN for this pair and left out of the means",)
        for warning in warnings:
            print(f"warning: pair {name}: {warning}", file=sys.stderr)
        pairs.append(EvaluationPair(name, task,
                                    reference, moving, label, displacement,
                                    _degradation(row.get("degradation"), path, line),
                                    mapping.modality if mapping is not None else None, warnings,
                                    spacing_in_mm=not is_picture(stored_reference)))
    return pairs


def read_csv_image(path: Path, line: int, row: CsvRow, column: str) -> ImageVolume:
    """The image a CSV cell names (relative to the CSV at ``path``), its problems named by the line."""
    try:
        return read_image(path.parent / row[column])
    except InputError as error:
        raise on_csv_line(error, path, line, row, column) from error


def on_csv_line(error: InputError, path: Path, line: int, row: CsvRow, column: str) -> InputError:
    """``error``, met on the file of ``row``'s ``column``, as the CSV at ``path`` reports it: by its line
    and column; where the file is missing and its cell holds a backslash (a path written on Windows),
    with the path written with '/'."""
    cell, problem = row[column], error.problem
    if "\\" in cell and not (path.parent / cell).exists():
        forward = cell.replace("\\", "/")
        problem = f"{problem.rstrip('.')}; '\\' is not a folder separator here: write the path with '/' ({forward})"
    return InputError(f"line {line} of the CSV, {column} {error.source}: {problem}", path)


def displacement_in_world_axis_order(path: Path, stored_reference: ImageVolume, reference: ImageVolume) -> np.ndarray:
    """The displacement field of ``path`` (voxels, ``io.fields.read_displacement``) on ``reference``,
    ``stored_reference`` in world axis order (``ImageVolume.in_world_axis_order``), where the pair is
    fused: a field written on that grid is read as it is; one on the reference's grid as stored (a
    coronal NIfTI's) has its axes and its components, displacements along those axes, transposed alike
    (and, for slices stored from head to foot, reversed along the slices, its slice component negated)."""
    try:
        return read_displacement(path, reference.geometry, reference.spatial_shape)
    except InputError:
        if reference is stored_reference:
            raise
    field = read_displacement(path, stored_reference.geometry, stored_reference.spatial_shape)
    axes = list(stored_reference.geometry.world_axis_order())
    field = field[axes].transpose(0, *(axis + 1 for axis in axes))
    if stored_reference.slices_stored_head_to_foot:
        field = field[:, ::-1] * np.array([-1.0, 1.0, 1.0], dtype=field.dtype).reshape(3, 1, 1, 1)
    return np.ascontiguousarray(field)


def has_tissue(reference: np.ndarray) -> bool:
    """Whether ``engine.alignment_guard.tissue_mask`` finds any tissue in ``reference`` ([0, 1]
    intensities): epe_tissue is the end-point error there, undefined on a blank reference."""
    return bool(tissue_mask(reference).any())


def input_warnings(reference: ImageVolume, moving: ImageVolume) -> list[str]:
    """What ``unifuse fuse`` warns of this reference and moving image as read: where a picture's
    place in space is a guess, how little of the reference grid the moving image reaches, what the
    readers noted (an ignored alpha channel, ...), one file given as both, a constant image. An
    InputError for a moving image that reaches none of the reference grid, which fuse refuses."""
    return [*picture_placement_warnings(reference, moving), *overlap_warnings(reference, moving),
            *reader_and_content_warnings(reference, moving)]


def refuse_repeated_pairs(numbered: list[tuple[int, CsvRow]], path: Path) -> None:
    """Raise an InputError naming the lines where one pair (the same reference, moving and label
    files) is listed again: it would count twice in the means and in the Wilcoxon tests, which
    assume independent pairs. A moving image with another reference or label is another pair."""
    lines_of: dict[tuple[Path, ...], list[int]] = {}
    for line, row in numbered:
        files = tuple((path.parent / (row[column] or "")).resolve() for column in PAIRS_REQUIRED_COLUMNS)
        lines_of.setdefault(files, []).append(line)
    repeated = [lines for lines in lines_of.values() if len(lines) > 1]
    if repeated:
        listed = "; ".join("lines " + ", ".join(map(str, lines)) for lines in repeated)
        raise InputError(f"the same pair (reference, moving and label files) is listed more than once ({listed}): it "
                         "would count that many times in the means and the pair-by-pair tests; keep one row of each",
                         path)


def csv_pair_names(moving_paths: list[tuple[int, str]]) -> list[str]:
    """The name of each CSV pair in the tables, from its (CSV line number, moving path): the moving
    path as the CSV gives it, relative to the CSV's folder, so that pairs in different folders with
    the same file name (``unifuse synth --pairs`` writes OUT/0000/moving.png, OUT/0001/moving.png)
    stay apart; a moving image listed on several lines gets its line number too."""
    paths = [Path(moving).as_posix() for _, moving in moving_paths]
    counts = Counter(paths)
    return [f"{path} (line {line})" if counts[path] > 1 else path
            for path, (line, _) in zip(paths, moving_paths, strict=True)]


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class HarvardSplit:
    """Which atlas cases are validation: ``training.harvard.split_cases`` with these arguments, over
    the pairs of ``tasks``. The split balances every task folder it is drawn over, so it depends on
    them: a subset of tasks is taken from the split of the whole set, or ``--tasks CT`` would score
    CT cases the checkpoint trained on."""

    val_fraction: float
    seed: int
    source: str  # where the values came from, for the report
    tasks: tuple[str, ...] = tuple(HARVARD_TASKS)  # task folders, as training.harvard names them
    # The checkpoint's metadata: the cases its run recorded on each side (training.harvard.recorded_split),
    # which another copy of the atlas (a case more or less) would split otherwise.
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)


DEFAULT_SPLIT_SOURCE = "the dataset defaults"
TRAINED_SPLIT_SOURCE = "the checkpoint's training config"
SPLIT_OPTIONS = "--val-fraction/--split-seed"  # the source of a split the user asked for


def checkpoint_split(metadata: dict[str, Any], val_fraction: float | None, seed: int | None) -> HarvardSplit:
    """The split the checkpoint was trained with, so that its validation cases are never ones it
    trained on; ``val_fraction``/``seed`` override it (the report then says so)."""
    data = (metadata.get("training_config") or {}).get("data") or {}
    trained_on_harvard = data.get("kind") == "harvard"
    tasks = tuple(data.get("tasks") or HARVARD_TASKS) if trained_on_harvard else tuple(HARVARD_TASKS)
    trained = HarvardSplit(float(data.get("val_fraction", DEFAULT_VAL_FRACTION)), int(data.get("split_seed", 0)),
                           TRAINED_SPLIT_SOURCE if trained_on_harvard else DEFAULT_SPLIT_SOURCE, tasks,
                           metadata)
    if val_fraction is None and seed is None:
        return trained
    chosen = HarvardSplit(trained.val_fraction if val_fraction is None else val_fraction,
                          trained.seed if seed is None else seed, SPLIT_OPTIONS, tasks, metadata)
    if trained_on_harvard and (chosen.val_fraction, chosen.seed) != (trained.val_fraction, trained.seed):
        consequence = ("the cases it recorded for training are left out of another split's validation pairs"
                       if RECORDED_SPLIT_KEY in metadata else "another split can put cases it trained on into validation")
        print(f"warning: the checkpoint was trained with val_fraction {trained.val_fraction}, split seed "
              f"{trained.seed}; {consequence}")
    return chosen


def pairs_from_harvard(root: Path, split: str, tasks: list[str], limit: int | None, *, seed: int,
                       size: int | None, none_fraction: float, cases: HarvardSplit,
                       regime: str) -> list[EvaluationPair]:
    """The Harvard split as training sees it, misaligned in one regime (``data.misalign``); images
    are handed over as the 8-bit PNGs they are. ``tasks`` are drawn from the split over
    ``cases.tasks`` that ``root`` holds (and any task asked for beyond them), with the draws of that
    whole set: a pair is the same whichever of its companions are asked for."""
    from napari_unifuse.training.datasets import build_datasets

    folders = []
    # A task by its short name (CT) or by its folder's (CT-MRI), as the outputs name it.
    by_name = {**HARVARD_TASK_FOLDERS, **{folder.upper(): folder for folder in HARVARD_TASK_FOLDERS.values()}}
    for task in tasks:
        if task.upper() not in by_name:
            raise InputError(f"unknown Harvard task {task!r}; choose from {', '.join(HARVARD_TASK_FOLDERS)} "
                             f"(or {', '.join(HARVARD_TASK_FOLDERS.values())})", "--tasks")
        folders.append(by_name[task.upper()])
    missing = [task for task in cases.tasks
               if not all((Path(root) / task / folder).is_dir() for folder in HARVARD_TASKS[task][:2])]
    if missing and cases.source != DEFAULT_SPLIT_SOURCE:
        print(f"warning: {root} has no {', '.join(missing)}: the case split over the other tasks can differ from "
              "the checkpoint's and put cases it trained on into validation")
    split_tasks = [task for task in cases.tasks if task not in missing]
    data = {"kind": "harvard", "root": str(root), "tasks": list(dict.fromkeys([*split_tasks, *folders])),
            "none_fraction": none_fraction,
            "val_fraction": cases.val_fraction, "split_seed": cases.seed, "misalignment": {"regime": regime}}
    if size:
        data["size"] = size
    # One pair at a time: pairs of several sizes need no common size here.
    train, validation = build_datasets(data, seed=seed, spatial_dims=2, batched=False)
    dataset = validation if split == "val" else train
    left_out = _cases_recorded_on_the_other_side(cases, train.pairs, validation.pairs, split)
    taken: dict[str, int] = {}
    pairs = []
    for index, source in enumerate(dataset.pairs):
        if source.task not in folders or source.case in left_out or (
                limit is not None and taken.get(source.task, 0) >= limit):
            continue
        taken[source.task] = taken.get(source.task, 0) + 1
        sample = dataset[index]
        # The atlas' PNGs carry no spacing: 1 mm pixels at their native 256², as training takes them
        # (a --size of 128 makes them 2 mm), so that the metrics in mm and the registrations agree with it.
        # The clean pair is read, not drawn: the generator goes unused.
        geometry = classical.grid_geometry(dataset.clean_pair(index, np.random.default_rng(0)).spacing, 2)
        moving_luma = sample["moving"][0].numpy()
        is_colour = bool(sample["is_color"])
        if is_colour:
            moving_array = _to_uint8(ycbcr_to_rgb(np.stack([moving_luma, *sample["cbcr"].numpy()], axis=-1)))
        else:
            moving_array = _to_uint8(moving_luma)
        pairs.append(EvaluationPair(
            name=f"{source.task}/{source.pair_id}",
            task=source.task,
            reference=ImageVolume(_to_uint8(sample["reference"][0].numpy()), geometry),
            moving=ImageVolume(moving_array, geometry, is_rgb=is_colour),
            label=sample["label"][0].numpy().astype(np.float32),
            displacement=sample["displacement"].numpy(),
            degradation=DEGRADATION_CLASSES[int(sample["class_index"])],
            moving_modality=source.modality,
        ))
    if not pairs:
        raise InputError(f"no pairs in the {split} split for tasks {', '.join(tasks)}", root)
    return pairs


def _cases_recorded_on_the_other_side(cases: HarvardSplit, train: list, validation: list, split: str) -> set[int]:
    """The cases the split drawn here (``cases``: over this copy of the atlas, or with other
    --val-fraction/--split-seed) puts on the ``split`` side that the checkpoint's run recorded on the
    other (a training case scored as validation would flatter it), said on stdout with the cases it
    recorded on that side that this split puts on the other, which are then not scored. Nothing where
    the checkpoint recorded no split (earlier versions, other data)."""
    recorded = recorded_split(cases.checkpoint, [*train, *validation])
    if recorded is None:
        if cases.source == TRAINED_SPLIT_SOURCE:
            # Checkpoints written before 2026-12-07 recorded the split's parameters, not its cases.
            print("warning: the checkpoint records no case split (its run's split.json lists them): its validation "
                  "cases are drawn again over this copy of the atlas, which gives its run's only on the copy it was "
                  "trained on")
        return set()
    asked, other = (recorded.validation, recorded.train) if split == "val" else (recorded.train, recorded.validation)
    chosen = {pair.case for pair in (validation if split == "val" else train)}
    left_out, missed = {pair.case for pair in other} & chosen, {pair.case for pair in asked} - chosen
    sides = {"val": "validation", "train": "training"}
    other_side = sides["train" if split == "val" else "val"]

    def named(found: set[int]) -> str:
        return f"case{'s' if len(found) > 1 else ''} {', '.join(map(str, sorted(found)))}"

    overridden = cases.source == SPLIT_OPTIONS
    drawn_by = f"the split drawn with {SPLIT_OPTIONS}" if overridden else "this copy of the atlas's split"
    remedy = (f"leave out {SPLIT_OPTIONS} to score the checkpoint's own" if overridden
              else "evaluate on the copy the checkpoint was trained on")
    if left_out:
        print(f"warning: {drawn_by} puts {named(left_out)} into {sides[split]}, but the checkpoint's "
              f"run had {'them' if len(left_out) > 1 else 'it'} for {other_side}: left out")
    if missed:
        print(f"warning: {named(missed)}, which the checkpoint's run held for {sides[split]}, {drawn_by} "
              f"puts into {other_side}: not scored ({remedy})")
    return left_out


# ---- scoring -------------------------------------------------------------------------------------
def _degradation(name: str | None, path: Path, line: int) -> str | None:
    """The true degradation class line ``line`` of the CSV at ``path`` names, if any."""
    if not name:
        return None
    if name not in DEGRADATION_CLASSES:
        lower_case = f" ({name.lower()!r}: the names are lower case)" if name.lower() in DEGRADATION_CLASSES else ""
        raise InputError(f"line {line} of the CSV: unknown degradation {name!r}; choose from "
                         f"{', '.join(DEGRADATION_CLASSES)}{lower_case}", path)
    return name


def score(aligned: np.ndarray, displacement: np.ndarray, fused: np.ndarray, reference: np.ndarray,
          pair: EvaluationPair, seconds: float, predicted_class: str | None = None,
          warped_input: np.ndarray | None = None) -> dict[str, float]:
    """Every column of ``METRIC_COLUMNS``, in that order, for one method on one pair.

    ``warped_input``: the degraded moving image warped by the method's own field, for a method that
    restores (its ``aligned`` is then the restored image); the restoration columns are NaN without it.
    """
    values = registration_metrics(aligned, pair.label)
    regularity = jacobian_regularity(jacobian_determinant(displacement))
    values["folding_pct"], values["sdlogj"] = regularity.folding_percentage, regularity.sd_log_jacobian
    values.update(field_errors(displacement, pair, reference))
    restores = warped_input is not None
    values["restored_ssim"] = values["ssim"] if restores else float("nan")
    values["warped_input_ssim"] = registration_metrics(warped_input, pair.label)["ssim"] if restores else float("nan")
    fused = fused.astype(np.float32)
    values.update(fusion_metrics(fused, reference, pair.label))

    def where_it_fits(metric: Callable[..., Any]) -> Any:
        """The metric, or None on slices smaller than its windows (a small pair is scored on the
        metrics that apply, as fusion_metrics does, rather than stopping the evaluation)."""
        return metric(fused, reference, pair.label) if min(fused.shape[-2:]) >= metric.min_side else None

    gains = where_it_fits(ssim_gains)
    values.update(gain_ref=gains.a if gains else math.nan, gain_mov=gains.b if gains else math.nan,
                  gain_min=gains.minimum if gains else math.nan)
    for column, metric in (("Q_CB", q_cb), ("VIF_F", vif_f)):
        value = where_it_fits(metric)
        values[column] = math.nan if value is None else value
    values[BONE_COLUMN] = bone_retention(fused, pair.label) if pair.moving_modality == "ct" else float("nan")
    values[CLASS_COLUMN] = (float(predicted_class == pair.degradation)
                            if predicted_class is not None and pair.degradation is not None
                            else float("nan"))
    values[TIME_COLUMN] = seconds
    return {column: values[column] for column in METRIC_COLUMNS}


def field_errors(displacement: np.ndarray, pair: EvaluationPair, reference: np.ndarray) -> dict[str, float]:
    """The end-point errors of ``displacement`` against the pair's true field: over the grid
    (``epe``) and the reference's tissue (``epe_tissue``), in voxels and in mm (``_mm``, by the
    reference's spacing along each axis, in the world axis order both fields are in); NaN without
    a true field, and over the tissue of a reference without tissue (pairs_from_csv warns of it);
    in mm NaN too where the reference has no pixel size (``EvaluationPair.spacing_in_mm``): a
    picture's "mm" would be its pixels, beside Harvard pairs in true mm (the atlas' spacing)."""
    errors = dict.fromkeys(("epe", "epe_tissue", "epe_mm", "epe_tissue_mm"), float("nan"))
    if pair.displacement is None:
        return errors
    tissue = tissue_mask(reference)
    in_mm = (("_mm", pair.reference.geometry.spacing),) if pair.spacing_in_mm else ()
    for suffix, spacing in (("", None), *in_mm):
        errors[f"epe{suffix}"] = end_point_error(displacement, pair.displacement, spacing=spacing)
        if tissue.any():
            errors[f"epe_tissue{suffix}"] = end_point_error(displacement, pair.displacement, tissue, spacing)
    return errors


def copy_registration(registrations: list[str]) -> str:
    """The registration the copy pipelines use: ``COPY_REGISTRATION`` if evaluated, else identity."""
    return COPY_REGISTRATION if COPY_REGISTRATION in registrations else "identity"


def aligned_unit_luma(result: FusionResult) -> np.ndarray:
    """A run's restored, aligned moving image in the [0, 1] units the metrics take: the luma of an
    RGB result, else the moving image's intensity mapping applied to it."""
    if result.aligned.is_rgb:
        return rgb_to_ycbcr(result.aligned.array)[..., 0]
    mapping = IntensityMapping.from_dict(result.provenance["intensity_mappings"]["moving"])
    return mapping.apply(result.aligned.array)


def engine_scores(engine: FusionEngine, pair: EvaluationPair, reference: np.ndarray,
                  moving_unit: np.ndarray) -> dict[str, float]:
    """One engine method's row: its fused and aligned outputs in [0, 1] units; the restoration
    columns for a method that restores; class accuracy for one that estimates the degradation."""
    start = time.perf_counter()
    # No quality maps: nothing here scores them, and they cost a classical pipeline's time many times over.
    result = engine.run_fusion(pair.reference, pair.moving, quality=False)
    seconds = time.perf_counter() - start
    fused = result.fused.array
    fused = rgb_to_ycbcr(fused)[..., 0] if result.fused.is_rgb else fused
    aligned = aligned_unit_luma(result)
    warped_input = warp_array(moving_unit, result.displacement) if engine.method.restores else None
    predicted = result.predicted_class if result.class_probs else None
    return score(aligned, result.displacement, fused, reference, pair, seconds, predicted, warped_input)


def failed_scores(pair: EvaluationPair, method: str, error: RegistrationError) -> dict[str, float]:
    """The row of a method whose registration failed on this pair: every metric NaN, so that the
    means and the pair-by-pair tests leave the pair out for that method, and the run goes on."""
    print(f"  {pair.name}: {method}: {error}", file=sys.stderr, flush=True)
    return dict.fromkeys(METRIC_COLUMNS, float("nan"))


def evaluate_pair(pair: EvaluationPair, engine: FusionEngine | None, registrations: list[str],
                  rules: list[str], methods: dict[str, FusionEngine] | None = None,
                  ) -> Iterator[tuple[str, dict[str, float]]]:
    """(method, metrics) for UniFuse (when an engine is given), each engine method of ``methods``
    (row name -> engine), each registration × rule, then the copy pipelines on
    ``copy_registration(registrations)``."""
    reference, _ = unit_intensities(pair.reference)
    moving_unit, _ = unit_intensities(pair.moving)
    geometry = pair.reference.geometry
    if not pair.moving.on_grid_of(pair.reference):
        moving_unit = resample_to_reference(
            ImageVolume(moving_unit, pair.moving.geometry), pair.reference).array.astype(np.float32)
    engines = ({UNIFUSE_METHOD: engine} if engine is not None else {}) | (methods or {})
    for name, method_engine in engines.items():
        try:
            yield name, engine_scores(method_engine, pair, reference, moving_unit)
        except RegistrationError as error:
            yield name, failed_scores(pair, name, error)
    # The classical registrations see the reference as the engine's alignment estimates do: the
    # uncovered reference's tissue, against the moving image's zeros, drew the covered slab into it.
    reference_seen = within_field_of_view(reference, moving_field_of_view(pair.moving, pair.reference))
    registered = {}
    for method in registrations:
        try:
            registration = registered[method] = classical.register(method, reference_seen, moving_unit, geometry)
        except RegistrationError as error:
            for rule in rules:
                yield f"{method} + {rule}", failed_scores(pair, f"{method} + {rule}", error)
            continue
        for rule in rules:
            start = time.perf_counter()
            fused = classical.fuse_classical(rule, reference, registration.aligned)
            seconds = registration.seconds + time.perf_counter() - start
            yield f"{method} + {rule}", score(registration.aligned, registration.displacement, fused, reference,
                                              pair, seconds)
    copies_on = copy_registration(registrations)
    registration = (registered[copies_on] if copies_on in registered
                    else classical.register(copies_on, reference_seen, moving_unit, geometry))
    for rule, fused in zip(COPY_RULES, (reference, registration.aligned), strict=True):
        yield f"{copies_on} + {rule}", score(registration.aligned, registration.displacement, fused, reference,
                                             pair, registration.seconds)


@dataclasses.dataclass(frozen=True)
class PairOutcome:
    """One pair's scores in one regime: (row name, metrics) per method, or the error it failed with."""

    regime: str
    pair: EvaluationPair
    scores: list[tuple[str, dict[str, float]]]
    error: str | None = None

    def record(self, method: str, values: dict[str, Any]) -> dict[str, Any]:
        """A row of per_pair.csv: the pair, the method and ``values``."""
        return {"regime": self.regime, "pair": self.pair.name, "task": self.pair.task, "method": method, **values}


def per_pair_records(outcomes: list[PairOutcome]) -> list[dict]:
    """The rows of per_pair.csv, pair by pair. A failed pair has a row of every method the other
    pairs have, all NaN (left out of the means and tests, as a failed registration is), with its
    error in an ``error`` column; that column is there only when a pair failed, so the files of
    an evaluation without failures stay as they were. A UniFuseError when every pair failed."""
    methods = list(dict.fromkeys(method for outcome in outcomes for method, _ in outcome.scores))
    if not methods:
        raise UniFuseError(f"every one of the {len(outcomes)} pairs failed (the errors are above); nothing was written")
    failed = any(outcome.error is not None for outcome in outcomes)
    records = []
    for outcome in outcomes:
        if outcome.error is None:
            records += [outcome.record(method, {**values, **({"error": ""} if failed else {})})
                        for method, values in outcome.scores]
        else:
            records += [outcome.record(method, {**dict.fromkeys(METRIC_COLUMNS, float("nan")), "error": outcome.error})
                        for method in methods]
    return records


def summarise(records: list[dict]) -> list[dict]:
    """Mean and std per (method, task) and per method over all tasks, in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["task"]), []).append(record)
        groups.setdefault((record["method"], ALL_TASKS), []).append(record)
    tasks = {task for _, task in groups if task != ALL_TASKS}
    summary = []
    for (method, task), members in groups.items():
        if task == ALL_TASKS and len(tasks) == 1:
            continue  # one task: the "all" row would repeat it
        row = {"method": method, "task": task, "n": len(members)}
        for column in METRIC_COLUMNS:
            values = np.array([member[column] for member in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            row[f"{column}_mean"] = float(finite.mean()) if finite.size else float("nan")
            row[f"{column}_std"] = float(finite.std()) if finite.size else float("nan")
            # Undefined values (bone retention of a pair without bone, a failed registration) are
            # left out of the mean: say over how many pairs it is, where that is fewer than n.
            row[f"{column}_n"] = int(finite.size)
        summary.append(row)
    return sorted(summary, key=lambda row: (row["task"] == ALL_TASKS, row["task"]))


def rounding_ties(ours: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Where two methods' values of a metric on the same pairs are equal but for float rounding.

    The metrics are computed from float32 images and fields, whose resolution is about 1.2e-7 of
    the value: two values closer than ``TIE_RTOL`` of the larger (a few float32 steps) are one
    result reached by two computations (the same identity alignment scored through the engine and
    through the classical baseline differs by 1e-9 in NCC), not a difference; ``TIE_ATOL`` does
    the same for values at zero, where a relative tolerance vanishes.
    """
    return np.abs(ours - others) <= TIE_ATOL + TIE_RTOL * np.maximum(np.abs(ours), np.abs(others))


def paired_comparison(records: list[dict], method: str, columns: tuple[str, ...] = PAIRED_COLUMNS) -> list[dict]:
    """``method`` against every other method on the same pairs, per task.

    For each metric: the mean difference (``method`` minus the other), on how many pairs
    ``method`` is the better one (its wins; lower is better for the error columns), and the
    two-sided Wilcoxon signed-rank p-value of the differences (``scipy.stats.wilcoxon``; 1 when
    they are all zero). Pair-by-pair, so that a claim of "better" does not rest on means whose
    spread overlaps. Values equal but for float rounding (``rounding_ties``) are ties: their
    difference counts as 0, a win for neither, and drops out of the test as a zero difference.
    """
    from scipy.stats import wilcoxon

    values: dict[tuple[str, str, str], dict] = {}
    for record in records:
        key = record["task"], record["method"], record["pair"]
        if key in values:  # one would silently replace the other, and the tests run on fewer pairs
            raise ValueError(f"two records of {key[1]} on the pair {key[2]!r} ({key[0]}): pair names must be unique")
        values[key] = record
    rows = []
    for task in dict.fromkeys(record["task"] for record in records):
        ours = {pair: record for (t, m, pair), record in values.items() if t == task and m == method}
        others = dict.fromkeys(m for (t, m, _) in values if t == task and m != method)
        for other in others:
            row: dict[str, Any] = {"task": task, "method": method, "versus": other}
            for column in columns:
                shared = [pair for pair in ours if (task, other, pair) in values]
                our_values = np.array([ours[pair][column] for pair in shared], dtype=np.float64)
                other_values = np.array([values[task, other, pair][column] for pair in shared], dtype=np.float64)
                defined = np.isfinite(our_values) & np.isfinite(other_values)
                our_values, other_values = our_values[defined], other_values[defined]
                differences = np.where(rounding_ties(our_values, other_values), 0.0, our_values - other_values)
                better = -differences if column in LOWER_IS_BETTER else differences
                row[f"{column}_diff"] = float(differences.mean()) if differences.size else float("nan")
                row[f"{column}_wins"] = int((better > 0).sum())
                row[f"{column}_n"] = int(differences.size)
                row[f"{column}_p"] = (float("nan") if not differences.size else 1.0 if not differences.any()
                                      else float(wilcoxon(differences).pvalue))
            rows.append(row)
    return rows


def paired_markdown(rows: list[dict], columns: tuple[str, ...] = PAIRED_COLUMNS) -> str:
    lines = ["| task | versus | " + " | ".join(f"{c}: Δ, wins, p" for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{row[f'{c}_diff']:+.3g}, {row[f'{c}_wins']}/{row[f'{c}_n']}, {row[f'{c}_p']:.2g}"
                 if row[f"{c}_n"] else "n/a" for c in columns]
        lines.append(f"| {row['task']} | {row['versus']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAIRED_SECTION_TITLE = " against each pipeline, pair by pair"


def paired_section(method: str, rows: list[dict], columns: tuple[str, ...] = PAIRED_COLUMNS) -> str:
    """The report's section of ``paired_comparison(records, method, columns)``: title, what Δ,
    wins and p are, and the table."""
    lower = " and ".join(column for column in columns if column in LOWER_IS_BETTER)
    return (f"### {method}{PAIRED_SECTION_TITLE}\n\nΔ: mean of {method} minus the other; wins: pairs where "
            f"{method} is better" + (f" (lower {lower})" if lower else "")
            + f" by more than float rounding (relative {TIE_RTOL:g}: the metrics come from float32 images), "
            "closer values being ties, a win for neither; p: two-sided Wilcoxon signed-rank test of the "
            "differences, ties as zero.\n\n" + paired_markdown(rows, columns))


def scores_better(column: str, value: float, other: float) -> bool:
    """Whether ``value`` of ``column`` is better than ``other`` (``LOWER_IS_BETTER``); NaN never is."""
    return value < other if column in LOWER_IS_BETTER else value > other


def copies_outscoring_fusion(summary: list[dict], copies_on: str) -> dict[str, list[str]]:
    """The fusion columns on which a copy pipeline's mean beats a fusion rule of ``copies_on`` on a task.

    A copy fuses nothing: a metric that ranks it above any real fusion of the same aligned pair
    (``<copies_on> + max``, ``+ average``, ``+ wavelet``, those evaluated) rewards not fusing.
    Returns ``{column: ["task: copy rule beats rule/rule", ...]}`` in ``FUSION_COLUMNS`` order
    (direction: ``LOWER_IS_BETTER``); NaN on either side compares as not better. Empty without a
    fusion rule on ``copies_on``.
    """
    means = {(row["task"], row["method"]): row for row in summary if row["task"] != ALL_TASKS}
    fooled: dict[str, list[str]] = {}
    for column in FUSION_COLUMNS:
        for task in dict.fromkeys(task for task, _ in means):
            fusion_values = {rule: means[task, f"{copies_on} + {rule}"][f"{column}_mean"]
                             for rule in FUSION_RULES if (task, f"{copies_on} + {rule}") in means}
            for copy_rule in COPY_RULES:
                if (task, f"{copies_on} + {copy_rule}") not in means:
                    continue
                copy_value = means[task, f"{copies_on} + {copy_rule}"][f"{column}_mean"]
                beaten = [rule for rule, fusion_value in fusion_values.items()
                          if scores_better(column, copy_value, fusion_value)]
                if beaten:
                    fooled.setdefault(column, []).append(f"{task}: {copy_rule} beats {'/'.join(beaten)}")
    return fooled


def fooled_markdown(fooled: dict[str, list[str]], summary: list[dict], copies_on: str,
                    registrations: Collection[str], rules: Collection[str]) -> str:
    """The sentence under a regime's table that names the metrics a copy fools, or, where the check
    cannot run, what to add to the command (``registrations``, ``rules``: those it was given)."""
    fusions = [f"`{copies_on} + {rule}`" for rule in FUSION_RULES
               if any(row["method"] == f"{copies_on} + {rule}" for row in summary)]
    if not fusions:
        # The copies' registration computed for them alone is not fused with the rules: that would
        # add rows (and pair-by-pair tests) nobody asked for.
        missing = ([f"add `{COPY_REGISTRATION}` or `identity` to --baselines"] if copies_on not in registrations
                   else []) + ([f"give --fusion-rules any of {', '.join(FUSION_RULES)}"] if not rules else [])
        compared = f"Copy check skipped: it compares the copies with a fusion of the same aligned pair (`{copies_on} + <rule>`)"
        if not missing:  # the command asked for that fusion: each of this regime's pairs failed it
            return f"{compared}, but no pair of this regime was scored with one (see Failed pairs).\n"
        return f"{compared}, which this run does not compute; {' and '.join(missing)} to run it.\n"
    if not fooled:
        return f"No metric scores a copy pipeline above {' or '.join(fusions)} on any task.\n"
    listed = "; ".join(f"{column} ({', '.join(where)})" for column, where in fooled.items())
    return (f"{FOOLED_MARK} fooled by a copy: `{copies_on} + copy-reference` or `{copies_on} + copy-moving`, "
            f"which fuse nothing, score better than a fusion of the same aligned pair, {' or '.join(fusions)}, on "
            f"{listed}.\n")


def markdown_table(summary: list[dict], fooled: Collection[str] = ()) -> str:
    """Mean ± std per method and task; columns in ``fooled`` are marked with ``FOOLED_MARK``."""
    columns = [column for column in METRIC_COLUMNS
               if any(np.isfinite(row[f"{column}_mean"]) for row in summary)]
    names = [f"{column} {FOOLED_MARK}" if column in fooled else column for column in columns]
    lines = ["| method | task | n | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for row in summary:
        cells = [f"{row[f'{c}_mean']:.4g} ± {row[f'{c}_std']:.2g}"
                 + (f" (n={row[f'{c}_n']})" if row[f"{c}_n"] < row["n"] else "")
                 if np.isfinite(row[f"{c}_mean"]) else "n/a" for c in columns]
        lines.append(f"| {row['method']} | {row['task']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, writers: dict[str, Callable[[Path], object]], lock: FolderLock) -> None:
    """Write the result files (name -> what writes that file) together
    (``engine.outputs.write_files_together``): only once all are written do they move in, and
    only then go the earlier results this run does not produce (paired.csv of a run with other
    methods); a failed write (a full disk) is one line, the earlier results whole. ``lock``: the
    run's held ``output_folder_lock`` of ``out``."""
    def remove_results_not_produced() -> None:
        for name in RESULT_FILES:
            if name not in writers:
                (out / name).unlink(missing_ok=True)

    write_files_together(out, writers, before_moving=remove_results_not_produced, lock=lock)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---- command -------------------------------------------------------------------------------------
def _names(text: str, known: tuple[str, ...], option: str) -> list[str]:
    # Once each: a repeated name would give two records of one row per pair, which the pair-by-pair
    # comparison refuses only after every pair has been computed.
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise InputError(f"unknown {unknown}; choose from {', '.join(known)}", option)
    return names


def row_name(method: str, checkpoint: str | Path | None) -> str:
    """A method's row name: with the stem of its checkpoint when one is given, so that rows of
    other weights are never read as those of the bundled ones; a training run's checkpoint
    (``RUN/checkpoints/last.safetensors``) is named with its run, ``RUN/last``, since every run's
    files share those stems."""
    if not checkpoint:
        return method
    path = Path(str(checkpoint))
    stem = f"{path.parent.parent.name}/{path.stem}" if path.parent.name == CHECKPOINTS_FOLDER else path.stem
    return f"{method} ({stem})"


def refuse_unusable_out(out: Path, overwrite: bool, inputs: Collection[Path] = ()) -> None:
    """Checked before any pair is computed: ``out`` must be a folder where no result file would
    replace one of ``inputs`` (the pairs CSV, even with ``overwrite``), and one without an earlier
    evaluation's results unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError("is a file; --out takes a folder for evaluation.csv/.md and per_pair.csv", out)
    # Before the earlier-results check: an input there is no earlier evaluation's result. same_file
    # is fuse's test of "no output may replace an input" (by path, link or hard link).
    for source in inputs:
        for name in RESULT_FILES:
            if same_file(out / name, source):
                raise InputError(f"this input sits where the {name} output goes and would be replaced; write the "
                                 "outputs to another folder", source)
    earlier = [name for name in RESULT_FILES if (out / name).exists()]
    if earlier and not overwrite:
        raise InputError(f"holds the results of an earlier evaluation ({', '.join(earlier)}); pass --overwrite "
                         "to replace them, or choose another --out", out)


def refuse_other_methods_checkpoint(checkpoint: str) -> None:
    """``--checkpoint`` is UniFuse's: another method's checkpoint would be scored and reported as
    UniFuse."""
    found = checkpoint_method(checkpoint)
    if found != DEFAULT_METHOD:  # "unifuse", what a UniFuse checkpoint records
        raise InputError(f"{checkpoint} holds {found} weights, not UniFuse ones; evaluate it with "
                         f"--methods {found}={checkpoint}", "--checkpoint")


def method_option(build: Callable[[], Any]) -> Any:
    """``build()``, its InputError about the method's name or its checkpoint said of ``--methods``,
    this command's option, not fuse's ``--method`` or ``--checkpoint``; a checkpoint's own error
    names the file and stays as it is."""
    try:
        return build()
    except InputError as error:
        if error.source not in ("--method", "--checkpoint"):
            raise
        raise InputError(error.problem, "--methods") from error


def guard_options(args: argparse.Namespace) -> dict[str, bool | None]:
    """The alignment guard's options of every engine (``FusionEngine``'s ``weigh_network_field``,
    ``weigh_dense_refinement``): True where the flag asks for it, else None, the checkpoint's own
    choice. The engine applies them to a method that refines its alignment (UniFuse) only."""
    return {"weigh_network_field": True if args.weigh_network_field else None,
            "weigh_dense_refinement": True if args.weigh_dense_refinement else None}


def guard_options_note(args: argparse.Namespace, refining_rows: list[str]) -> str:
    """The report's sentence on the guard flags given ("" without any): the rows of a method that
    refines its alignment (``refining_rows``), which they apply to, or that no row takes them."""
    given = [f"`--{name.replace('_', '-')}`" for name, value in guard_options(args).items() if value]
    if not given:
        return ""
    if not refining_rows:
        return (f" {' and '.join(given)} given, but no method evaluated refines its alignment (UniFuse does), "
                f"so {'they change' if len(given) > 1 else 'it changes'} nothing.")
    return f" {' and '.join(given)} given: applied to {', '.join(f'`{row}`' for row in refining_rows)}."


def method_engines(entries: list[str], dimensions: dict[int, str | None], device: str, tile_size: int | None,
                   guard: dict[str, bool | None]) -> tuple[dict[str, dict[int, FusionEngine]], dict[str, str]]:
    """The engines of the ``--methods`` entries (``NAME[=CHECKPOINT]``), each built for every
    dimensionality of the pairs as ``unifuse fuse`` builds it for a pair (``model_dimensions``): a
    classical pipeline scores a 3D pair in 3D, the bundled UniFuse with its 3D checkpoint.

    ``dimensions``: ndim -> the first pair of that dimensionality, named when a method cannot take
    it (a 2D-only method and a 3D pair: fuse's refusal, before any pair is computed). ``guard``:
    ``guard_options``, for the engines of a method that refines its alignment. Returns row
    name -> {ndim: engine}, and row name -> the checkpoint given, for the report's header.
    """
    methods: dict[str, dict[int, FusionEngine]] = {}
    checkpoints = {}
    for entry in entries:
        name, _, checkpoint = entry.partition("=")
        engines = {}
        for ndim, pair_name in dimensions.items():
            try:
                method = method_option(lambda: load_method(name, checkpoint=checkpoint or None, spatial_dims=ndim))
            except InputError as error:
                # A refusal of the method's dimensions names the pair; one of its checkpoint does not.
                of_the_method = error.source == "--methods" and getattr(error.__cause__, "source", None) == "--method"
                if pair_name is None or not of_the_method:
                    raise
                raise InputError(f"pair {pair_name}: {error.problem}", error.source) from error
            engines[ndim] = FusionEngine(method, device=device, tile_size=tile_size, **guard)
        if any(next(iter(others.values())).method.name == method.name for others in methods.values()):
            raise InputError(f"{method.name} is named twice; to compare two checkpoints of one method, "
                             "run evaluate once per checkpoint", "--methods")
        row = row_name(method.name, checkpoint)
        methods[row] = engines
        if checkpoint:
            checkpoints[row] = checkpoint
    return methods, checkpoints


def refuse_weights_scored_twice(engine: FusionEngine, row: str, methods: dict[str, dict[int, FusionEngine]]) -> None:
    """Refuse a ``--methods`` entry with the weights of ``--checkpoint`` (whose ``engine`` has the
    row ``row``): ``unifuse`` of the bundled checkpoint given to both, or one file given twice. Its
    rows would repeat ``row``'s, and its pair-by-pair table compare the method with itself; it is
    named twice, as a name given twice in ``--methods`` is."""
    weights = engine.checkpoint_info.get("sha256")
    for other, engines in methods.items():
        if weights is not None and any(each.checkpoint_info.get("sha256") == weights for each in engines.values()):
            raise InputError(f"{other} has the weights of --checkpoint {engine.checkpoint_name}, so they are named "
                             f"twice: its rows would repeat those of {row}; leave it out of --methods, or give it "
                             "other weights (NAME=CHECKPOINT)", "--methods")


def refuse_unusable_pairs(engines: list[FusionEngine], pairs: list[EvaluationPair]) -> None:
    """Refuse, before any pair is computed, a pair that one of the methods cannot take (a 3D pair
    for a 2D checkpoint, an image smaller than the network's minimum, ...), naming the pair: the
    run would otherwise stop there, after minutes of work on the pairs before it."""
    for engine in engines:
        for pair in pairs:
            try:
                engine.validate(pair.reference, pair.moving)
            except InputError as error:
                raise InputError(f"pair {pair.name}: {error.problem}", error.source) from error


def refuse_harvard_options_with_pairs(args: argparse.Namespace) -> None:
    """Raise an InputError naming the Harvard options given with ``--pairs``: left unread, ``--limit 1``
    would score every pair of the CSV, and ``--tasks XYZ`` pass, without a word."""
    given = [f"--{name.replace('_', '-')}" for name in HARVARD_DEFAULTS if getattr(args, name) is not None]
    if args.pairs is not None and given:
        options = ", ".join(given)
        raise InputError(f"{options} appl{'ies' if len(given) == 1 else 'y'} to --harvard only: --pairs scores every "
                         f"pair of its CSV, misaligned as it is; leave out {options}")


def with_harvard_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with each Harvard option that was not given at its default (``HARVARD_DEFAULTS``)."""
    defaults = {name: default for name, default in HARVARD_DEFAULTS.items() if getattr(args, name) is None}
    return argparse.Namespace(**{**vars(args), **defaults})


def _regimes(args: argparse.Namespace) -> list[str]:
    if args.pairs is not None:
        return [CSV_REGIME]
    return list(MISALIGNMENT_REGIMES) if args.misalignment == "all" else [args.misalignment]


def warnings_markdown(pairs: list[EvaluationPair]) -> str:
    """The report's list of what some pairs' scores should be read with, or "" when there is none."""
    lines = [f"- pair {pair.name}: {warning}\n" for pair in pairs for warning in pair.warnings]
    return "## Warnings\n\n" + "".join(lines) + "\n" if lines else ""


def failures_markdown(failures: list[PairOutcome]) -> str:
    """The report's list of the pairs that failed and why, or "" when none did."""
    if not failures:
        return ""
    lines = [f"- pair {outcome.pair.name} ({outcome.regime}): {outcome.error}\n" for outcome in failures]
    return ("## Failed pairs\n\nEvery metric of these pairs is NaN in per_pair.csv, whose `error` column says why; "
            "the means and the pair-by-pair tests leave them out.\n\n" + "".join(lines) + "\n")


def colour_note(pairs: list[EvaluationPair]) -> str:
    """The report's sentence on how colour pairs are scored, "" when no image of ``pairs`` is RGB."""
    if not any(pair.reference.is_rgb or pair.moving.is_rgb for pair in pairs):
        return ""
    return (" RGB images are scored on their BT.601 luma: an engine row's fused image on the luma of its RGB "
            "output, whose moving luma the engine first shifted to put its darkest value at 0; a classical row's "
            "on the moving luma as read (docs/evaluation.md).")


def regime_section(regime: str, summary: list[dict], records: list[dict], method_names: list[str],
                   copies_on: str, registrations: list[str], rules: list[str]) -> tuple[str, list[dict]]:
    """One regime's markdown (table, the metrics a copy fools, each engine method against every
    other row pair by pair) and its paired rows."""
    fooled = copies_outscoring_fusion(summary, copies_on)
    text = markdown_table(summary, fooled) + "\n" + fooled_markdown(fooled, summary, copies_on, registrations, rules)
    paired = []
    for method_name in method_names:
        rows = paired_comparison(records, method_name)
        if not rows:
            continue
        paired += rows
        text += "\n" + paired_section(method_name, rows)
    if regime != CSV_REGIME:
        text = f"## Misalignment: {regime}\n\n" + text
    return text, paired


def run(args: argparse.Namespace) -> int:
    if (args.pairs is None) == (args.harvard is None):
        raise InputError("give exactly one of --pairs CSV or --harvard ROOT", "--pairs/--harvard")
    refuse_harvard_options_with_pairs(args)
    args = with_harvard_defaults(args)
    if args.harvard is not None and not args.harvard.is_dir():
        raise InputError("Harvard data folder not found; --harvard takes the AANLIB folder (CT-MRI/, PET-MRI/, …)",
                         args.harvard)
    # Held from the earlier-results check to the written results: a second evaluation into --out
    # (hours long on Harvard) would otherwise pass that check and later replace this one's results.
    with output_folder_lock(args.out) as lock:
        return evaluate_into(args, lock)


def evaluate_into(args: argparse.Namespace, lock: FolderLock) -> int:
    """``run`` once the options are checked, holding ``lock``, the ``output_folder_lock`` of ``args.out``."""
    # Only the CSV can sit at a result's name: images, fields and checkpoints have other suffixes.
    refuse_unusable_out(args.out, args.overwrite, inputs=[args.pairs] if args.pairs is not None else [])
    # Now, not once every pair has been computed; nothing stays behind if the run is refused later.
    check_writable_folder(args.out, keep=False)
    regimes = _regimes(args)
    registrations = _names(args.baselines, REGISTRATION_METHODS, "--baselines")
    if "ants" in registrations and not classical.ants_available():
        print("note: ANTsPy (antspyx) is not installed; the ants baseline is skipped")
        registrations.remove("ants")
    rules = _names(args.fusion_rules, FUSION_RULES, "--fusion-rules")
    if args.checkpoint is None and not args.methods:
        raise InputError("nothing to evaluate; give a UniFuse checkpoint, other methods, or both",
                         "--checkpoint/--methods")
    method_name = row_name(UNIFUSE_METHOD, args.checkpoint)
    checkpoints = {}  # row name -> the checkpoint it was given, for the report's header
    if args.checkpoint is not None:
        refuse_other_methods_checkpoint(args.checkpoint)
        checkpoints[method_name] = args.checkpoint
    for entry in args.methods or []:  # a misspelt name, before any image is read
        method_option(lambda: split_name(entry.partition("=")[0]))
    csv_pairs = pairs_from_csv(args.pairs) if args.pairs is not None else []
    # The first pair of each dimensionality, to name in a refusal; Harvard pairs are 2D images.
    dimensions: dict[int, str | None] = {}
    for pair in csv_pairs:
        dimensions.setdefault(model_dimensions(pair.reference), pair.name)
    guard = guard_options(args)
    methods, method_checkpoints = method_engines(args.methods or [], dict(sorted(dimensions.items())) or {2: None},
                                                 args.device, args.tile_size, guard)
    checkpoints |= method_checkpoints
    engine = (FusionEngine(args.checkpoint, device=args.device, tile_size=args.tile_size, **guard)
              if args.checkpoint is not None else None)
    if engine is not None:
        refuse_weights_scored_twice(engine, method_name, methods)
    if args.pairs is not None:
        pairs_by_regime = {CSV_REGIME: csv_pairs}
        described = f"{len(csv_pairs)} pairs from {args.pairs}"
    else:
        # The split of the checkpoint (else of the first trained method): its validation cases.
        trained = [engines[2].method.checkpoint_metadata for engines in methods.values()
                   if engines[2].method.checkpoint]
        metadata = read_metadata(args.checkpoint) if args.checkpoint is not None else (trained or [{}])[0]
        cases = checkpoint_split(metadata, args.val_fraction, args.split_seed)
        pairs_by_regime = {regime: pairs_from_harvard(args.harvard, args.split, args.tasks.split(","), args.limit,
                                                      seed=args.seed, size=args.size,
                                                      none_fraction=args.none_fraction, cases=cases, regime=regime)
                           for regime in regimes}
        pairs = pairs_by_regime[regimes[0]]  # the same atlas pairs in every regime
        atlas_cases = sorted({(pair.task, case_of(pair.name.rsplit("/", 1)[1])) for pair in pairs})
        described = (f"{len(pairs)} Harvard {args.split} pairs (atlas cases "
                     f"{', '.join(f'{task} {case}' for task, case in atlas_cases)}; split by case with "
                     f"val_fraction {cases.val_fraction}, seed {cases.seed}, from {cases.source}), degraded and "
                     f"misaligned as synthesised with seed {args.seed} (--seed) and none_fraction "
                     f"{args.none_fraction:g} (--none-fraction), in the regime{'s' if len(regimes) > 1 else ''} "
                     f"{', '.join(regimes)}")
        print(described)
    method_names = ([method_name] if engine is not None else []) + list(methods)
    row_methods = {**({method_name: engine.method} if engine is not None else {}),
                   **{row: next(iter(engines.values())).method for row, engines in methods.items()}}
    refining_rows = [row for row, method in row_methods.items() if method.refines_alignment]
    guard_note = guard_options_note(args, refining_rows)
    if guard_note and not refining_rows:  # said at once too: the flags were given for nothing
        print(f"note:{guard_note}")
    every_pair = [pair for pairs in pairs_by_regime.values() for pair in pairs]
    for ndim in sorted({model_dimensions(pair.reference) for pair in every_pair}):
        refuse_unusable_pairs([*([engine] if engine is not None else []),
                               *(engines[ndim] for engines in methods.values())],
                              [pair for pair in every_pair if model_dimensions(pair.reference) == ndim])
    copies_on = copy_registration(registrations)

    outcomes = []
    for regime, pairs in pairs_by_regime.items():
        for number, pair in enumerate(pairs, start=1):
            prefix = f"[{regime} {number}/{len(pairs)}] {pair.name}"
            print(prefix, flush=True)
            ndim = model_dimensions(pair.reference)
            pair_methods = {row: engines[ndim] for row, engines in methods.items()}
            try:
                # The engine explains its own failed allocations; this is the rest: registrations, metrics.
                with out_of_memory_explained(lambda: "the computer ran out of memory while scoring this pair; close "
                                                     "other programs and run again, or evaluate smaller images"):
                    scores = [(method_name if method == UNIFUSE_METHOD else method, values) for method, values
                              in evaluate_pair(pair, engine, registrations, rules, pair_methods)]
            except UniFuseError as error:
                # One bad pair must not sink a long evaluation (nor the pairs already scored).
                print(f"{prefix}: error: {error}", file=sys.stderr, flush=True)
                outcomes.append(PairOutcome(regime, pair, [], str(error)))
                continue
            outcomes.append(PairOutcome(regime, pair, scores))
    records = per_pair_records(outcomes)
    failures = [outcome for outcome in outcomes if outcome.error is not None]

    sections, summary_rows, paired_rows = [], [], []
    for regime in regimes:
        regime_records = [record for record in records if record["regime"] == regime]
        summary = summarise(regime_records)
        section, paired = regime_section(regime, summary, regime_records, method_names, copies_on, registrations,
                                         rules)
        sections.append(section)
        summary_rows += [{"regime": regime, **row} for row in summary]
        paired_rows += [{"regime": regime, **row} for row in paired]
    weights = "".join(f" `{name}`: checkpoint {checkpoint}." for name, checkpoint in checkpoints.items())
    header = (f"# Evaluation of {', '.join(method_names)}\n\n"
              f"{described}; mean ± std (population std, ddof 0). Alignment (ncc, mse, ssim) "
              "vs the clean label; epe / epe_tissue: mean end-point error of the field (voxels) over the "
              "grid / over the reference's tissue, epe_mm / epe_tissue_mm the same in mm (by the reference's "
              "pixel size; NaN where the reference is a picture, a PNG or JPG, which has none); restored_ssim / "
              "warped_input_ssim: UniFuse's restored output / its degraded input warped by its own field, "
              "vs the label; fusion metrics vs (reference, label), gain_ref / gain_mov: SSIM to the "
              "reference / label beyond the other source's own, gain_min the smaller (0 for a copy of the "
              "reference or of the label; copy-moving copies the aligned, still degraded moving image, which "
              "scores above 0 where the degradation makes it resemble the reference more than the label does); "
              "classical pipelines (`<registration> + <rule>`) fuse their aligned, still degraded moving "
              "image, whose warp repeats the edge voxels where the field reads beyond the image; engine rows "
              "(UniFuse and `--methods`, `matching+average` included) read 0 there, as `unifuse fuse` does, "
              "so one field scores differently in the two near the image's edge; "
              f"`{copies_on} + copy-reference` and "
              f"`{copies_on} + copy-moving` fuse nothing (fused = reference, fused = aligned moving)."
              f"{colour_note(every_pair)}{weights}{guard_note}\n\n")
    report = header + warnings_markdown(csv_pairs) + failures_markdown(failures) + "\n".join(sections)
    writers = {"per_pair.csv": lambda path: write_csv(records, path),
               "evaluation.csv": lambda path: write_csv(summary_rows, path)}
    if paired_rows:
        writers["paired.csv"] = lambda path: write_csv(paired_rows, path)
    writers["evaluation.md"] = lambda path: path.write_text(report, encoding="utf-8")
    write_results(args.out, writers, lock)
    print(report)
    if failures:
        print(f"unifuse evaluate: {len(failures)} of {len(outcomes)} pairs failed (the errors are above and in "
              f"{args.out / 'evaluation.md'}); the means and tests leave them out", file=sys.stderr)
        return 2
    return 0


def held_out_fraction(text: str) -> float:
    """``--val-fraction``: above 0 and below 1. Both splits come from one split by atlas case that
    holds cases out for validation, so 0 (even for ``--split train``) or 1 is refused here, in this
    option's terms, not by training's check of ``data.val_fraction``."""
    return _fraction(text, lambda value: 0.0 < value < 1.0,
                     "must be above 0 and below 1, got {text}: it is the fraction of atlas cases held out as the val "
                     "split (--split train scores the others); give e.g. 0.15, or leave it out for the checkpoint's split")


def undegraded_fraction(text: str) -> float:
    """``--none-fraction``: from 0 to 1, refused here in this option's terms rather than by
    training's check of ``data.none_fraction`` after the checkpoint has loaded."""
    return _fraction(text, lambda value: 0.0 <= value <= 1.0,
                     "must be from 0 to 1, got {text}: it is the fraction of pairs left undegraded (1: clean pairs only)")


def _fraction(text: str, allowed: Callable[[float], bool], refusal: str) -> float:
    """``text`` as a number that ``allowed`` accepts (NaN never is), else argparse's usage error:
    ``refusal`` with the text given."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(refusal.format(text=text))
    return value

def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a checkpoint beside classical registration + fusion baselines",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One of them is needed ("nothing to evaluate" otherwise): the group's title says so in --help.
    methods = parser.add_argument_group("methods (one or both)")
    methods.add_argument("--checkpoint", help="UniFuse checkpoint (bundled name or .safetensors file); another "
                                              "method's goes to --methods NAME=CHECKPOINT")
    methods.add_argument("--methods", nargs="+", metavar="NAME[=CHECKPOINT]",
                        help="engine methods to evaluate too (engine.methods: bsafusion, mmif-amin, mmif-amin:sitk, "
                             "sitk+wavelet, ...), with their bundled weights unless =CHECKPOINT")
    source = parser.add_argument_group("pairs (one of)")
    source.add_argument("--pairs", type=user_path, help="CSV with columns reference,moving,label and optional displacement, "
                        "task, degradation (any other column, and a pair listed twice, is refused); label: the clean "
                        "moving image on the reference grid, in the moving image's units, not a segmentation")
    source.add_argument("--harvard", type=user_path, metavar="ROOT", help="Harvard AANLIB folder (CT-MRI/, PET-MRI/, …)")
    # Every default None (the value is HARVARD_DEFAULTS'): one given with --pairs is refused, not ignored.
    harvard = parser.add_argument_group("Harvard options", "with --harvard only; refused with --pairs")
    harvard.add_argument("--split", choices=("val", "train"),
                         help="which side of the case split to score (default: val)")
    harvard.add_argument("--tasks", help="comma-separated: CT, PET, SPECT (default: all three)")
    harvard.add_argument("--limit", type=positive_int, help="at most this many pairs per task")
    harvard.add_argument("--val-fraction", type=held_out_fraction,
                         help="split by atlas case with this validation fraction (default: the checkpoint's)")
    harvard.add_argument("--split-seed", type=non_negative_int,
                         help="seed of the case split, 0 or more (default: the checkpoint's)")
    harvard.add_argument("--size", type=positive_int, help="resize the images to SIZE² (as in training's data.size)")
    harvard.add_argument("--seed", type=non_negative_int,
                         help="seed of the synthesised degradations, 0 or more (default 0)")
    harvard.add_argument("--misalignment", choices=REGIME_CHOICES,
                         help="misalignment regime of the synthesised pairs, or all of them (default: all)")
    harvard.add_argument("--none-fraction", type=undegraded_fraction,
                         help="fraction of pairs left undegraded (default 0; training uses 0.2)")
    parser.add_argument("--baselines", default=",".join(REGISTRATION_METHODS),
                        help=f"classical registrations, comma-separated ({', '.join(REGISTRATION_METHODS)}; default: "
                             "all of them, so ANTs and dense run on every pair)")
    parser.add_argument("--fusion-rules", default=",".join(FUSION_RULES),
                        help=f"classical fusion rules, comma-separated ({', '.join(FUSION_RULES)}; default: all of "
                             "them)")
    parser.add_argument("--out", type=user_path, required=True, help="folder for evaluation.csv/.md and per_pair.csv")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in --out (refused otherwise; never "
                             "the --pairs CSV itself)")
    add_device_argument(parser)
    parser.add_argument("--tile-size", type=positive_int,
                        help="voxels per tile side (default: a 2-D checkpoint's training crop; otherwise, 3-D inputs "
                             "included, one pass up to 176³ voxels, beyond that the fewest overlapping slabs)")
    parser.add_argument("--weigh-network-field", action="store_true",
                        help="let the alignment guard weigh UniFuse's own field (FA) even where the checkpoint "
                             "says its validation never kept it (alignment_guard.weigh_network_field); for every "
                             "UniFuse row, --checkpoint's and --methods unifuse[=CHECKPOINT]'s")
    parser.add_argument("--weigh-dense-refinement", action="store_true",
                        help="let the alignment guard weigh the dense MIND refinement of the matching's field even "
                             "where the checkpoint does not ask for it (alignment_guard.weigh_dense_refinement); "
                             "for every UniFuse row, as --weigh-network-field")
    parser.set_defaults(func=run)

