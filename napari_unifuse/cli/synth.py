"""`unifuse synth`: turn an aligned, clean image pair into a degraded, misaligned training pair.

For each pair it writes, into ``OUT`` (one pair) or, with ``--pairs``, one folder per CSV row
numbered from 0 in the CSV's order (``OUT/0000/``, ``OUT/0001/``, ...):

* ``reference.<ext>``  the reference, unchanged;
* ``moving.<ext>``     the moving image degraded, then misaligned (UniFuse's I'_D);
* ``label.<ext>``      the clean moving image aligned to the reference (I_D);
* ``displacement.nii.gz``  the ground-truth ITK displacement field on the reference grid
  (LPS mm): resampling ``moving`` through it with SimpleITK/ANTs/Slicer gives ``label``;
* ``meta.json``        degradation class, misalignment regime, every drawn parameter, the seed,
  the intensity mapping and the inputs' paths as given, made absolute (``inputs``), with the files
  they resolve to where a symlink (git-annex, DataLad) makes that another (``resolved_paths``); its
  voxel indices and per-axis values are in the package's array order, a volume's (z, y, x), the
  reverse of NIfTI's (i, j, k), as its ``axis_order`` says.

``<ext>`` follows each input: ``png`` for PNG/JPG images, ``nii.gz`` for everything else. The
moving image is put on the reference grid first when its geometry differs; one that does not
overlap the reference is refused, one that covers less than half of it is warned about.
``--degradation metal`` simulates a CT scanner in Hounsfield units: it is refused where
``--modality`` names another modality, and warned about where ``auto`` reads the moving volume as
one (an 8-bit image's modality is not read, so it draws no warning).
``--misalignment`` picks the regime (``data.misalign``): ``large`` (rigid + elastic, the default),
``mild`` (a few voxels of residual non-rigid misalignment) or ``none`` (the zero field).

Intensities: the degradations act on the moving image normalised as ``io.normalize_intensity``
does (recorded in meta.json), because their models work on its [0, 1] window. Volumes are written
back in the input's units: ``label`` is the clean moving image itself, never clipped, and
``moving`` carries what lies beyond the window (hot PET lesions, metal), undegraded, through the
misalignment, and so what the degradation makes beyond it: a CT's simulated metal and bright
streaks, up to the 12-bit 3071 HU a scanner stores. PNGs hold the normalised [0, 1] images as 8 bits.

An output folder holding an earlier synth output is refused unless ``--overwrite``, and one it
cannot write to (or create) is refused before any pair is made; no output may replace an input of
any row. Every CSV row is checked (cells, files, seeds, and its images: readable, of one
dimensionality, overlapping in space) before anything is written, every bad row named by its line,
and so is the header: a column other than reference, moving, degradation, misalignment and seed (a
misspelled ``degradaton``) is refused, with the closest one named, rather than ignored. A pair's files
are written into a hidden staging folder in its output folder and moved into place once all are
written, ``meta.json`` last: a folder without it is not a finished pair. Only then go the earlier
output's files (with ``--overwrite``), those of the other extension included. A write that fails
(a full disk; a ``displacement.nii.gz`` SimpleITK cut short without saying so is caught by reading
it back) is a one-line error that leaves an earlier output whole; a staging folder left by a killed
run is removed by the next run and is no earlier output.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from napari_unifuse import __version__
from napari_unifuse.cli.arguments import (
    CsvRow,
    check_one_pair_or_many,
    non_negative_int,
    read_pairs_rows,
    user_path,
)
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.metal import NoRoomForMetal
from napari_unifuse.data.misalign import MISALIGNMENT_REGIMES, regime_misalignment
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.engine.inference import overlap_warnings
from napari_unifuse.engine.outputs import check_writable_folder, write_files_together
from napari_unifuse.engine.provenance import absolute_as_given
from napari_unifuse.engine.report import SYNTH_META_FILE as META_FILE  # unifuse report tells synth pairs by it
from napari_unifuse.errors import InputError
from napari_unifuse.io import (
    ImageVolume,
    normalize_intensity,
    placement_metadata,
    read_image,
    resample_to_reference,
    write_displacement,
    write_image,
)
from napari_unifuse.io.nifti_xforms import NIFTI_XFORMS
from napari_unifuse.io.normalize import MODALITIES, MODALITY_ALIASES, IntensityMapping
from napari_unifuse.io.writers import nifti_holds_grid
from napari_unifuse.training.datasets import MODALITY_DEGRADATION

_PNG_INPUTS = (".png", ".jpg", ".jpeg")
DISPLACEMENT_FILE = "displacement.nii.gz"
_IMAGE_ROLES = ("reference", "moving", "label")
# Every name synth gives a file in an output folder, for either image extension: what marks an
# earlier output, what --overwrite removes, and where no input may sit.
OUTPUT_NAMES = frozenset({*(f"{role}.{extension}" for role in _IMAGE_ROLES for extension in ("png", "nii.gz")),
                          DISPLACEMENT_FILE, META_FILE})
DEFAULT_MISALIGNMENT = "large"
PAIRS_REQUIRED_COLUMNS = ("reference", "moving")
PAIRS_OPTIONAL_COLUMNS = ("degradation", "misalignment", "seed")  # each overrides its option


@dataclass(frozen=True)
class SynthJob:
    reference: Path
    moving: Path
    degradation: str
    seed: int
    out: Path
    misalignment: str = DEFAULT_MISALIGNMENT
    line: int | None = None  # its line in the --pairs CSV, for messages; None for --reference/--moving

    def files(self) -> dict[str, Path]:
        """Role → the file this job writes."""
        return {
            "reference": self.out / f"reference.{_extension(self.reference)}",
            "moving": self.out / f"moving.{_extension(self.moving)}",
            "label": self.out / f"label.{_extension(self.moving)}",
            "displacement": self.out / DISPLACEMENT_FILE,
            "meta": self.out / META_FILE,
        }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="make a degraded, misaligned pair (with its ground truth) from aligned clean images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reference", type=user_path, help="high-quality reference image")
    parser.add_argument("--moving", type=user_path, help="the other modality, clean and aligned to the reference")
    parser.add_argument("--pairs", type=user_path,
                        help="CSV with columns reference,moving[,degradation,misalignment,seed] (any other "
                             "column is refused); paths relative to the CSV; an empty optional cell takes the "
                             "option's value")
    parser.add_argument("--degradation", choices=DEGRADATION_CLASSES, default="none",
                        help="degradation of the moving image (default: none; a CSV column overrides it)")
    parser.add_argument("--misalignment", choices=MISALIGNMENT_REGIMES, default=DEFAULT_MISALIGNMENT,
                        help=f"misalignment regime (default: {DEFAULT_MISALIGNMENT}; a CSV column overrides it)")
    parser.add_argument("--severity", type=float, default=0.5,
                        help="degradation strength in [0, 1], above 0 for motion, which moves nothing at 0 "
                             "(default 0.5)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed, 0 or more (default 0); a CSV row without one uses seed + the number "
                             "of its output folder (0000: seed, 0001: seed + 1, ...)")
    parser.add_argument("--modality", choices=MODALITIES, default="auto",
                        help="modality of the moving image, for its intensity normalisation (default: auto); "
                             "metal, a CT's artefact, is refused for an MR, PET or SPECT one, and warned about "
                             "(in meta.json's degradation_warning too) where auto reads a volume as one")
    parser.add_argument("--out", type=user_path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier synth outputs in the output folders (once the new pair is written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_a_severity_outside_0_to_1(args.severity)
    jobs = _jobs(args)
    for job in jobs:
        refuse_a_degradation_that_changes_nothing(job.degradation, args.severity)
        refuse_metal_on_a_modality_not_ct(job.degradation, args.modality)
    # Before any work: a bad output folder must not surface after the first pairs were written.
    refuse_unsafe_outputs(jobs, args.out, overwrite=args.overwrite)
    # and so must a folder it cannot write to (nothing the check creates stays if a pair is refused).
    check_writable_folder(args.out, keep=False)
    for folder in dict.fromkeys(job.out for job in jobs if job.out != args.out and job.out.is_dir()):
        check_writable_folder(folder)
    if args.pairs is not None:  # a lone pair is checked as it is read, before anything is written
        refuse_rows_without_a_pair(jobs, args.pairs)
    for job in jobs:
        synthesize(job, severity=args.severity, modality=args.modality)
        print(f"{job.out}: {job.degradation} pair, {job.misalignment} misalignment (seed {job.seed})")
    return 0


def _jobs(args: argparse.Namespace) -> list[SynthJob]:
    check_one_pair_or_many(args, ("reference", "moving"))
    if args.pairs is None:
        for path in (args.reference, args.moving):
            if not path.exists():
                raise InputError("file not found", path)
        return [SynthJob(args.reference, args.moving, args.degradation, args.seed, args.out, args.misalignment)]
    # number: the row's output folder and default seed offset; line: where to look in the CSV.
    rows = read_pairs_rows(args.pairs, required=PAIRS_REQUIRED_COLUMNS, optional=PAIRS_OPTIONAL_COLUMNS)
    return [_row_job(row, line, number, args) for number, (line, row) in enumerate(rows)]


def _row_job(row: CsvRow, line: int, number: int, args: argparse.Namespace) -> SynthJob:
    """The job of one CSV row, checked (cells, files, values) before anything is written."""

    def problem(text: str) -> InputError:
        return InputError(f"line {line} of the CSV: {text}", args.pairs)

    def optional(column: str, default: str) -> str:
        return row.get(column, "") or default

    def required_path(column: str) -> Path:
        # Relative paths mean "next to the CSV", so a dataset folder can be moved as a whole;
        # read_pairs_rows refused a row without this cell.
        path = args.pairs.parent / row[column]
        if not path.exists():
            raise problem(f"the {column} file {path} is not found")
        return path

    reference, moving = required_path("reference"), required_path("moving")
    degradation = optional("degradation", args.degradation)
    if degradation not in DEGRADATION_CLASSES:
        raise problem(f"unknown degradation {degradation!r}; use one of {', '.join(DEGRADATION_CLASSES)}")
    misalignment = optional("misalignment", args.misalignment)
    if misalignment not in MISALIGNMENT_REGIMES:
        raise problem(f"unknown misalignment {misalignment!r}; use one of {', '.join(MISALIGNMENT_REGIMES)}")
    seed_text = optional("seed", str(args.seed + number))
    try:
        seed = non_negative_int(seed_text)
    except argparse.ArgumentTypeError as error:
        raise problem(f"the seed {seed_text!r}: {error}") from error
    return SynthJob(reference, moving, degradation, seed, args.out / f"{number:04d}", misalignment, line)


def refuse_unsafe_outputs(jobs: list[SynthJob], out: Path, overwrite: bool = False) -> None:
    """Raise an InputError, before anything is written, where ``out`` or a job's folder is a file;
    where a file of ``OUTPUT_NAMES`` in any job's folder is (by path, link or hard link) an input of
    any job (a CSV may name one row's output as another row's input); or, unless ``overwrite``,
    where a job's folder already holds a synth output."""
    for folder in (out, *(job.out for job in jobs)):
        if folder.exists() and not folder.is_dir():
            raise InputError("--out must be a folder, but this is a file", folder)
    planned = {(job.out / name).resolve(): job.out / name for job in jobs for name in OUTPUT_NAMES}
    # Hard links: the same file under another name; only files that exist have an identity.
    by_identity = {_identity(path): output for path, output in planned.items() if path.is_file()}
    for job in jobs:
        for source in (job.reference, job.moving):
            resolved = source.resolve()
            output = planned.get(resolved) or (by_identity.get(_identity(resolved)) if resolved.is_file() else None)
            if output is not None:
                raise InputError(f"the output {output} would overwrite this input; write the outputs to "
                                 "another folder", source)
    if not overwrite:
        for job in jobs:
            earlier = sorted(name for name in OUTPUT_NAMES if (job.out / name).exists())
            if earlier:
                raise InputError(f"holds an earlier synth output ({', '.join(earlier)}); pass --overwrite to "
                                 "replace it, or choose another --out", job.out)


