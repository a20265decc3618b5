"""`unifuse fuse`: align, restore and fuse one pair, or a CSV of pairs, with a fusion method.

``--method`` picks the method (``engine.methods``: unifuse, bsafusion, mmif-amin[:matching|:sitk|:none],
the classical ``<registration>+<rule>`` pipelines); ``--checkpoint`` its weights (default: the
method's bundled checkpoint; without ``--method``, the method the checkpoint was trained for).

Each pair's outputs go to ``OUT/<moving file name without its image extension>/``, with its
parent folders' names in front where a batch has moving files of one name (``OUT/0000_moving/``
for ``0000/moving.png``, as ``unifuse synth --pairs`` writes them); names come from the paths as
given, not from where a symlink points (git-annex/DataLad: ``s1/ct.png`` and ``s2/ct.png`` are
``OUT/s1_ct/`` and ``OUT/s2_ct/``, two pairs even when they link to one file); a moving file named
as a batch file (``index.html.png``) gets ``OUT/index.html_png/``, one with only dots before its
extension (``.nii.gz``) ``OUT/_nii_gz/``, a name longer than a file name may be (255 bytes) its
start and a hash of the whole, and one listed in two rows is refused. See ``engine.outputs`` for
the files: the five results, and the quality maps with
``quality.json`` unless ``--no-quality``, and ``metrics.json`` given a ``--label``, the clean moving
image aligned to the reference (an intensity image in the moving image's units, not a segmentation):
a label is checked against the reference as the moving image is, before any work (another
dimensionality, or no overlap in space, is refused; a one-slice label beside a 2-D reference is its
slice; under half the reference grid, its reader's notes (NaN voxels replaced, say), a picture of
another size, a constant label, and after the fusion a label whose values the moving image's
intensity window clips (other units) or that holds a segmentation's few ids, are warnings). A pair
folder may not be an input of any pair (a DICOM series folder), lie inside one or hold one (``--moving dcm/t2
--out dcm``, or one row's folder holding another row's inputs): such a pair or batch is refused
before any work; choose another --out. A batch resumes: a pair whose ``provenance.json``
records the same inputs (path as given and content), method, checkpoint and settings (tile size,
modalities, quality maps) is skipped, so rerunning after an interruption only does what is left,
and ends with ``OUT/summary.json`` (every pair: done, skipped, failed, and why, busy, or kept, its
inputs and when it ended; unifuse's version under provenance.json's ``versions``; with the
failures of earlier batches into OUT for pairs, known by their reference and moving paths, that no
batch since has run, so that their folders stay marked). A ``summary.json`` (or, with ``--report``, an
``index.html``) in OUT that unifuse did not write is refused before any work. A later batch whose
moving file shares its name with an earlier batch's (``ct1/mov.png``, then ``a/mov.png``) gets a
folder of its own (``OUT/a_mov/``) rather than the one holding the other's results. A pair folder
holding results of other inputs, another method or other settings is refused, never silently
replaced: ``--overwrite`` redoes the pair and first removes every earlier output in its folder. A
folder holding the pair's results of an earlier version of unifuse, which recorded no method (before
2026-12-03), settings or label, or shipped other bundled weights, is kept as it is and said so: the
summary records the pair as kept (not failed), and the batch exits 2 until ``--overwrite`` redoes
it with this version (or another --out is chosen).
No output may replace an input, and an ``--out`` that cannot be created or written to is refused
before any work. ``--report`` also writes each pair's QC page (``report.html``) and,
for a ``--pairs`` batch, ``OUT/index.html``, the runs most suspicious first (a pair already done gets its
page with ``--overwrite``; ``unifuse report OUT`` indexes a single pair's folder); the page is written
with the pair's other outputs, before the ``provenance.json`` that marks them done. An input replaced
since its run began to read it is noticed even when the new file keeps an older modification time
(its inode change time, which a copy or rename sets, counts too), and so is a symlink, or a folder
link on its path, pointed at another file (git-annex/DataLad) of other content. A file system's
refusal of one pair's folder fails that pair; the batch goes on.

Two runs never write one pair folder at once: a run holds the folder's lock (``engine.outputs``)
from its "already done?" check to the end of its write, and a second run into it (the same pair, or
a moving file of the same name) is refused at once. A batch goes on with its other pairs and tries
such a pair again after them: skipped when the other run has finished it, fused when it left it, and
recorded as busy (not failed, but exiting 2: rerun the batch after the other) while it still holds it.

A batch splits across processes, GPUs or machines with torchrun: every process takes every N-th
pair of the CSV (N processes in all), and process 0 gathers what each did into the summary:

  torchrun --nproc_per_node 4 -m napari_unifuse.cli fuse --pairs pairs.csv --out results/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Collection
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import takewhile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from napari_unifuse import __version__
from napari_unifuse.cli import describe_os_error
from napari_unifuse.cli.arguments import add_device_argument, check_one_pair_or_many, read_pairs_rows, user_path
from napari_unifuse.cli.report import is_qc_index, say_unreadable
from napari_unifuse.engine.device import out_of_memory_explained
from napari_unifuse.engine.distributed import Distributed, setup_distributed
from napari_unifuse.engine.inference import FusionEngine, requested_settings
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.labels import (
    checked_label,
    label_in_model_units,
    label_metrics,
    label_units_warnings,
    run_moving_mapping,
)
from napari_unifuse.engine.methods import OPTION_SEPARATOR, load_method, registered_methods, split_name
from napari_unifuse.engine.outputs import (
    METRICS_FILE,
    PROVENANCE_FILE,
    REPORT_FILE,
    FolderBusyError,
    FolderLock,
    check_writable_folder,
    is_complete,
    output_folder_lock,
    read_earlier_version_provenance,
    read_json_object,
    read_provenance,
    refuse_overwriting_inputs,
    write_fusion_outputs,
    write_json,
)
from napari_unifuse.engine.provenance import (
    absolute_as_given,
    describe_label,
    sha256_of_path,
    utc_timestamp,
)
from napari_unifuse.engine.report import EARLIER_FAILURES, INDEX_FILE, OUTCOME_FINISHED, report_page, write_index
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.engine.uncertainty import DEFAULT_PASSES
from napari_unifuse.errors import InputError, UniFuseError
from napari_unifuse.io import read_image
from napari_unifuse.io.normalize import MODALITIES
from napari_unifuse.io.readers import SUPPORTED_SUFFIXES, file_format
from napari_unifuse.model.checkpoint import checkpoint_method, list_checkpoints

DEFAULT_METHOD = "unifuse"
SUMMARY_FILE = "summary.json"
# The batch's own files in --out: no pair folder may take their names.
BATCH_FILES = frozenset({SUMMARY_FILE, INDEX_FILE})
# A summary's outcomes: fused now, skipped as done, failed, left to another run that held its folder to the end,
# or kept: an earlier version's results of the pair, which this version cannot tell for its own.
OUTCOME_STATUSES = ("done", "skipped", "failed", "busy", "kept")
# provenance.json: each input's _last_changed when the run began to read it, by role; a resume hashes
# again only an input whose time now differs (one replaced while its pair ran included).
INPUT_CHANGE_TIMES = "inputs_last_changed_ns"
# The longest file name, in bytes, of the usual file systems (ext4, XFS, btrfs, APFS; NTFS: 255 characters).
NAME_MAX_BYTES = 255


class EarlierVersionResults(InputError):
    """A pair folder holding this pair's finished results as an earlier version of unifuse recorded
    them, without what tells whether this run would make the same (its method, settings, label or
    bundled checkpoint): neither taken for this run's nor redone unasked. A batch keeps them (its
    summary's "kept"), and does not count the pair as failed."""


@dataclass(frozen=True)
class Pair:
    reference: Path
    moving: Path
    label: Path | None = None
    output_name: str | None = None  # its output folder's name; by default the moving file's (output_folder_names)
    line: int | None = None  # its line in the --pairs CSV, for messages; None for --reference/--moving

    @property
    def name(self) -> str:
        return self.output_name or output_folder_names([self.moving])[0]

    @property
    def inputs(self) -> tuple[tuple[str, Path | None], ...]:
        """Each role and its path as given (None: no label)."""
        return ("reference", self.reference), ("moving", self.moving), ("label", self.label)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fuse",
        help="align, restore and fuse a moving image onto a reference (one pair or a CSV of pairs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reference", type=user_path, help="high-quality reference image")
    parser.add_argument("--moving", type=user_path, help="degraded, misaligned moving image")
    parser.add_argument("--label", type=user_path, help="optional ground truth of the aligned moving image (writes metrics.json): "
                        "the clean moving image on the reference grid, an intensity image in the moving image's units, "
                        "not a segmentation")
    parser.add_argument("--pairs", type=user_path, help="CSV with columns reference,moving[,label] (any other column is "
                        "refused); paths relative to the CSV")
    parser.add_argument("--out", type=user_path, required=True, help="output folder (one sub-folder per pair)")
    parser.add_argument("--method", help=f"fusion method (default: {DEFAULT_METHOD}, or the checkpoint's): "
                        + ", ".join(registered_methods()) + "; mmif-amin:sitk / mmif-amin:none pick its alignment")
    parser.add_argument("--checkpoint", help="bundled checkpoint name or .safetensors file for the method "
                        "(default: the method's bundled one, e.g. unifuse-2d-harvard / unifuse-3d-phantom)")
    add_device_argument(parser)
    parser.add_argument("--tile-size", type=int,
                        help="voxels per tile side (default: a 2-D checkpoint's training crop; otherwise, 3-D inputs "
                             "included, one pass up to 176³ voxels, beyond that the fewest overlapping slabs)")
    for role in ("reference", "moving"):
        parser.add_argument(f"--{role}-modality", choices=MODALITIES, default="auto",
                            help=f"how to normalise the {role} intensities (default: from the header or the values)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo pairs whose outputs are complete, replacing every earlier output in their folders")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the quality maps (invented / lost structure, restoration change, uncertainty)")
    parser.add_argument("--uncertainty-passes", type=int, default=DEFAULT_PASSES,
                        help=f"perturbed alignment passes of the uncertainty map, 0 for none (default {DEFAULT_PASSES})")
    parser.add_argument("--report", action="store_true",
                        help="also write each pair's QC page (report.html) and, for --pairs, OUT/index.html")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pairs = _pairs_from_args(args)
    # Resolves the device first: a CUDA request on a CPU machine fails before any work.
    job = setup_distributed(args.device)
    try:
        return _run_shard(args, pairs, job)
    finally:
        job.close()


def _run_shard(args: argparse.Namespace, pairs: list[Pair], job: Distributed) -> int:
    """Fuse this process's share of ``pairs`` (all of them in a plain run); for a batch, gather
    every process's outcomes at process 0, which writes the summary (and the QC index)."""
    # The device as asked (auto included), for the provenance; each process's GPU is already chosen
    # (setup_distributed), so it resolves to the same.
    engines = _EngineCache(args.method, args.checkpoint, args.device, args.tile_size)
    options = {"reference_modality": args.reference_modality, "moving_modality": args.moving_modality,
               "quality": not args.no_quality, "uncertainty_passes": args.uncertainty_passes}
    batch = {"rank": job.rank, "world_size": job.world_size} if job.world_size > 1 else {}
    # Before any pair: a read-only --out would otherwise fail every pair after its fusion. A batch
    # writes its summary there anyway, and the processes of one check the folder side by side (one
    # removing it would fail another's check); a lone pair refused later leaves nothing behind.
    check_writable_folder(args.out, keep=args.pairs is not None or job.world_size > 1)
    rank = f"[rank {job.rank}] " if batch else ""
    outcomes, busy = [], []
    for index, pair in job.shard(list(enumerate(pairs, start=1))):
        prefix = f"{rank}[{index}/{len(pairs)}] {pair.name}"
        try:
            outcomes.append(_ended(_fuse_or_skip(pair, args, engines, options, batch, prefix, job.rank)))
        except FolderBusyError as error:
            if args.pairs is None:
                raise
            print(f"{prefix}: another unifuse run is writing into {error.folder}; tried again after this batch's "
                  "other pairs", file=sys.stderr)
            busy.append((prefix, pair))
    # A folder another run held (two batches into one --out): that run has since finished the pair
    # (skipped here as done) or left it (fused here), unless it still holds it.
    for prefix, pair in busy:
        try:
            outcomes.append(_ended(_fuse_or_skip(pair, args, engines, options, batch, prefix, job.rank,
                                                 after_busy=True)))
        except FolderBusyError as error:
            print(f"{prefix}: busy: another unifuse run is still writing into {error.folder}", file=sys.stderr)
            outcomes.append(_ended({**_outcome_of(pair, args.out, job.rank), "status": "busy", "error": str(error)}))
    if args.pairs is None:
        return 0
    gathered = job.gather(outcomes)
    if gathered is None:
        # Process 0 sums up the batch and alone exits non-zero on failures: an early non-zero exit
        # here would make torchrun stop it while it writes the summary.
        return 0
    every_outcome = [outcome for shard in gathered for outcome in shard]
    try:
        counts = write_summary(every_outcome, pairs, job, args.out, args.pairs)
    except OSError as error:  # a read-only --out, a full disk, a folder named summary.json
        raise UniFuseError(f"{args.out / SUMMARY_FILE}: cannot write the batch summary ({error.strerror or error}); "
                           f"{where_the_outputs_are(every_outcome)}") from error
    if args.report and args.out.is_dir():
        try:
            print(f"QC index: {write_index(args.out, on_unreadable=say_unreadable('fuse'))}")
        except OSError as error:
            raise UniFuseError(f"{args.out / INDEX_FILE}: cannot write the QC index ({error.strerror or error}); "
                               f"unifuse report {args.out} writes it") from error
    if counts["failed"]:
        print(f"unifuse fuse: {counts['failed']} of {len(pairs)} pairs failed", file=sys.stderr)
    if counts["busy"]:
        print(f"unifuse fuse: {counts['busy']} of {len(pairs)} pairs were still being written by another unifuse "
              "run when this batch ended; rerun the batch after it to check them", file=sys.stderr)
    if counts["kept"]:
        # Not failed, and not this version's results either: exiting 2 asks for the choice.
        print(f"unifuse fuse: {counts['kept']} of {len(pairs)} pairs hold results of an earlier version of unifuse, "
              "kept as they are; pass --overwrite to redo them with this version (it redoes every pair of the "
              "batch), or choose another --out", file=sys.stderr)
    return 2 if counts["failed"] or counts["busy"] or counts["kept"] else 0