def refuse_rows_without_a_pair(jobs: list[SynthJob], pairs_csv: Path) -> None:
    """Raise one InputError naming the CSV line of every job whose images synth cannot make a pair
    of (``checked_inputs``), before any pair is written: a row found bad only at its turn stopped the
    batch after the pairs before it, which a rerun then refuses without --overwrite. Each row's
    images are read and let go in turn, so a cohort of volumes is never held at once."""
    problems = []
    for job in jobs:
        try:
            checked_inputs(job)
        except InputError as error:
            problems.append(f"line {job.line} of the CSV: {error}")
    if problems:
        rows = "1 row cannot" if len(problems) == 1 else f"{len(problems)} rows cannot"
        raise InputError(f"{rows} be made into pairs, so nothing was written: {'; '.join(problems)}", pairs_csv)


def checked_inputs(job: SynthJob) -> tuple[ImageVolume, ImageVolume, list[str]]:
    """``job``'s reference and moving images, and the warnings to print of them (their readers',
    and a moving image covering little of the reference); an InputError where synth cannot make a
    pair of them: unreadable, of two dimensionalities, an axis of one pixel, a sheared reference
    grid, or a moving image outside the reference."""
    reference = read_image(job.reference)
    moving = read_image(job.moving)
    if moving.ndim != reference.ndim:
        raise InputError(f"the moving image is {moving.ndim}D but the reference is {reference.ndim}D", job.moving)
    for image in (reference, moving):
        if min(image.spatial_shape) < 2:
            raise InputError(_too_small_to_misalign(image.spatial_shape), image.source)
    if not nifti_holds_grid(reference):
        # Every output lies on the reference grid, and synth writes NIfTI, whose qform (what ITK-based
        # tools read) holds no shear: they would place the pair and its field millimetres off. A NIfTI
        # reference's sheared sform beside a qform is held as the reference holds it.
        raise InputError("its grid is sheared (e.g. a gantry-tilted CT), which synth's NIfTI outputs cannot hold "
                         "for ITK-based tools; resample it onto an unsheared grid first", job.reference)
    warnings = [f"{image.source}: {warning}" for image in (reference, moving)
                for warning in image.metadata.get("warnings", [])]
    warnings += overlap_warnings(reference, moving, outside="the label and moving images are 0")
    return reference, moving, warnings


def refuse_a_degradation_that_changes_nothing(degradation: str, severity: float) -> None:
    """Motion's movements scale with the severity: at 0 nothing moves, and a pair labelled motion
    would hold the clean image (the other degradations still act at 0)."""
    if degradation == "motion" and severity == 0:
        raise InputError("--severity 0 draws no movement for motion, so the pair would be clean yet labelled "
                         "motion: give a severity above 0, or degradation none for a clean pair")


def refuse_a_severity_outside_0_to_1(severity: float) -> None:
    """Every degradation model scales its parameters over [0, 1] (NaN lies outside it too): said
    here by the option's name, before any image is read, not by the model's class after."""
    if not 0.0 <= severity <= 1.0:
        raise InputError(f"--severity must be a number from 0 to 1, got {severity:g}: 0 is the mildest degradation, "
                         "1 the strongest")


def refuse_metal_on_a_modality_not_ct(degradation: str, modality: str) -> None:
    """The metal model simulates a CT scanner in Hounsfield units: an image named MR or PET would
    have its intensities read as HU and get streaks that no such scanner makes, yet be labelled metal."""
    named = MODALITY_ALIASES.get(modality, modality)
    if degradation == "metal" and named in MODALITY_DEGRADATION and named != "ct":
        raise InputError(f"--degradation metal simulates a CT's metal artefacts, but --modality {modality} says the "
                         f"moving image is {named.upper()}: use --degradation {MODALITY_DEGRADATION[named]}, the "
                         f"degradation simulated for {named.upper()} (or none for a clean pair)")