def _outcome_of(pair: Pair, out: Path, rank: int) -> dict[str, Any]:
    """What a summary records of every pair: its folder, and its inputs (its label where it has one)
    as absolute paths, by which a later batch (of another CSV, from another folder) knows it for the
    same pair; the folder too is absolute, as one summary holds the outcomes of batches run from
    other folders."""
    label = {"label": str(absolute_as_given(pair.label))} if pair.label is not None else {}
    return {"name": pair.name, "reference": str(absolute_as_given(pair.reference)),
            "moving": str(absolute_as_given(pair.moving)), **label,
            "output": str(absolute_as_given(out / pair.name)), "rank": rank}


def _ended(outcome: dict[str, Any]) -> dict[str, Any]:
    """``outcome`` with the time it was reached (``finished``): the summary's ``created`` is the
    batch's end, and a run into the pair's folder between the two (the pair fixed and fused alone
    while the batch went on) is later than its failure, not earlier (engine.report)."""
    return {**outcome, OUTCOME_FINISHED: utc_timestamp()}


def _fuse_or_skip(pair: Pair, args: argparse.Namespace, engines: _EngineCache, options: dict[str, Any],
                  batch: dict[str, int], prefix: str, rank: int, after_busy: bool = False) -> dict[str, Any]:
    """Fuse ``pair`` into its folder, or skip it when the folder holds its finished run; its outcome
    (a failure of a batch's pair included). Raises ``FolderBusyError`` when another run holds the
    folder; ``after_busy``: it did at the first try, so a finished run there may be that run's."""
    out_dir = args.out / pair.name
    outcome = _outcome_of(pair, args.out, rank)
    started = time.perf_counter()
    try:
        # Held from the "already done?" check to the end of the write: another run into this
        # folder (the same pair, or a moving file of the same name) is refused, not mixed in.
        with output_folder_lock(out_dir) as lock:
            if is_complete(out_dir) and not args.overwrite:
                refuse_other_results(out_dir, pair, engines, options)
                without_report = args.report and not (out_dir / REPORT_FILE).is_file()
                hint = "; pass --overwrite to run it again with --report" if without_report else ""
                meanwhile = ", found when the other run let go of its folder" if after_busy else ""
                print(f"{prefix}: skipped, already done{meanwhile} ({out_dir}){hint}")
                return {**outcome, "status": "skipped", **({"after_another_run": True} if after_busy else {})}
            fuse_pair(pair, out_dir, engines, prefix, batch=batch, report=args.report, lock=lock, **options)
    except FolderBusyError:
        raise
    except EarlierVersionResults as error:
        if args.pairs is None:
            raise
        print(f"{prefix}: kept: {error}", file=sys.stderr)
        return {**outcome, "status": "kept", "reason": str(error)}
    except (UniFuseError, OSError) as error:
        if args.pairs is None:
            raise
        # One bad pair must not sink a long batch (nor leave the other processes waiting at the
        # summary), nor one folder the file system refuses (a path too long for it); report it and carry on.
        reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
        print(f"{prefix}: error: {reason}", file=sys.stderr)
        return {**outcome, "status": "failed", "error": reason}
    print(f"{prefix}: done -> {out_dir}")
    return {**outcome, "status": "done", "seconds": round(time.perf_counter() - started, 3)}


def where_the_outputs_are(outcomes: list[dict[str, Any]]) -> str:
    """What a batch left, for a message: the same cause that stops the summary (a read-only --out)
    usually failed every pair, and then no pair has outputs to point to."""
    # Now, or earlier (kept: by an earlier version).
    finished = sum(outcome["status"] in ("done", "skipped", "kept") for outcome in outcomes)
    failed = sum(outcome["status"] == "failed" for outcome in outcomes)
    busy = sum(outcome["status"] == "busy" for outcome in outcomes)  # another run's still: not failed
    unfinished = [f"{failed} of {len(outcomes)} pairs failed (the errors are above)"] if failed else []
    unfinished += [f"{busy} of {len(outcomes)} pairs were still being written by another unifuse run"] if busy else []
    if failed == len(outcomes):
        every = "the one pair" if failed == 1 else f"all {failed} pairs"
        return f"no pair has outputs: {every} failed (the errors are above)"
    if not finished:
        return "no pair has outputs yet: " + "; ".join(unfinished)
    return "; ".join([f"{finished} finished pair(s) have their outputs in their folders, and a rerun skips them",
                      *unfinished])


def write_summary(outcomes: list[dict[str, Any]], pairs: list[Pair], job: Distributed, out: Path,
                  pairs_csv: Path) -> dict[str, int]:
    """``OUT/summary.json``: every pair's outcome in the CSV's order, with counts and the CSV they
    came from (a summary of another CSV it replaces is named); returns the counts of each status.
    Written beside it and renamed into place: a full disk leaves the earlier summary whole (OSError)."""
    order = {pair.name: position for position, pair in enumerate(pairs)}
    outcomes = sorted(outcomes, key=lambda outcome: order[outcome["name"]])
    counts = {status: sum(outcome["status"] == status for outcome in outcomes) for status in OUTCOME_STATUSES}
    out.mkdir(parents=True, exist_ok=True)
    pairs_csv = pairs_csv.resolve()
    earlier_summary = read_json_object(out / SUMMARY_FILE) or {}
    earlier = earlier_summary.get("pairs_csv")
    if earlier is not None and earlier != str(pairs_csv):
        print(f"note: {out / SUMMARY_FILE} described the batch of {earlier}; it now describes this one "
              f"({pairs_csv}); both batches' folders stay in {out}", file=sys.stderr)
    # Under provenance.json's key and layout for the same fact.
    write_json({"created": utc_timestamp(), "versions": {"napari_unifuse": __version__},
                "pairs_csv": str(pairs_csv), "pairs": len(pairs), **counts,
                "world_size": job.world_size, "device": str(job.device), "outcomes": outcomes,
                EARLIER_FAILURES: earlier_failures(earlier_summary, outcomes)},
               out / SUMMARY_FILE, atomic=True)
    said = ", ".join(f"{count} {status}" for status, count in counts.items() if count) or "no pairs"
    print(f"unifuse fuse: {said} ({job.world_size} process{'es' if job.world_size > 1 else ''}) "
          f"-> {out / SUMMARY_FILE}")
    return counts