def metal_on_a_modality_not_ct(degradation: str, mapping: IntensityMapping) -> str:
    """The warning (empty if none) for metal on a moving image that ``--modality auto`` read as
    another modality than CT: a guess, so warned about, not refused. An 8-bit image's modality is
    not read (``mapping.modality`` stays ``auto``), so it draws no warning."""
    detected = mapping.modality
    if degradation != "metal" or detected not in MODALITY_DEGRADATION or detected == "ct":
        return ""
    return (f"metal simulates a CT's artefacts in Hounsfield units, but the moving image reads as {detected.upper()} "
            "(by its header or intensities, under --modality auto), so its intensities were taken as HU: pass "
            f"--modality ct if it is a CT, else use --degradation {MODALITY_DEGRADATION[detected]}, the degradation "
            f"simulated for {detected.upper()}")


def _too_small_to_misalign(shape: tuple[int, ...]) -> str:
    """Why an image with an axis of one pixel or voxel is refused, its shape in the files' axis order
    (nibabel, ITK, an image viewer's width first), the reverse of the array's."""
    file_shape = " x ".join(str(n) for n in reversed(shape))
    if len(shape) == 2:
        return f"an image of {file_shape} pixels (width x height); synth needs at least 2 pixels along each side"
    # Unlike `unifuse fuse`, no 2D stand-in: a 3D misalignment of a one-slice volume would move its
    # anatomy out of its only slice, and a 2D one would need the slice's plane kept through synthesis.
    return (f"a one-slice volume of {file_shape} voxels (i x j x k, as nibabel and ITK give its shape); synth needs "
            "a 2D image or a volume of at least 2 voxels along every axis: save the slice as a 2D image (PNG, or "
            "an axial NIfTI with two dimensions)")


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _extension(path: Path) -> str:
    return "png" if path.name.lower().endswith(_PNG_INPUTS) else "nii.gz"


def synthesize(job: SynthJob, severity: float = 0.5, modality: str = "auto") -> dict:
    """Make and write one pair (``engine.outputs.write_files_together``, meta.json last), replacing
    any earlier synth output in ``job.out`` (``run`` refuses those first unless --overwrite);
    returns what went into meta.json."""
    files = job.files()
    # run checks every row's inputs against every row's outputs, and every row's degradation; this
    # guards a direct call.
    refuse_unsafe_outputs([job], job.out, overwrite=True)
    refuse_a_severity_outside_0_to_1(severity)
    refuse_a_degradation_that_changes_nothing(job.degradation, severity)
    refuse_metal_on_a_modality_not_ct(job.degradation, modality)
    reference, moving, warnings = checked_inputs(job)
    for warning in warnings:
        print(f"{job.out}: warning: {warning}", file=sys.stderr)

    on_reference_grid = moving.on_grid_of(reference, atol=1e-3)
    clean = moving if on_reference_grid else resample_to_reference(moving, reference)
    normalized, mapping = normalize_intensity(clean, modality)
    degradation_warning = metal_on_a_modality_not_ct(job.degradation, mapping)
    if degradation_warning:
        print(f"{job.out}: warning: {job.moving}: {degradation_warning}", file=sys.stderr)
    # PNG holds [0, 1] floats as 8 bits (the inverse of io's /255), so only volumes keep the rest.
    as_png = files["moving"].suffix == ".png"
    beyond_window = None if as_png or clean.is_rgb else mapping.scaled(clean.array) - normalized.array
    try:
        pair = make_pair(reference, normalized, job.degradation, rng=job.seed, severity=severity,
                         misalignment=regime_misalignment(job.misalignment), beyond_window=beyond_window)
    except NoRoomForMetal as error:  # a property of this moving image: name it
        raise NoRoomForMetal(error.problem, job.moving) from None

    if as_png:
        moving_out, label_out = pair.moving, pair.label
    else:
        moving_out = on_reference_placement(replace(pair.moving, array=mapping.inverse(pair.moving.array)), reference)
        label_out = on_reference_placement(replace(clean, metadata={**clean.metadata, "role": "label"}), reference)
    meta = {
        "unifuse_version": __version__,
        **_inputs_record(job),
        "files": {role: path.name for role, path in files.items() if role != "meta"},
        "degradation": pair.degradation,
        "degradation_warning": degradation_warning,
        "class_index": pair.class_index,
        "misalignment": job.misalignment,
        "seed": job.seed,
        "severity": severity,
        "moving_resampled_to_reference": not on_reference_grid,
        "intensity_mapping": mapping.to_dict(),
        "intensities": (
            "8-bit PNG of the normalised images" if as_png else
            "the input's units: label is the clean moving image, unclipped; moving was degraded inside the "
            "intensity mapping's window, with what lies beyond it carried through the misalignment undegraded, "
            "and what the degradation made beyond it (simulated metal, streaks) kept"
        ),
        "displacement_convention": (
            "ITK displacement field, LPS mm, on the reference grid: label(p) = moving(p + d(p)); "
            "in voxels (array order) it is u with label(x) = moving(x + u(x))"
        ),
        "axis_order": _axis_order(reference.ndim),
        "params": pair.params,
    }

    def remove_earlier_output() -> None:
        # Its meta.json first: old and new files mixed never look like a finished pair.
        files["meta"].unlink(missing_ok=True)
        for name in sorted(OUTPUT_NAMES - {path.name for path in files.values()}):  # the other extension's
            (job.out / name).unlink(missing_ok=True)

    writers = {
        "reference": lambda path: write_image(reference, path),
        "moving": lambda path: write_image(replace(moving_out, source=None), path),
        "label": lambda path: write_image(replace(label_out, source=None), path),
        # With the reference's NIfTI forms: ITK tools place the field where they place the reference.
        "displacement": lambda path: write_displacement(pair.displacement, reference.geometry, path,
                                                        reference_metadata=reference.metadata),
        "meta": lambda path: path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"),  # the marker
    }
    write_files_together(job.out, {files[role].name: write for role, write in writers.items()},
                         before_moving=remove_earlier_output)
    return meta