def earlier_failures(earlier_summary: dict[str, Any], outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The failed outcomes of the summary this batch's replaces (its own and those it carried), for
    the pairs this batch did not run (``outcomes``: this batch's), each with the ``batch_created``
    time of the batch it failed in. One summary per --out, kept current, rather than one file per
    batch: the QC index still warns that such a pair's folder holds an earlier run's outputs, and a
    pair this batch ran has a newer word. A pair is known by its inputs, not its folder's name, which
    depends on the other rows of its CSV (a failed pair retried alone in a CSV of its own is
    ``mov``, not ``bad_mov``); by the name only where an older summary recorded no absolute paths.
    A pair another run held to the end ("busy") was not run."""
    ran = [outcome for outcome in outcomes if outcome["status"] != "busy"]
    ran_pairs = {_pair_of(outcome) for outcome in ran}
    ran_names = {outcome["name"] for outcome in ran}

    def was_run(failure: dict[str, Any]) -> bool:
        pair = _pair_of(failure)
        return pair in ran_pairs if pair is not None else failure.get("name") in ran_names

    recorded = [outcome for key in ("outcomes", EARLIER_FAILURES) if isinstance(earlier_summary.get(key), list)
                for outcome in earlier_summary[key]]
    return [{"batch_created": earlier_summary.get("created"), **outcome} for outcome in recorded
            if isinstance(outcome, dict) and outcome.get("status") == "failed" and not was_run(outcome)]


def _pair_of(outcome: dict[str, Any]) -> tuple[str, str] | None:
    """The reference and moving paths a summary's outcome records, where both are absolute."""
    reference, moving = outcome.get("reference"), outcome.get("moving")
    if isinstance(reference, str) and isinstance(moving, str) and Path(reference).is_absolute() \
            and Path(moving).is_absolute():
        return reference, moving
    return None


def fuse_pair(pair: Pair, out_dir: Path, engines: _EngineCache, prefix: str, batch: dict[str, int] | None = None,
              report: bool = False, lock: FolderLock | None = None, **options: Any) -> FusionResult:
    """Read, fuse and write one pair (``options`` go to ``run_fusion``), and its QC page when
    ``report`` (written with the outputs, before the ``provenance.json`` that marks them done);
    nothing is written unless fusion succeeded, and every earlier output in ``out_dir`` is
    replaced. ``batch`` (the process's rank and the world size of a sharded batch) goes into the
    provenance. ``lock``: the caller's held lock of ``out_dir`` (else the write takes it)."""
    changed_when_read = _input_change_times(pair)  # before reading: a file replaced meanwhile then differs
    with _out_of_memory_named("read", pair):
        reference, moving = read_image(pair.reference), read_image(pair.moving)
        # In world axis order, as run_fusion takes a 3-D pair: a label stored as its pair is (a coronal
        # NIfTI) is then on the outputs' grid as it is, not resampled onto it.
        label = read_image(pair.label).in_world_axis_order() if pair.label is not None else None
    # Described as read (a label replaced during the fusion must not be recorded for these metrics),
    # as the workbench describes it: a DICOM series by its UIDs, a reoriented file by its stored order.
    label_source = describe_label(label) if label is not None else None
    # Before the fusion: a label the metrics cannot be measured against fails at once, not after the work.
    label, label_warnings = checked_label(label, reference) if label is not None else (None, [])
    # Before the fusion: a pair that would overwrite an input fails at once, not after the work.
    refuse_overwriting_inputs(out_dir, (pair.reference, pair.moving, pair.label))
    engine = engines.for_dimensions(model_dimensions(reference))
    with TqdmProgress(prefix) as progress:
        result = engine.run_fusion(reference, moving, progress=progress, **options)
    if label is not None:  # its units are those of the moving image's mapping, known once it is run
        label_warnings += label_units_warnings(label, moving, run_moving_mapping(result))
    if label_warnings:  # recorded as the run's own warnings are: printed, in provenance.json and on the QC page
        result.warnings = [*result.warnings, *label_warnings]
        result.provenance["warnings"] = result.warnings
    for warning in result.warnings:
        print(f"{prefix}: warning: {warning}", file=sys.stderr)
    if batch:
        result.provenance["batch"] = batch
    result.provenance[INPUT_CHANGE_TIMES] = changed_when_read
    if label_source is not None:  # what metrics.json was measured against, for resuming
        result.provenance["inputs"]["label"] = label_source
    with _out_of_memory_named("label metrics", pair):
        metrics = label_metrics(result, label_in_model_units(result, label)) if label is not None else None

    def page() -> str:
        with _out_of_memory_named("QC page", pair):
            # The inputs as the outputs hold them (world axis order), as the workbench's page shows them.
            return report_page(result, out_dir, reference=reference.in_world_axis_order(),
                               moving=moving.in_world_axis_order(), metrics=metrics)

    # A write the disk refuses is one line naming the file (engine.outputs.write_files_together); the
    # QC page is made while the outputs are staged, so its failure too leaves the folder as it was.
    with _out_of_memory_named("write", pair):
        write_fusion_outputs(result, out_dir, metrics=metrics, remove_report=True, report=page if report else None,
                             lock=lock)
    return result


def _out_of_memory_named(stage: str, pair: Pair) -> AbstractContextManager[None]:
    """An allocation that fails in one of ``fuse_pair``'s own stages (the engine explains those of
    the fusion) becomes a one-line UniFuseError naming the stage and the pair, which fails only that
    pair of a batch."""
    return out_of_memory_explained(lambda: (
        f"the computer ran out of memory during the {stage!r} stage of the pair {pair.name}; close other programs "
        "and run again, or fuse a cropped or coarser copy of the images. Nothing of this pair was written and the "
        "inputs are unchanged."))


def refuse_other_results(out_dir: Path, pair: Pair, engines: _EngineCache, options: dict[str, Any]) -> None:
    """Raise an InputError unless the finished run in ``out_dir`` was made from this pair's inputs
    (the same paths as given and, where recorded, contents) with this run's method, checkpoint, tile
    size and ``options`` (``run_fusion``'s); ``EarlierVersionResults`` where it is this pair's run
    of an earlier version, which did not record all of them."""
    provenance = read_provenance(out_dir) or read_earlier_version_provenance(out_dir)
    if provenance is None:
        raise InputError(f"its {PROVENANCE_FILE} cannot be read or is not a UniFuse run's, so what made these "
                         "results is unknown; pass --overwrite to replace them, or choose another --out", out_dir)
    recorded_inputs = provenance["inputs"]
    recorded = {role: recorded_inputs.get(role) or {} for role in ("reference", "moving")}
    if not all(_names_recorded_path(recorded[role], path) for role, path in (("reference", pair.reference),
                                                                             ("moving", pair.moving))):
        # Another subject's results, not an outdated run of this pair: --overwrite would lose them.
        raise InputError(f"holds the results of another pair (reference {recorded['reference'].get('path')}, moving "
                         f"{recorded['moving'].get('path')}), which --overwrite would delete; choose another --out, "
                         "or pass --overwrite only if those results may go", out_dir)
    unrecorded = unrecorded_by_earlier_version(provenance, pair, out_dir, engines)
    differences = previous_run_differences(provenance, pair, engines, (out_dir / PROVENANCE_FILE).stat().st_mtime_ns,
                                           options, unrecorded=unrecorded)
    if not differences and not unrecorded:
        return
    if differences:
        named = [f"{role} image" if role in ("reference", "moving") else role for role in differences]
        also = f" (by {_earlier_version(unrecorded)})" if unrecorded else ""
        raise InputError(f"holds the results of a run with a different {_and_joined(named)}{also}; pass --overwrite "
                         "to replace them, or choose another --out", out_dir)
    raise EarlierVersionResults(f"holds this pair's results of {_earlier_version(unrecorded)} (whether this version "
                                "would make the same is unknown); kept as they are: pass --overwrite to redo the pair "
                                "with this version, or choose another --out", out_dir)


def _earlier_version(unrecorded: dict[str, str]) -> str:
    """The earlier version that made a run, by what it left unrecorded (``unrecorded_by_earlier_version``'s)."""
    # A bundled checkpoint's other weights come only with its settings unrecorded: never alone.
    recorded_none = [words for what, words in unrecorded.items() if what != "checkpoint"]
    shipped = f" and {unrecorded['checkpoint']}" if "checkpoint" in unrecorded else ""
    return f"an earlier version of unifuse, which recorded {_and_joined(recorded_none)}{shipped}"


def _and_joined(items: list[str]) -> str:
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]


def unrecorded_by_earlier_version(provenance: dict[str, Any], pair: Pair, out_dir: Path,
                                  engines: _EngineCache) -> dict[str, str]:
    """What the run ``provenance`` describes left unrecorded as an earlier version of unifuse wrote
    it, so that it cannot be compared with this request, each with its words: 'method' (before
    2026-12-03, UniFuse being the only one, no method nor its options), 'settings' (before
    2026-12-06), 'label' (a label given now, and the run wrote its metrics.json, but recorded no
    label input) and 'checkpoint' (a bundled checkpoint of this name, whose weights that version
    shipped otherwise), each with what that version did ("no method": it recorded none). Empty for this
    version's runs."""
    unrecorded = {}
    if "method" not in provenance:
        unrecorded["method"] = "no method"
    if provenance.get("requested_settings") is None:
        unrecorded["settings"] = "no settings"
    if pair.label is not None and "label" not in provenance["inputs"] and (out_dir / METRICS_FILE).is_file():
        unrecorded["label"] = "no label for its metrics.json"
    checkpoint_name = (provenance.get("checkpoint") or {}).get("name")
    if "settings" in unrecorded and checkpoint_name in list_checkpoints():
        dimensions = (provenance.get("model_config") or {}).get("spatial_dims")
        same_method = split_name(engines.method)[0] == _base_name(_recorded_method(provenance))
        if same_method and dimensions in (2, 3):
            requested = engines.for_dimensions(dimensions).checkpoint_info
            if requested.get("name") == checkpoint_name and requested.get("sha256") != provenance["checkpoint"].get(
                    "sha256"):
                unrecorded["checkpoint"] = f"shipped other weights as {checkpoint_name}"
    return unrecorded


def previous_run_differences(provenance: dict[str, Any], pair: Pair, engines: _EngineCache,
                             finished: int, options: dict[str, Any], unrecorded: Collection[str] = ()) -> list[str]:
    """What of 'reference', 'moving', 'label', 'method', 'checkpoint' and the settings ("tile size",
    ...: the engine's tile size and ``run_fusion``'s ``options``) the run ``provenance`` describes
    differs from this request; ``finished``: when that provenance was written (mtime, ns).
    ``unrecorded`` (``unrecorded_by_earlier_version``'s): what an earlier version's run cannot be compared by."""
    recorded_inputs = provenance.get("inputs") or {}
    change_times = provenance.get(INPUT_CHANGE_TIMES)
    changed_when_read = change_times if isinstance(change_times, dict) else {}  # {}: an older version's run
    differences = [role for role, path in pair.inputs if role not in unrecorded
                   and not _same_input(recorded_inputs.get(role), path, changed_when_read.get(role), finished)]
    recorded_method = _recorded_method(provenance)
    dimensions = (provenance.get("model_config") or {}).get("spatial_dims")
    # The names first: loading this run's method for the recorded dimensions needs it to support them.
    other_method = f"method ({recorded_method.get('name') or 'unrecorded'})"  # the one those results are of
    if split_name(engines.method)[0] != _base_name(recorded_method) or dimensions not in (2, 3):
        return [*differences, other_method]
    engine = engines.for_dimensions(dimensions)
    # Names aside (mmif-amin and mmif-amin:matching are one method): the options it ran with, as
    # provenance.json holds them (UniFuse's run of an earlier version recorded none).
    requested_method = json.loads(json.dumps(engine.method.describe(), default=str))
    if "method" not in unrecorded and {**requested_method, "name": None} != {**recorded_method, "name": None}:
        differences.append(other_method)
    if "checkpoint" not in unrecorded and engine.checkpoint_info.get("sha256") != (
            provenance.get("checkpoint") or {}).get("sha256"):
        differences.append("checkpoint")
    recorded_settings = provenance.get("requested_settings")
    if recorded_settings is not None:  # else an older version's run (unrecorded)
        differences += _settings_differences(recorded_settings, requested_settings(engine.tile_size, **options))
    return differences


def _recorded_method(provenance: dict[str, Any]) -> dict[str, Any]:
    """The method that made the run ``provenance`` describes, as recorded: UniFuse, options unknown,
    where no method is (versions before 2026-12-03 had no other, and recorded its checkpoint)."""
    return provenance["method"] if "method" in provenance else {"name": DEFAULT_METHOD}


def _base_name(method: dict[str, Any]) -> str:
    """A recorded method's name without its option ("mmif-amin:sitk" -> "mmif-amin"); "" where none."""
    return str(method.get("name", "")).partition(OPTION_SEPARATOR)[0]


def _settings_differences(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Which of ``settings`` the earlier run had otherwise, by name ("tile size")."""
    names = {"tile_size": "tile size", "reference_modality": "reference modality",
             "moving_modality": "moving modality", "quality": "quality maps choice",
             "uncertainty_passes": "number of uncertainty passes"}
    return [names[key] for key, value in settings.items() if recorded.get(key) != value]


def _same_input(recorded: dict[str, Any] | None, path: Path | None, changed_when_read: Any, finished: int) -> bool:
    """Whether ``path`` is the input ``recorded``: the same file and, where a hash was recorded, the
    same content. A file that still resolves to where it did and is untouched since the run read it
    (``changed_when_read``: its ``_last_changed`` then, None for a run that did not record it, which
    falls back to ``finished``) is what it read: only another file, or one modified or put in place
    (renamed, copied, unpacked: its inode change time, which no tool can set back) since, is hashed
    again, so that resuming a cohort does not read every finished pair's images, and neither a file
    swapped in with an old modification time, nor a symlink pointed at another file older than the
    run (git-annex, DataLad), is taken for the input."""
    if recorded is None or path is None:
        return recorded is None and path is None
    if not path.exists():
        raise InputError("file not found", path)
    if not _names_recorded_path(recorded, path):
        return False
    if recorded.get("sha256") is None:
        return True
    last_changed = _last_changed(path)
    untouched = last_changed == changed_when_read if isinstance(changed_when_read, int) else last_changed < finished
    if untouched and _resolves_as_recorded(recorded, path):
        return True
    return _content_hash(path) == recorded["sha256"]


def _resolves_as_recorded(recorded: dict[str, Any], path: Path) -> bool:
    """Whether ``path`` resolves to the file ``recorded`` (``describe_source``'s) resolved to: its
    ``resolved_path``, or its ``path`` where no symlink made that another."""
    return str(path.resolve()) == recorded.get("resolved_path", recorded.get("path"))


def _input_change_times(pair: Pair) -> dict[str, int]:
    """The ``_last_changed`` of each of ``pair``'s inputs, by role; none of one that cannot be read
    (reading it says why)."""
    times = {}
    for role, path in pair.inputs:
        with suppress(OSError):
            if path is not None and path.exists():
                times[role] = _last_changed(path)
    return times


def _names_recorded_path(recorded: dict[str, Any], path: Path) -> bool:
    """Whether ``path`` is the one ``recorded`` (``describe_source``'s) as given, or as reached
    through another folder link (``_in_real_folder``): two symlinks to one file are two subjects'
    inputs, not one. A record without ``resolved_path`` whose ``path`` is where ``path`` resolves to
    is taken as naming it too: earlier versions recorded only the resolved path, and their runs of
    inputs under a symlinked folder must still resume. So is a record whose file is gone (its project
    folder moved or renamed as a whole) where ``path`` has its name and content."""
    recorded_path = recorded.get("path")
    if not isinstance(recorded_path, str):
        return False
    if recorded_path == str(absolute_as_given(path)) or _recorded_in_real_folder(recorded) == _in_real_folder(path):
        return True
    if "resolved_path" not in recorded and recorded_path == str(path.resolve()):
        return True
    return (Path(recorded_path).name == absolute_as_given(path).name and not Path(recorded_path).exists()
            and recorded.get("sha256") is not None and path.exists() and _content_hash(path) == recorded["sha256"])


def _in_real_folder(path: Path) -> Path:
    """``path`` with the folder links on its way followed, not a link that is the file itself: one
    file reached through a symlinked folder (a linked home or scratch) is one input, while two
    git-annex/DataLad links to one blob stay two."""
    given = absolute_as_given(path)
    return given.parent.resolve() / given.name if given.is_symlink() else given.resolve()


def _recorded_in_real_folder(recorded: dict[str, Any]) -> Path | None:
    """``_in_real_folder`` of the path a provenance's input record names; None for none (in-memory data).
    A path whose links lead elsewhere today than to the ``resolved_path`` the run read (``current``
    pointed at the next release since) stays as recorded: the file it names now is not the one read."""
    if not isinstance(recorded.get("path"), str):
        return None
    path = Path(recorded["path"])
    if "resolved_path" in recorded and str(path.resolve()) != recorded["resolved_path"]:
        return path
    return _in_real_folder(path)


def _content_hash(path: Path) -> str:
    """``path``'s SHA-256 as a run records it (``sha256_of_path`` of the path as given: a ``.dcm``
    file's whole series), hashed once while it stays unchanged: finding a moved project's runs and
    confirming them compare each input with a record more than once."""
    return _hash_of_unchanged(str(absolute_as_given(path)), _last_changed(path))


@lru_cache(maxsize=1024)
def _hash_of_unchanged(given: str, last_changed: int) -> str:
    return sha256_of_path(given)


def _last_changed(path: Path) -> int:
    """When ``path`` was last modified or put in place (the later of its modification and inode
    change times, in ns: exact in JSON). A DICOM input (a series folder, or a ``.dcm`` file read with
    its series) counts every file in its series folder too: a slice rewritten in place changes its
    own times, not the folder's. Only their times are read, never their contents."""
    paths = [path]
    if file_format(path) == "dicom":
        paths += (path if path.is_dir() else path.parent).iterdir()
    # exists(): a dangling link beside the series is no part of it (and has no times to read).
    return max(max(status.st_mtime_ns, status.st_ctime_ns)
               for status in (entry.stat() for entry in paths if entry.exists()))


def refuse_folders_overlapping_inputs(pairs: list[Pair], out: Path) -> None:
    """Raise an InputError (one line, before any work) when a pair's folder in ``out`` is an input
    folder (a DICOM series) of any pair, lies inside one or holds an input of any pair, by the paths
    as given or as they resolve: the folder is the run's to write, lock and clear (``--overwrite``),
    a series folder's outputs would be read back as part of the series, and another row's input in
    it would be replaced, or read after its pair replaced it. Each folder is looked up in sets of the
    inputs and of the folders above them, not compared with every input: a cohort has thousands of rows."""
    InputOf = tuple[Pair, str, Path]  # the pair, its role and the path as given
    inputs: dict[Path, InputOf] = {}
    holding_folders: dict[Path, InputOf] = {}
    for pair in pairs:
        for role, source in pair.inputs:
            if source is None:
                continue
            for path in (absolute_as_given(source), source.resolve()):
                inputs.setdefault(path, (pair, role, source))
                for folder in path.parents:
                    if folder in holding_folders:  # and so is every folder above it
                        break
                    holding_folders[folder] = (pair, role, source)
    for pair in pairs:
        out_dir = out / pair.name
        for folder in (absolute_as_given(out_dir), out_dir.resolve()):
            if folder in inputs:
                where, (holder, role, source) = "is this input folder", inputs[folder]
            elif folder in holding_folders:
                where, (holder, role, source) = "holds this input", holding_folders[folder]
            else:
                around = next((inputs[above] for above in folder.parents if above in inputs), None)
                if around is None:
                    continue
                where, (holder, role, source) = "lies inside this input folder", around
            if pair.line is None:
                raise InputError(f"the pair's output folder {out_dir} {where}; choose another --out", source)
            raise InputError(f"the output folder {out_dir} of line {pair.line} of the CSV {where}, the {role} of "
                             f"line {holder.line}; choose another --out", source)


def case_name(moving: Path) -> str:
    """``case7`` for ``case7.nii.gz``, from the path as given: a symlink is named by its own name,
    not its target's (a git-annex/DataLad ``ct.png`` links to a ``SHA256E-...`` blob); a DICOM folder
    keeps its name, also when given as ``.`` or ``..`` (whose own names would put the outputs in
    ``--out`` itself or above it), and so does, dots as underscores, a file with only dots before its
    extension (``_nii_gz`` for ``.nii.gz``, ``___png`` for ``...png``)."""
    given = absolute_as_given(moving)
    # A ".." left after a symlinked folder means its target's parent: named as that resolves.
    name = (moving.resolve() if given.name == ".." else given).name or "moving"  # "": the root
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if stem.strip(".") else name.replace(".", "_")  # never "", "." nor ".."
    return name


class _EngineCache:
    """Loads the method once per dimensionality per run, however many pairs use it."""

    def __init__(self, method: str | None, checkpoint: str | None, device: str, tile_size: int | None) -> None:
        if method is None:
            method = checkpoint_method(checkpoint) if checkpoint is not None else DEFAULT_METHOD
        self.method, self.checkpoint, self.device, self.tile_size = method, checkpoint, device, tile_size
        self.engines: dict[int, FusionEngine] = {}

    def for_dimensions(self, ndim: int) -> FusionEngine:
        if ndim not in self.engines:
            method = load_method(self.method, checkpoint=self.checkpoint, spatial_dims=ndim)
            self.engines[ndim] = FusionEngine(method, device=self.device, tile_size=self.tile_size)
        return self.engines[ndim]


# Without a terminal (a batch's log file, a cluster job), a line of where a long pair stands at the
# first step the engine reports after this long without one: a clinical volume takes many minutes,
# and a log of its stages and tiles shows it alive (a one-step stage, such as the dense refinement,
# is seen only when it ends).
LOG_PROGRESS_EVERY_S = 60.0


class TqdmProgress:
    """The engine's ``progress(stage, done, total)`` drawn as one tqdm bar per stage on a terminal;
    elsewhere a plain line on stderr at most every ``LOG_PROGRESS_EVERY_S`` seconds, so that logs
    and captured output of short runs stay clean."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.bar: tqdm | None = None
        self.stage: str | None = None
        self.started = self.logged = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or stage != self.stage or total != self.bar.total:
            self.close()
            # disable=None: draw only on a terminal.
            self.bar = tqdm(total=total, desc=f"{self.prefix} {stage}", unit="step", leave=False, disable=None)
            self.stage = stage
        if self.bar.disable:
            self._log(stage, done, total)
        else:
            self.bar.update(done - self.bar.n)

    def _log(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.logged >= LOG_PROGRESS_EVERY_S:
            print(f"{self.prefix}: {stage} {done}/{total} ({now - self.started:.0f} s so far)", file=sys.stderr,
                  flush=True)
            self.logged = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pairs_from_args(args: argparse.Namespace) -> list[Pair]:
    check_one_pair_or_many(args, ("reference", "moving", "label"))
    if args.pairs is not None:
        pairs = read_pairs_csv(args.pairs)
    else:
        pairs = [Pair(args.reference, args.moving, args.label)]
    if args.out.exists() and not args.out.is_dir():
        raise InputError("--out must be a folder (the outputs go into one sub-folder per pair), "
                         f"but {args.out} is a file")
    if args.pairs is not None:
        refuse_foreign_batch_files(args.out, args.report)
    pairs = in_earlier_folders(pairs, args.out)
    refuse_folders_overlapping_inputs(pairs, args.out)
    if args.uncertainty_passes < 0:
        raise InputError(f"--uncertainty-passes must be 0 or more, got {args.uncertainty_passes}")
    if args.tile_size is not None and args.tile_size < 1:
        raise InputError(f"--tile-size must be a positive number of voxels, got {args.tile_size}")
    return pairs


def refuse_foreign_batch_files(out: Path, report: bool) -> None:
    """Raise an InputError, before any pair is fused, where ``out`` holds a ``summary.json`` or (with
    ``report``) an ``index.html`` that unifuse did not write: the batch's own would replace it at its end."""
    summary = out / SUMMARY_FILE
    if summary.is_file() and not _is_batch_summary(read_json_object(summary)):
        raise InputError("is not a batch summary unifuse wrote, and the batch's summary goes there, so nothing "
                         "was fused; move it away or choose another --out", summary)
    index = out / INDEX_FILE
    if report and index.is_file() and not is_qc_index(index):  # as `unifuse report` does, never replaced unasked
        raise InputError(f"is not a QC index unifuse wrote, so it is left as it is and nothing was fused; unifuse "
                         f"report {out} --overwrite replaces it with a QC index, or fuse without --report", index)


def _is_batch_summary(summary: dict[str, Any] | None) -> bool:
    """Whether ``summary`` has what every version of ``write_summary`` wrote: the pairs and their outcomes."""
    return summary is not None and "pairs" in summary and isinstance(summary.get("outcomes"), list)


def read_pairs_csv(path: Path) -> list[Pair]:
    """Pairs from a CSV with a header ``reference,moving`` and optionally ``label`` (any other
    column is refused: a misspelled ``lable`` would fuse without metrics, unnoticed)."""
    # read_pairs_rows refuses a row without a reference or moving cell; label is optional.
    rows = read_pairs_rows(path, required=("reference", "moving"), optional=("label",))

    def resolve(value: str) -> Path | None:
        # Relative paths mean "next to the CSV", so a dataset folder can be moved as a whole.
        return (path.parent / value) if value else None

    pairs = [Pair(path.parent / row["reference"], path.parent / row["moving"], resolve(row["label"]),
                  line=line) for line, row in rows]
    _refuse_repeated_moving_files(pairs, [row["moving"] for _, row in rows], path)
    names = output_folder_names([pair.moving for pair in pairs])
    _refuse_shared_folders(names, path)
    return [replace(pair, output_name=name) for pair, name in zip(pairs, names, strict=True)]


def _refuse_repeated_moving_files(pairs: list[Pair], written: list[str], csv_path: Path) -> None:
    """Raise an InputError naming the CSV lines that list one moving file (by the path as given), as
    the first of them writes it (``written``: each row's moving cell): their pairs share a folder."""
    rows_of: dict[Path, list[tuple[int | None, str]]] = {}
    for pair, cell in zip(pairs, written, strict=True):
        rows_of.setdefault(absolute_as_given(pair.moving), []).append((pair.line, cell))
    for rows in rows_of.values():
        if len(rows) > 1:
            lines = [str(line) for line, _ in rows]
            raise InputError(f"lines {', '.join(lines[:-1])} and {lines[-1]} of the CSV have the same moving file "
                             f"{rows[0][1]}; list each moving file in one row only", csv_path)


def _refuse_shared_folders(names: list[str], source: Path | None) -> None:
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        # Not always one file twice: an earlier run's folder, or a file named as another's folder would be.
        raise InputError(f"several pairs would write to the same output folder: {', '.join(clashes)}; list each "
                         "moving file in one row only, or rename one of the moving files that share it", source)


# A run whose inputs are gone from where it recorded them: its folder's name, recorded reference and moving.
MovedRun = tuple[str, dict[str, Any], dict[str, Any]]


def in_earlier_folders(pairs: list[Pair], out: Path) -> list[Pair]:
    """``pairs``, each in the folder of ``out`` that already holds its run (the same reference and
    moving files in its provenance, ``_names_recorded_path``) when that is not the folder its name
    gives: a folder's name depends on the other rows of the CSV it was fused from (``0003_moving``
    beside ``0004_moving``), and on the path the CSV was given by (through a folder link, or in a
    project folder since moved as a whole), so a CSV of other rows (one failed pair to retry) or a
    rerun by another path finds it, rather than fusing it again elsewhere or calling the folder
    another run's. A pair with no run yet whose folder holds the run of another moving file of its
    name (``ct1/mov.png`` of an earlier batch, ``a/mov.png`` now) gets a folder of its own, named as
    if both were rows of one CSV (``a_mov``): a cohort grows batch by batch, and each rerun finds its
    folder again by its provenance."""
    if not out.is_dir():
        return pairs
    folders: dict[tuple[Path | None, Path | None], set[str]] = {}
    moving_in: dict[str, dict[str, Any]] = {}  # folder name -> the moving input its run recorded
    # Moving file name -> its recorded hash -> (folder name, recorded reference and moving) of the runs
    # whose inputs are gone from where they recorded them: a project folder moved as a whole, found by
    # content; indexed by both so that a cohort of one file name (every subject's ct.png) is not N x N.
    moved: dict[str, dict[str, list[MovedRun]]] = {}
    try:
        subfolders = list(out.iterdir())
    except OSError as error:
        raise InputError(f"--out cannot be read ({error.strerror or error}), so its earlier results cannot be "
                         "found; make it readable or choose another --out", out) from error
    for folder in subfolders:
        # Never a pair's earlier folder: one named as a batch file (an older version made them) would
        # keep stopping the batch's summary or index.
        provenance = (read_provenance(folder) or read_earlier_version_provenance(folder)) \
            if folder.is_dir() and folder.name not in BATCH_FILES else None
        if provenance is not None:
            inputs = provenance["inputs"]
            reference, moving = inputs.get("reference") or {}, inputs.get("moving") or {}
            key = (_recorded_in_real_folder(reference), _recorded_in_real_folder(moving))
            folders.setdefault(key, set()).add(folder.name)
            if key[1] is not None:
                moving_in[folder.name] = moving
                if not all(path is None or path.exists() for path in key) and moving.get("sha256") is not None:
                    moved.setdefault(key[1].name, {}).setdefault(moving["sha256"], []).append(
                        (folder.name, reference, moving))
    held: dict[int, str] = {}  # a pair's position -> the folder holding its run, by its inputs' paths
    for index, pair in enumerate(pairs):
        held_in = folders.get((_in_real_folder(pair.reference), _in_real_folder(pair.moving)), set())
        if held_in:
            held[index] = pair.name if pair.name in held_in else min(held_in)
    # Then, by content, the runs of a moved project, each for one pair at most; only then other folders.
    claimed = set(held.values())
    for index, pair in enumerate(pairs):
        if index not in held:
            held[index] = _moved_run_of(pair, _moved_runs_of_its_content(pair, moved), claimed) \
                or _own_folder_name(pair, moving_in)
            claimed.add(held[index])
    placed = [replace(pair, output_name=held[index]) for index, pair in enumerate(pairs)]
    _refuse_shared_folders([pair.name for pair in placed], None)
    return placed


def _moved_runs_of_its_content(pair: Pair, moved: dict[str, dict[str, list[MovedRun]]]) -> list[MovedRun]:
    """The runs of ``moved`` (``in_earlier_folders``') whose moving file had ``pair``'s moving file's
    name and content; its content is hashed only where a moved run of its name exists."""
    of_its_name = moved.get(absolute_as_given(pair.moving).name)
    if not of_its_name or not pair.moving.exists():
        return []
    return of_its_name.get(_content_hash(pair.moving), [])


def _moved_run_of(pair: Pair, runs: list[MovedRun],
                  claimed: Collection[str]) -> str | None:
    """The folder, of ``runs`` (``in_earlier_folders``' moved ones) not ``claimed`` by another pair,
    whose run recorded ``pair``'s inputs (by name and content where its own are gone); where several
    did (links to one blob, git-annex), the one whose recorded paths end in the most folders of the
    pair's (``s1/ct.png`` for ``s1/ct.png``): a project moved as a whole keeps its layout."""
    found = [(-_shared_tail(reference["path"], pair.reference) - _shared_tail(moving["path"], pair.moving), name)
             for name, reference, moving in runs if name not in claimed
             and _names_recorded_path(reference, pair.reference) and _names_recorded_path(moving, pair.moving)]
    return min(found)[1] if found else None


def _shared_tail(recorded: str, path: Path) -> int:
    """How many of their last parts (the file's name, the folders above it) ``recorded`` and ``path`` share."""
    pairs_of_parts = zip(reversed(Path(recorded).parts), reversed(absolute_as_given(path).parts))
    return sum(1 for _ in takewhile(lambda parts: parts[0] == parts[1], pairs_of_parts))


def _own_folder_name(pair: Pair, moving_in: dict[str, dict[str, Any]]) -> str:
    """The name of ``pair``'s folder beside the runs already in --out (``moving_in``: the moving
    input each folder's run recorded): its own name, with parent folders' names in front (as
    ``output_folder_names`` tells apart one CSV's files) while a run of another moving file holds
    the folder of that name. The same moving file with another reference keeps the folder, where
    the run there is refused unless ``--overwrite``."""
    others: list[Path] = []
    name = pair.name
    while name in moving_in and not _names_recorded_path(moving_in[name], pair.moving):
        other = Path(moving_in[name]["path"])
        if other in others:  # named as that one at every depth: no folder of its own to give
            break
        others.append(other)
        name = output_folder_names([*others, pair.moving])[-1]
    return name


def output_folder_names(movings: list[Path]) -> list[str]:
    """Each pair's output folder: named after its moving file (``case7``), with as many of its
    parent folders' names in front as tell apart files of one name (``unifuse synth --pairs``
    writes ``0000/moving.png``, ``0001/moving.png``: ``0000_moving``, ``0001_moving``). Different
    files of one name in one folder are told apart by their extension instead: ``m2_png`` and
    ``m2_jpg`` for ``m2.png`` beside ``m2.jpg``, ``case7_nii_gz`` and ``case7`` for ``case7.nii.gz``
    beside the DICOM folder ``case7``, and so is a file named as a batch file of ``--out``
    (``index.html_png`` for ``index.html.png``, beside ``OUT/index.html``). A name no other file
    shares never changes: a rerun finds its folder; nor one within a file name's length
    (``_within_name_limit``)."""
    given = [absolute_as_given(moving) for moving in movings]
    cases = [case_name(moving) for moving in movings]
    files_of: dict[tuple[Path, str], set[Path]] = {}
    for path, case in zip(given, cases, strict=True):
        files_of.setdefault((path.parent, case), set()).add(path)
    bases = []
    for path, case in zip(given, cases, strict=True):
        shared = len(files_of[path.parent, case]) > 1 or case in BATCH_FILES
        extension = _extension_after(case, path) if shared else ""
        bases.append(f"{case}_{extension}" if extension else case)
    names = list(bases)
    parents = [path.parent.parts[1:] for path in given]  # [1:]: not the root "/"
    for depth in range(1, max(map(len, parents), default=0) + 1):
        clashing = {name for name in names if names.count(name) > 1 or name in BATCH_FILES}
        if not clashing:
            break
        names = [("_".join((*parent[-depth:], base)) if name in clashing else name)
                 for name, parent, base in zip(names, parents, bases, strict=True)]
    return [_within_name_limit(name) for name in names]


def _within_name_limit(name: str) -> str:
    """``name``, or where it is longer than a file name may be (parents' names in front of a moving
    file's), its start cut at a whole character and a hash of the whole: one name per pair, the same
    on every run."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    return f"{encoded[: NAME_MAX_BYTES - len(digest) - 1].decode('utf-8', 'ignore')}-{digest}"


def _extension_after(base: str, path: Path) -> str:
    """What follows ``base`` in ``path``'s name, dots as underscores (``nii_gz`` for ``case7.nii.gz``);
    "" for a DICOM folder, named ``base`` itself."""
    return path.name[len(base):].lstrip(".").replace(".", "_") if path.name.startswith(base) else ""