def _inputs_record(job: SynthJob) -> dict[str, dict[str, str]]:
    """meta.json's record of the inputs, as fuse's provenance records them: each path as given, made
    absolute (a git-annex/DataLad ``s1/ct.png``, which names the subject), under ``inputs``; and,
    under ``resolved_paths``, the file each resolves to where a symlink makes that another."""
    given = {"reference": absolute_as_given(job.reference), "moving": absolute_as_given(job.moving)}
    resolved = {role: str(path.resolve()) for role, path in given.items() if path.resolve() != path}
    return {"inputs": {role: str(path) for role, path in given.items()},
            **({"resolved_paths": resolved} if resolved else {})}


def on_reference_placement(volume: ImageVolume, reference: ImageVolume) -> ImageVolume:
    """``volume``, on the reference grid, with the reference's NIfTI forms in place of the moving
    file's: written where every tool places the reference (a sheared sform keeps its qform)."""
    metadata = {key: value for key, value in volume.metadata.items() if key != NIFTI_XFORMS}
    return replace(volume, metadata={**metadata, **placement_metadata(reference.metadata)})


def _axis_order(ndim: int) -> str:
    """meta.json's note on the order of its voxel indices and per-axis values: the package's array
    order, which a NIfTI or ITK reader indexes the other way round."""
    array_axes, file_axes = ("(z, y, x)", "(i, j, k)") if ndim == 3 else ("(y, x)", "(i, j)")
    return (f"array order {array_axes}, the reverse of the files' {file_axes} index order in NIfTI and ITK: every "
            "voxel index and per-axis value in params (centre_voxel, phase_encode_axis, slice_axis, spacing_mm, "
            "translation_voxels) follows it, and so do the components of u")
