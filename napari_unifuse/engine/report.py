"""The QC report of a run: one self-contained HTML page, and an index of a cohort's pages.

``write_report`` puts ``report.html`` into the run folder (``report_page`` is its text): under the
verdict, the slices lying mostly outside the moving image's field of view (no evidence of alignment
there); the inputs, the most suspicious slices with the quality maps drawn over the fused image,
the metrics, the degradation plot with the per-slice suspicion beside it (a sentence instead for a
method that estimates no degradation), the uncertainty summary (saying so where it probed UniFuse's
structural matching rather than the method's own alignment), the reviewers' annotations and the
provenance. Figures are drawn with matplotlib's Agg canvas (no display, no pyplot state) and
embedded as base64 PNG, so the page can be mailed or archived on its own. Every image panel shows
the patient in one orientation, as napari shows the world, whatever order a file stores its voxels
in, with the patient's sides at its edges (``PlaneView``).

``write_index`` puts ``index.html`` into a cohort folder: one row per finished run (a folder holding
``provenance.json`` and the outputs written before it), most suspicious first by the largest
per-slice suspicion in its ``quality.json``, linking the run's report; below them each batch's size
and outcome counts (its ``summary.json``), its failed pairs with their errors (those of earlier
batches into the folder too), and the unfinished run folders (those whose outputs were deleted named
with what they lack). A pair that
failed in a batch wrote nothing: a run its folder still holds is an earlier one's, and its row says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from napari_unifuse.engine.alignment_guard import IDENTITY
from napari_unifuse.engine.annotations import (
    Annotation,
    AnnotationStore,
    InputHashes,
    SkippedLine,
    describe_location,
    describe_subject,
    walk_runs_tree,
)
from napari_unifuse.engine.outputs import (
    DEGRADATION_FILE,
    DISPLACEMENT_FILE,
    METRICS_FILE,
    PROVENANCE_FILE,
    QUALITY_FILE,
    REPORT_FILE,
    cannot_write_there,
    missing_outputs,
    read_json_object,
    write_text_atomically,
)
from napari_unifuse.engine.overlays import display_grey, slice_of
from napari_unifuse.engine.quality import (
    INVENTED,
    LOST,
    MAP_LABELS,
    MIN_SLICES_FOR_BASELINE,
    PROBLEM_NAMES,
    RESTORATION_CHANGE,
    UNCERTAINTY,
    QualityMaps,
)
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import ImageVolume
from napari_unifuse.io.readers import is_picture

INDEX_FILE = "index.html"
# cli.fuse's SUMMARY_FILE (the engine does not import the command line): a batch's pairs and outcomes.
BATCH_SUMMARY_FILE = "summary.json"
# Its list of the failed outcomes of earlier batches into the same folder, for pairs it did not run,
# each with its batch's "batch_created" time (cli.fuse.earlier_failures).
EARLIER_FAILURES = "earlier_failures"
# An outcome's time (UTC ISO), when the batch reached it; summaries before 2026-12-07 lack it, and
# only their "created" (the batch's end) and "batch_created" times tell when a failure was.
OUTCOME_FINISHED = "finished"
# What a run writes besides provenance.json: a folder holding one without it is an unfinished run.
_RUN_OUTPUT_FILES = frozenset({DEGRADATION_FILE, DISPLACEMENT_FILE, QUALITY_FILE, METRICS_FILE, REPORT_FILE})
# cli.synth's META_FILE: the record a `unifuse synth` pair folder gets last. That folder also holds the
# pair's ground-truth displacement.nii.gz, but is no run; these keys of its record tell it apart.
SYNTH_META_FILE = "meta.json"
_SYNTH_META_KEYS = frozenset({"files", "degradation", "misalignment", "seed", "displacement_convention"})
KEY_SLICES = 3
# Section ids and titles, in page order.
SECTIONS: dict[str, str] = {
    "inputs": "Inputs",
    "key-slices": "Most suspicious slices",
    "metrics": "Metrics",
    "degradation": "Degradation estimate",
    "uncertainty": "Alignment uncertainty",
    "annotations": "Annotations",
    "provenance": "Provenance",
}
# provenance["method"] of the methods that align by UniFuse's structural matching, the alignment
# the uncertainty passes probe: UniFuse itself, and any method registering with the "matching"
# registration (engine.classical: the classical pipelines' and MMIF-AMIN's).
_STRUCTURAL_MATCHING_METHOD = "unifuse"
_STRUCTURAL_MATCHING_REGISTRATION = "matching"
# Maps are named as in the workbench (``quality.MAP_LABELS``); the problems a map points at (the
# verdict, the annotation categories) keep ``quality.PROBLEM_NAMES``.
# Overlay colour of each map where it exceeds its threshold (colour-blind-safe Okabe-Ito hues).
OVERLAY_COLOURS: dict[str, str] = {INVENTED: "#D55E00", LOST: "#0072B2", RESTORATION_CHANGE: "#009E73",
                                   UNCERTAINTY: "#F0E442"}
_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.8em}
.flag{color:#b00;font-weight:bold}.note{color:#555}"""


def write_report(
    result: FusionResult,
    out_dir: str | os.PathLike,
    *,
    reference: ImageVolume,
    moving: ImageVolume,
    annotations: Sequence[Annotation] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` for ``result`` (the run of ``reference`` and ``moving``);
    ``annotations`` default to those saved in ``out_dir``. Returns the page's path. The page is
    written beside it and renamed into place: an interrupt or a full disk leaves the earlier page
    (or none), never a truncated one. A folder that cannot be written (a file in its path, a
    read-only or full disk) is an InputError naming it, as for the run's other outputs
    (``engine.outputs.write_files_together``)."""
    out_dir = Path(out_dir)
    page = report_page(result, out_dir, reference=reference, moving=moving, annotations=annotations,
                       metrics=metrics)
    path = out_dir / REPORT_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # errors="replace": an input path that is not UTF-8 (in the provenance) shows as "?", not a crash.
        write_text_atomically(path, page, errors="replace")
    except OSError as error:
        raise cannot_write_there(out_dir, error) from error
    return path


def report_page(
    result: FusionResult,
    out_dir: str | os.PathLike,
    *,
    reference: ImageVolume,
    moving: ImageVolume,
    annotations: Sequence[Annotation] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> str:
    """The QC page ``write_report`` writes, as text: for the run folder ``out_dir`` (its name heads
    the page; ``annotations`` default to those saved there). ``engine.outputs.write_fusion_outputs``
    takes it to write the page with the run's other outputs. Annotations made on other inputs than
    ``reference`` and ``moving`` (an earlier run's, in a folder since overwritten) are listed apart."""
    out_dir = Path(out_dir)
    skipped: list[SkippedLine] = []
    if annotations is None:
        store = AnnotationStore(out_dir)
        annotations = store.load()
        skipped = store.skipped
    # The pair folder alone ("moving") does not say which pair this is: the inputs' names head it.
    name = f"{_input_names(reference, moving, result.provenance)} ({_readable(out_dir.resolve().name)})"
    # The results lie on the reference's grid: a picture's axes are theirs too.
    fused_view = _view_of(result.fused, _shows_anatomy(reference))
    bodies = {
        "inputs": _inputs_section(reference, moving, result),
        "key-slices": _key_slices_section(result, fused_view),
        "metrics": _metrics_section(result, metrics or {}),
        "degradation": _degradation_section(result),
        "uncertainty": _uncertainty_section(result.quality, fused_view, _mapping(result.provenance.get("method"))),
        "annotations": _annotations_section(annotations, result.fused.spatial_shape, skipped, reference, moving),
        "provenance": f"<pre>{html.escape(json.dumps(result.provenance, indent=2, default=str), quote=False)}</pre>",
    }
    sections = "\n".join(f'<section id="{key}"><h2>{SECTIONS[key]}</h2>\n{bodies[key]}\n</section>' for key in SECTIONS)
    warnings = "".join(f"<li>{html.escape(warning)}</li>" for warning in result.warnings)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>UniFuse QC report: {html.escape(name)}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>UniFuse QC report: {html.escape(name)}</h1>\n<p>{_verdict(result.quality)}</p>\n"
            f"{_outside_moving_line(result.quality)}{_alignment_line(result)}"
            f"{f'<ul class=note>{warnings}</ul>' if warnings else ''}\n{sections}\n</body></html>\n")


def write_index(runs_dir: str | os.PathLike,
                on_unreadable: Callable[[Path, OSError], object] | None = None) -> Path:
    """Write ``runs_dir/index.html``: every run below ``runs_dir`` (symbolic links to run folders
    followed), most suspicious first. Files a run left damaged or of another shape are named in its
    row; they never stop the index. A folder that cannot be read (permission denied) is left out:
    the page names it, and so does ``on_unreadable(folder, error)``, once per folder. The page is
    written beside ``index.html`` and renamed into place, so a full disk leaves the earlier index."""
    runs_dir = Path(runs_dir)
    unreadable: list[tuple[Path, OSError]] = []
    cohort = _cohort_folders(runs_dir, unreadable)
    failed = _failed_pairs(cohort, runs_dir)
    stale = {pair.folder: pair for pair in failed if pair.run is not None and not pair.run_is_later}
    rows = [_IndexRow.of(run, runs_dir) for run in cohort.runs]
    for folder, error in unreadable:
        if on_unreadable is not None:
            on_unreadable(folder, error)
    rows.sort(key=_IndexRow.rank)
    lines = []
    for row in rows:
        shown = html.escape(_readable(row.relative))
        link = (f'<a href="{html.escape(_url_path(row.relative), quote=True)}/{REPORT_FILE}">{shown}</a>'
                if (row.run / REPORT_FILE).is_file()
                else f"{shown} <span class=note>(no report: run <code>unifuse fuse --report --overwrite</code>)</span>")
        failed_since = stale.get(Path(os.path.realpath(row.run)))
        if failed_since is not None:
            batch = html.escape(_readable(failed_since.named_batch()))
            link += (f" <span class=flag>(failed in the batch of {batch}: these are an earlier run's outputs, "
                     "maybe not of the pair's current inputs)</span>")
        lines.append(f"<tr><td>{link}</td><td>{html.escape(row.inputs)}</td><td>{html.escape(row.suspicion)}</td>"
                     f"<td>{html.escape(row.flagged)}</td><td>{html.escape(row.problems)}</td>"
                     f"<td>{html.escape(row.created)}</td></tr>")
    table = ("<table><tr><th>run</th><th>inputs</th><th>largest slice suspicion</th><th>suspicious slices</th>"
             "<th>problems</th><th>created</th></tr>\n" + "\n".join(lines) + "</table>") if lines else \
        "<p>No runs (folders with provenance.json) here.</p>"
    if unreadable:
        listed = "".join(f"<li>{html.escape(_readable(str(folder)))} "
                         f"({html.escape(error.strerror or str(error))})</li>" for folder, error in unreadable)
        table += f"\n<p class=flag>Folders that could not be read, left out:</p><ul>{listed}</ul>"
    table += _batches_and_unfinished(cohort, runs_dir, failed)
    title = html.escape(_readable(runs_dir.resolve().name))
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>UniFuse QC: "
            f"{title}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>UniFuse QC: {title}</h1>\n<p>{len(rows)} finished run{'' if len(rows) == 1 else 's'}, most suspicious "
            "first (suspicion: the largest fraction of one slice that one quality map flags).</p>\n"
            f"{table}\n</body></html>\n")
    path = runs_dir / INDEX_FILE
    write_text_atomically(path, page, errors="replace")
    return path


# ---- sections ------------------------------------------------------------------------------------
def _verdict(quality: QualityMaps | None) -> str:
    if quality is None:
        return "<span class=note>No quality maps were computed for this run.</span>"
    flagged = quality.suspicious_slices()
    if quality.slice_count == 1:  # a 2-D image or a one-slice volume: "the image", as in the key slices
        return (f"<span class=flag>The image is flagged</span> ({_flag_reasons(quality, 0)})." if flagged
                else "The image is not flagged by the quality maps.")
    # A map flagging the whole volume comes first: no slice standing out is then no good news.
    whole_volume = whole_volume_text(quality)
    whole_volume = f"<span class=flag>{html.escape(whole_volume, quote=False)}</span>" if whole_volume else ""
    if not flagged:
        return whole_volume or "No slice is flagged by the quality maps."
    listed = ", ".join(f"{index} ({_flag_reasons(quality, index)})" for index in flagged[:12])
    more = f" and {len(flagged) - 12} more" if len(flagged) > 12 else ""
    return (f"{whole_volume + ' ' if whole_volume else ''}"
            f"<span class=flag>{len(flagged)} of {quality.slice_count} slices flagged</span>: {listed}{more}.")


# What a reviewer must not trust where a map flags the whole volume (``whole_volume_text``).
_UNTRUSTED_PART: dict[str, str] = {UNCERTAINTY: "alignment", INVENTED: "fused image", LOST: "fused image",
                                   RESTORATION_CHANGE: "restoration"}


def whole_volume_text(quality: QualityMaps | None) -> str:
    """The maps that flag most of a typical slice of the volume (``QualityMaps.whole_volume_flags``),
    in a reviewer's words, or "" where none does: the per-slice verdict flags no slice of a volume
    affected throughout, which must not read as a clean run. The report and the Review tab say it alike."""
    flags = {} if quality is None else quality.whole_volume_flags()
    return " ".join(f"The {MAP_LABELS[name]} flags {100 * share:.1f} % of a typical slice of this volume: no slice "
                    f"stands out because every slice is affected; do not trust this run's {_UNTRUSTED_PART[name]}."
                    for name, share in flags.items())


def _flag_reasons(quality: QualityMaps, index: int) -> str:
    """The problems of the maps that flag slice ``index`` (``QualityMaps.flagged_by``), not of the
    map that merely scores highest there: "hallucinated structure + misalignment"."""
    return " + ".join(PROBLEM_NAMES[name] for name in quality.flagged_by(index))


def _outside_moving_line(quality: QualityMaps | None) -> str:
    """``outside_moving_text`` as a flagged paragraph of the report."""
    text = outside_moving_text(quality)
    return f"<p class=flag>{html.escape(text, quote=False)}</p>\n" if text else ""


def outside_moving_text(quality: QualityMaps | None) -> str:
    """The slices the moving image reaches less than half of (``QualityMaps.slices_outside_moving``),
    in a reviewer's words, or "" where it reaches them all: there the aligned and fused images hold no
    moving data, only what the alignment moved in, so their maps must not be read as evidence of a
    good alignment. The report and the workbench's Review tab say it alike."""
    outside = [] if quality is None else quality.slices_outside_moving()
    if quality is None or not outside:
        return ""
    where = ("More than half of the image lies" if quality.slice_count == 1 else
             f"{len(outside)} of {quality.slice_count} slices ({_slice_ranges(outside)}) lie more than half")
    return f"{where} outside the moving image's field of view: not evidence of alignment, no moving data there."


def _slice_ranges(indices: Sequence[int]) -> str:
    """Ascending slice indices as runs of consecutive ones: [0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _alignment_line(result: FusionResult) -> str:
    """The alignment guard's decision as the run recorded it (``provenance["alignment_guard"]``):
    which field the fused image was aligned with and why. Kept identity means the moving image was
    not registered at all, which a reviewer must know before reading the fused image."""
    recorded = _mapping(result.provenance.get("alignment_guard"))  # None for methods without a guard
    message = recorded.get("message")
    if not message:
        return ""
    if recorded.get("kept") == IDENTITY:
        return (f"<p class=flag>Not registered: the fused image uses the moving image as it lies on the "
                f"reference grid (alignment guard: {html.escape(str(message))}).</p>\n")
    return f"<p>Alignment guard: {html.escape(str(message))}.</p>\n"


def _inputs_section(reference: ImageVolume, moving: ImageVolume, result: FusionResult) -> str:
    # Every panel across the world axis the reference is drawn across, each in the same orientation;
    # the results lie on the reference's grid, so its picture or patient axes are theirs.
    across = _world_axis_sliced(reference)
    reference_anatomy = _shows_anatomy(reference)
    images = [(title, volume, _view_across(volume, across, anatomy)) for title, volume, anatomy in (
        ("reference", reference, reference_anatomy), ("moving (input)", moving, _shows_anatomy(moving)),
        ("aligned + restored", result.aligned, reference_anatomy), ("fused", result.fused, reference_anatomy))]
    figure = Figure(figsize=(3.2 * len(images), 3.4))
    for position, (title, volume, view) in enumerate(images, start=1):
        axes = figure.add_subplot(1, len(images), position)
        _show_slice(axes, _display_values(volume), view, _middle_slice(volume, view))
        axes.set_title(f"{title}{_where_drawn(volume, view, ', slice ')}", fontsize=9)
    rows = "".join(f"<tr><td>{role}</td><td>{html.escape(str(volume.source or 'in memory'))}</td>"
                   f"<td>{volume.array.shape}</td><td>{' × '.join(f'{s:.3g}' for s in volume.geometry.spacing)}</td>"
                   "</tr>" for role, volume in (("reference", reference), ("moving", moving)))
    shown = ", ".join(f"{title}{_where_drawn(volume, view, ' at slice ')}" for title, volume, view in images)
    return (f"<table><tr><th>input</th><th>source</th><th>shape as fused (z, y, x)</th><th>spacing (mm)</th></tr>{rows}</table>\n"
            f"{_png(figure, f'The inputs and results side by side: {shown}')}")


def _key_slices_section(result: FusionResult, view: PlaneView) -> str:
    """The most suspicious slices of the fused image, drawn as ``view`` says."""
    quality = result.quality
    if quality is None:
        return "<p class=note>No quality maps were computed for this run.</p>"
    legend = ", ".join(f'<span style="color:{OVERLAY_COLOURS[name]}">&#9632;</span> {MAP_LABELS[name]} '
                       f"(&gt; {quality.thresholds[name]:.3g})" for name in quality.maps())
    fused = result.fused
    shown_fused, fused_grey = _display_values(fused), display_grey(fused)
    flagged = quality.suspicious_slices()
    parts = [f"<p>Overlays over the fused image (its luma), where each map exceeds its threshold: {legend}; "
             "where maps overlap their colours blend into a mixed hue (the shares under each figure say how much "
             "each map flags); the alignment uncertainty in a panel of its own, as it often covers most of a slice. "
             + (f"The slices the quality maps flag come first ({len(flagged)} flagged), then the most suspicious "
                "others. " if quality.slice_count > 1 else "")
             + f"Suspicion: the largest fraction of the slice one map flags; a slice is flagged when a map "
             f"flags more than {100 * quality.flag_level:.2f} % of it"
             + (" and more than on a typical slice of this volume" if quality.slice_count >= MIN_SLICES_FOR_BASELINE
                else "") + ".</p>"]
    fidelity = [name for name in quality.maps() if name != UNCERTAINTY]
    overlay_panels = [("flagged: structure and restoration", fidelity)]
    if quality.uncertainty_mm is not None:
        overlay_panels.append(("flagged: alignment uncertainty", [UNCERTAINTY]))
    panels_shown = "; ".join(f"with {', '.join(MAP_LABELS[name] for name in names)} overlaid where above threshold"
                             for _, names in overlay_panels)
    for index in quality.key_slices(KEY_SLICES if quality.slice_count > 1 else 1):
        figure = Figure(figsize=(3.2 * (1 + len(overlay_panels)), 3.4))
        plain = figure.add_subplot(1, 1 + len(overlay_panels), 1)
        _show_slice(plain, shown_fused, view, index)
        plain.set_title("fused", fontsize=9)
        for position, (title, names) in enumerate(overlay_panels, start=2):
            overlaid = figure.add_subplot(1, 1 + len(overlay_panels), position)
            _show_slice(overlaid, fused_grey, view, index)
            for name in names:
                mask = view.plane(quality.maps()[name], index) > quality.thresholds[name]
                overlaid.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([OVERLAY_COLOURS[name]]),
                                alpha=0.55, interpolation="nearest", aspect=view.pixel_aspect)
            overlaid.set_title(title, fontsize=9)
        scores = ", ".join(f"{MAP_LABELS[name]} {100 * float(values[index]):.2f} %"
                           for name, values in quality.slice_scores.items())
        subject = f"Slice {index} of the fused image" if quality.slice_count > 1 else "The fused image"
        drawn = f"{subject}: plain; {panels_shown}"
        parts.append(f"<h3>{_slice_heading(quality, index)}</h3><p class=note>Share of the slice each map flags: "
                     f"{scores}; suspicion {100 * float(quality.suspicion[index]):.2f} %.</p>{_png(figure, drawn)}")
    return "\n".join(parts)


def _slice_heading(quality: QualityMaps, index: int) -> str:
    """Whether slice ``index`` is flagged and by which map, or why not: the heading of its figure."""
    named = f"Slice {index}" if quality.slice_count > 1 else "The image"
    flagging = quality.flagged_by(index)
    if flagging:
        by = ", ".join(f"{MAP_LABELS[name]} {100 * float(quality.slice_scores[name][index]):.2f} % of the slice"
                       for name in flagging)
        return f"{named}: flagged for {_flag_reasons(quality, index)} (by {by})"
    top = max(quality.slice_scores, key=lambda name: float(quality.slice_scores[name][index]))
    share = 100 * float(quality.slice_scores[top][index])
    why = ("no more than on a typical slice of this volume" if quality.slice_scores[top][index] > quality.flag_level
           else f"not above the flag level of {100 * quality.flag_level:.2f} %")
    return f"{named}: not flagged, suspicion {share:.2f} % ({MAP_LABELS[top]}, {why})"


def _metrics_section(result: FusionResult, metrics: Mapping[str, float]) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{_number(value)}</td></tr>" for name, value in metrics.items())
    table = (f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>" if rows
             else "<p class=note>No metrics were given for this run.</p>")
    quality = result.quality
    if quality is None:
        return table
    summary = quality.to_dict()["maps"]
    quality_rows = "".join(
        f"<tr><td>{MAP_LABELS[name]}</td><td>{html.escape(entry['units'])}</td><td>{entry['threshold']:.3g}</td>"
        f"<td>{entry['max']:.3g}</td><td>{100 * entry['flagged_fraction']:.2f} %</td>"
        f"<td class=note>{html.escape(entry['definition'])}</td></tr>" for name, entry in summary.items())
    return (f"{table}\n<h3>Quality maps</h3><table><tr><th>map</th><th>units</th><th>threshold</th><th>max</th>"
            f"<th>voxels flagged</th><th>definition</th></tr>{quality_rows}</table>")


def _degradation_section(result: FusionResult) -> str:
    if not result.class_probs:  # fusion-only and classical methods: no probabilities, global or per slice
        method = (result.provenance.get("method") or {}).get("name")
        named = f"The method {html.escape(str(method))}" if method else "This method"
        return f"<p class=note>{named} estimates no degradation: there is no degradation estimate to show.</p>"
    probabilities = np.asarray(result.slice_class_probs, dtype=float)
    if not _has_slices(result.fused):  # a one-slice volume's rows (one per z slice) repeat its one estimate
        probabilities = probabilities[:1]
    names = list(result.class_names)
    figure = Figure(figsize=(9, 3.2))
    axes = figure.add_subplot(1, 1, 1)
    if probabilities.shape[0] > 1:
        for column, name in enumerate(names):
            axes.plot(probabilities[:, column], label=name)
        axes.set_xlabel("slice (z)")
        axes.legend(fontsize=8, loc="upper left")
        if result.quality is not None:
            suspicion = axes.twinx()
            suspicion.bar(np.arange(result.quality.slice_count), 100 * result.quality.suspicion, color="#999",
                          alpha=0.35, label="suspicion")
            suspicion.set_ylabel("suspicion (% of slice)")
    else:
        axes.bar(names, probabilities[0], color="#0072B2")
    axes.set_ylim(0, 1)
    axes.set_ylabel("probability")
    globals_ = ", ".join(f"{name} {p:.2f}" for name, p in result.class_probs.items())
    drawn = ("Degradation class probabilities per slice"
             + (" with the suspicion of each slice as grey bars" if result.quality is not None else "")
             if probabilities.shape[0] > 1 else "Degradation class probabilities of the image")
    return f"<p>Predicted: <b>{html.escape(result.predicted_class)}</b> ({globals_}).</p>{_png(figure, drawn)}"


def _uncertainty_probe_note(method: Mapping[str, Any]) -> str:
    """What the uncertainty passes probed, for a method (``provenance["method"]``) that does not align by
    UniFuse's structural matching: the passes re-run that matching's local stage from the kept field
    for every method (``engine.inference``'s quality stage), so for this one the spread is not its
    own alignment's. Empty for UniFuse, for methods registering with the matching, and for a
    provenance that names no method (nothing to tell)."""
    name = method.get("name")
    registration = method.get("registration")
    if name is None or name == _STRUCTURAL_MATCHING_METHOD or registration == _STRUCTURAL_MATCHING_REGISTRATION:
        return ""
    alignment = str(registration or name)
    return (f"<p><b>Probed with UniFuse's structural matching, not this method's alignment "
            f"({html.escape(alignment)})</b>: the spread says how firmly that matching pins each voxel around "
            f"the field {html.escape(str(name))} kept; it does not measure how precise this method's own "
            "alignment is.</p>")


def _uncertainty_section(quality: QualityMaps | None, view: PlaneView, method: Mapping[str, Any]) -> str:
    """The uncertainty's summary, histogram and its map on the slice it flags most, drawn as ``view`` says;
    above them, what was probed where it is not the alignment of ``method`` (``provenance["method"]``)."""
    if quality is None or quality.uncertainty_mm is None:
        return "<p class=note>The alignment uncertainty was not computed for this run.</p>"
    values = quality.uncertainty_mm
    threshold = quality.thresholds[UNCERTAINTY]
    median, p95 = np.percentile(values, [50, 95])
    # Among the slices the moving image reaches: elsewhere the map holds no measurement.
    reached = quality.reached_slices()
    worst = int(np.argmax(np.where(reached if reached.any() else True, quality.slice_scores[UNCERTAINTY], -np.inf)))
    figure = Figure(figsize=(9, 3.4))
    histogram = figure.add_subplot(1, 2, 1)
    histogram.hist(values.ravel(), bins=50, color="#0072B2")
    histogram.axvline(threshold, color="#D55E00", label=f"threshold {threshold:.2f} mm")
    histogram.set_xlabel("spread of the displacement (mm)")
    histogram.legend(fontsize=8)
    drawn_map = figure.add_subplot(1, 2, 2)
    shown = drawn_map.imshow(view.plane(values, worst), cmap="magma", aspect=view.pixel_aspect)
    figure.colorbar(shown, ax=drawn_map, label="mm")
    drawn_map.set_title(f"slice {worst}" if quality.slice_count > 1 else "uncertainty", fontsize=9)
    drawn_map.axis("off")
    _label_edges(drawn_map, view)
    drawn = ("Histogram of the alignment uncertainty with its threshold, and its map "
             + (f"at slice {worst}, the slice it flags most" if quality.slice_count > 1 else "over the image"))
    return (f"{_uncertainty_probe_note(method)}"
            f"<p>Median {median:.2f} mm, 95th percentile {p95:.2f} mm, maximum {values.max():.2f} mm; "
            f"{100 * float(np.mean(values > threshold)):.2f} % of voxels above {threshold:.2f} mm. "
            f"<span class=note>{html.escape(quality.definitions.get(UNCERTAINTY, ''))}</span></p>"
            f"{_png(figure, drawn)}")


def _annotations_section(annotations: Sequence[Annotation], image_shape: Sequence[int],
                         skipped: Sequence[SkippedLine], reference: ImageVolume, moving: ImageVolume) -> str:
    """The reviewers' flags on this run's inputs; below them, apart, those made on other inputs."""
    notes = "".join(f"<p class=note>{html.escape(str(line))}</p>" for line in skipped)
    # Hashing the inputs takes a while on a large volume: only flags that record hashes need it.
    inputs = (InputHashes.of_volumes(reference, moving) if any(a.reference_sha256 or a.moving_sha256
                                                               for a in annotations) else InputHashes(None, None))
    earlier = [a for a in annotations if inputs.made_on_other_inputs(a)]
    current = [a for a in annotations if not inputs.made_on_other_inputs(a)]
    parts = [notes, _annotation_table(current, image_shape) if current else "<p class=note>No annotations.</p>"]
    if earlier:
        parts.append(f"<p class=flag>{len(earlier)} annotation{'s were' if len(earlier) > 1 else ' was'} made on other "
                     "input images than this run's (an earlier run in this folder, since overwritten): not about "
                     "this result, kept for the record.</p>" + _annotation_table(earlier, image_shape))
    return "".join(parts)


def _annotation_table(annotations: Sequence[Annotation], image_shape: Sequence[int]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(a.created)}</td><td>{html.escape(a.reviewer)}</td><td>{html.escape(describe_subject(a))}</td>"
        f"<td>{html.escape(a.category)}</td><td>{html.escape(describe_location(a, image_shape))}</td>"
        f"<td>{html.escape(a.note)}</td></tr>" for a in annotations)
    return ("<table><tr><th>created</th><th>reviewer</th><th>about</th><th>category</th><th>where</th>"
            f"<th>note</th></tr>{rows}</table>")


# ---- helpers -------------------------------------------------------------------------------------
def _display_values(volume: ImageVolume) -> np.ndarray:
    """``volume`` ready to draw, values in [0, 1]: an RGB image as RGB (its luma would turn a PET
    colour scale's hot red darker than its warmer yellow), anything else as grey in its own window."""
    if not volume.is_rgb:
        return display_grey(volume)
    values = np.asarray(volume.array)
    if np.issubdtype(values.dtype, np.integer):  # 8- or 16-bit colour: its full range is the window
        return (values / np.iinfo(values.dtype).max).astype(np.float32)
    return np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)  # results are RGB in [0, 1]


def _has_slices(volume: ImageVolume) -> bool:
    """Whether ``volume`` is drawn slice by slice along array axis 0: not a 2D image nor a one-slice
    volume, which are the image (its slice along any axis)."""
    return volume.ndim == 3 and volume.single_slice_axis is None


def _shows_anatomy(volume: ImageVolume) -> bool:
    """Whether ``volume``'s axes point to known sides of the patient: not a PNG or JPG picture, whose
    axes are only the picture's rows and columns."""
    return not is_picture(volume)


# The sides of the patient at the low and high end of each world axis (LPS, array-axis order z, y, x).
_WORLD_AXIS_ENDS = (("I", "S"), ("A", "P"), ("R", "L"))
_SUPERIOR_AXIS = 0


@dataclass(frozen=True)
class PlaneView:
    """How the report draws one plane of a volume: in one anatomical orientation whatever order the
    file stores its voxels in, so that every panel of a figure shows the patient alike and as napari
    shows the world (radiological: the patient's left on the screen's right; an axial plane with
    anterior at the top, a coronal or sagittal one with superior at the top, anterior on the left).
    Each array axis is taken along the world axis it runs closest to (an oblique grid is drawn as
    the nearest axis-aligned one)."""

    slice_axis: int | None  # the array axis sliced; None for a 2D image
    rows: int  # the array axes drawn down the screen and across it
    columns: int
    flip_rows: bool
    flip_columns: bool
    pixel_aspect: float  # a pixel's height over its width on screen: drawn in mm, as napari draws it
    edges: tuple[str, str, str, str] | None  # the sides of the patient at the top, bottom, left, right

    @classmethod
    def of(cls, volume: ImageVolume, slice_axis: int | None, anatomy: bool) -> PlaneView:
        """The view of ``volume``'s planes across ``slice_axis`` (None for a 2D image); ``anatomy``:
        whether its edges are labelled with the patient's sides (``_shows_anatomy``)."""
        geometry = volume.geometry
        world_axis_of = _world_axis_of(volume)
        # A 2D grid lies in the axial plane: its world axes are y and x.
        world_of = {axis: int(world_axis_of[axis]) + 3 - volume.ndim for axis in range(volume.ndim)}
        plane = [axis for axis in range(volume.ndim) if axis != slice_axis]
        # The plane's world axis listed first runs down the screen, the other (x; y in a sagittal plane) across.
        rows, columns = sorted(plane, key=world_of.__getitem__)
        superior_up = world_of[rows] == _SUPERIOR_AXIS

        def runs_to_high_end(axis: int) -> bool:
            return bool(geometry.direction[world_axis_of[axis], axis] > 0)

        edges = None
        if anatomy:
            low, high = _WORLD_AXIS_ENDS[world_of[rows]]
            edges = ((high, low) if superior_up else (low, high)) + _WORLD_AXIS_ENDS[world_of[columns]]
        return cls(slice_axis, rows, columns, flip_rows=runs_to_high_end(rows) == superior_up,
                   flip_columns=not runs_to_high_end(columns),
                   pixel_aspect=float(geometry.spacing[rows] / geometry.spacing[columns]), edges=edges)

    def plane(self, values: np.ndarray, index: int) -> np.ndarray:
        """Plane ``index`` of ``values`` (an array on the volume's grid, RGB channels last) as drawn."""
        plane = slice_of(values, self.slice_axis, index)
        if self.rows > self.columns:
            plane = np.swapaxes(plane, 0, 1)
        return plane[::-1 if self.flip_rows else 1, ::-1 if self.flip_columns else 1]


def _view_of(volume: ImageVolume, anatomy: bool) -> PlaneView:
    """The view of ``volume``'s slices along array axis 0, or of the image itself for a 2D image or a
    one-slice volume (whose slices along axis 0 would be one-voxel lines)."""
    return PlaneView.of(volume, 0 if _has_slices(volume) else volume.single_slice_axis, anatomy)


def _view_across(volume: ImageVolume, world_axis: int, anatomy: bool) -> PlaneView:
    """The view of ``volume``'s slices across ``world_axis`` (3D world order), those the other panels
    of a figure show: a sagittally stored volume beside an axial one is drawn axially too."""
    if not _has_slices(volume):
        return _view_of(volume, anatomy)
    return PlaneView.of(volume, int(np.flatnonzero(_world_axis_of(volume) == world_axis)[0]), anatomy)


def _world_axis_sliced(volume: ImageVolume) -> int:
    """The world axis (3D world order) across which ``_view_of`` draws ``volume``: z for a 2D image."""
    slice_axis = _view_of(volume, anatomy=False).slice_axis
    if slice_axis is None:
        return _SUPERIOR_AXIS
    return int(_world_axis_of(volume)[slice_axis])


def _world_axis_of(volume: ImageVolume) -> np.ndarray:
    """The world axis (``volume``'s own world order) each of its array axes runs closest to."""
    return np.argsort(volume.geometry.world_axis_order())


def _middle_slice(volume: ImageVolume, view: PlaneView) -> int:
    return volume.spatial_shape[view.slice_axis] // 2 if view.slice_axis is not None else 0


def _where_drawn(volume: ImageVolume, view: PlaneView, before: str) -> str:
    """``before`` and the middle slice drawn of a volume with slices (and its array axis when it is
    not the first); nothing for one image."""
    if not _has_slices(volume):
        return ""
    axis = "" if view.slice_axis == 0 else f" along array axis {view.slice_axis}"
    return f"{before}{_middle_slice(volume, view)}{axis}"


def _show_slice(axes: Any, values: np.ndarray, view: PlaneView, index: int) -> None:
    """Draw plane ``index`` of ``values`` (``_display_values`` or grey of the volume) as ``view``
    says, in mm, its edges labelled with the patient's sides."""
    plane = view.plane(values, index)
    grey = {} if plane.ndim == 3 else {"cmap": "gray", "vmin": 0, "vmax": 1}
    axes.imshow(plane, aspect=view.pixel_aspect, interpolation="nearest", **grey)
    axes.axis("off")
    _label_edges(axes, view)


def _label_edges(axes: Any, view: PlaneView) -> None:
    """Write the patient's sides (``view.edges``) inside the edges of the plane drawn on ``axes``."""
    if view.edges is None:
        return
    label = {"transform": axes.transAxes, "fontsize": 8, "color": "#ffd700", "fontweight": "bold"}
    top, bottom, left, right = view.edges
    axes.text(0.5, 0.99, top, ha="center", va="top", **label)
    axes.text(0.5, 0.01, bottom, ha="center", va="bottom", **label)
    axes.text(0.01, 0.5, left, ha="left", va="center", **label)
    axes.text(0.99, 0.5, right, ha="right", va="center", **label)


def _input_names(reference: ImageVolume, moving: ImageVolume, provenance: Mapping[str, Any]) -> str:
    """"t1.nii.gz + t2.nii.gz": the inputs' file names (as the run recorded them where the volumes
    came from memory)."""
    recorded = _mapping(provenance.get("inputs"))
    paths = [volume.source or _mapping(recorded.get(role)).get("path") for role, volume in
             (("reference", reference), ("moving", moving))]
    names = iter(_pair_names([Path(str(path)) for path in paths if path]))
    return " + ".join(next(names) if path else f"{role} (in memory)"
                      for role, path in zip(("reference", "moving"), paths))


def _pair_names(paths: list[Path]) -> list[str]:
    """The paths' file names, with as many parent folders as it takes to tell them apart: a
    Harvard pair is "MRI/16003.png + CT/16003.png", its modalities named by their folders only."""
    for depth in range(1, max((len(path.parts) for path in paths), default=0) + 1):
        names = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(names)) == len(names):
            return [_readable(name) for name in names]
    return [_readable(path.name) for path in paths]  # one file given as both inputs: no folder tells them apart


def _png(figure: Figure, alt: str) -> str:
    """``figure`` as an embedded PNG ``<img>``, ``alt`` saying what it shows (for screen readers and
    a page whose images are blocked)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}." src="data:image/png;base64,{encoded}">'


def _number(value: Any) -> str:
    # NaN (a metric whose window does not fit) reads back from JSON as null: both are "n/a".
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else html.escape(str(value))


@dataclass(frozen=True)
class _CohortFolders:
    """What ``write_index`` found below a runs folder."""

    runs: list[Path]  # finished runs: folders holding provenance.json and the outputs written before it
    unfinished: list[Path]  # run folders without them: interrupted (killed), still running or outputs deleted
    missing: dict[Path, list[str]]  # the unfinished folders holding provenance.json → the outputs they lack
    summaries: list[Path]  # batches' summary.json: their pairs, failed ones included


def _cohort_folders(runs_dir: Path, unreadable: list[tuple[Path, OSError]]) -> _CohortFolders:
    """Every run folder below ``runs_dir``, finished or not, and every batch summary; linked folders
    are followed (a cohort is often gathered from links), each real folder once. The folders that
    cannot be listed are added to ``unreadable`` with why."""
    runs: list[Path] = []
    unfinished: list[Path] = []
    missing: dict[Path, list[str]] = {}
    summaries: list[Path] = []
    for folder in walk_runs_tree(runs_dir, lambda path, error: unreadable.append((path, error))):
        if PROVENANCE_FILE in folder.files:
            lacking = missing_outputs(folder.path)
            if lacking:  # a run whose outputs were deleted since: resuming redoes it, so it is not done
                unfinished.append(folder.path)
                missing[folder.path] = lacking
            else:
                runs.append(folder.path)
        elif folder.path != runs_dir and _is_unfinished_run(folder.path, folder.files, folder.subfolders,
                                                            folder.staging):
            unfinished.append(folder.path)
        if BATCH_SUMMARY_FILE in folder.files:
            summaries.append(folder.path / BATCH_SUMMARY_FILE)
    return _CohortFolders(sorted(runs), sorted(unfinished), missing, sorted(summaries))


def _is_unfinished_run(folder: Path, files: Sequence[str], subfolders: Sequence[str], staging: Sequence[str]) -> bool:
    """Whether a folder without provenance.json is a run that did not finish: one holding a staging
    folder or a run's outputs, or an empty leaf, which is what a run killed before its first write
    leaves (its folder lock creates the folder; a run that fails cleanly removes it). A finished
    ``unifuse synth`` pair (a run's input, not a run) is none."""
    synth_record = read_json_object(folder / SYNTH_META_FILE) if SYNTH_META_FILE in files else None
    if synth_record is not None and _SYNTH_META_KEYS <= synth_record.keys():
        return False
    return bool(staging) or bool(set(files) & _RUN_OUTPUT_FILES) or not (files or subfolders)


@dataclass(frozen=True)
class _FailedPair:
    """A pair a batch's summary.json records as failed, and what its folder holds."""

    batch: str  # the batch's folder, relative to the runs folder, as the file system names it
    name: str
    error: str
    folder: Path  # the pair's output folder, symbolic links resolved
    run: Path | None  # the finished run its folder holds, as the index lists it
    run_is_later: bool  # that run finished after the failure (a single run there since), not before it
    earlier_batch: str | None  # when the earlier batch it failed in was made, carried into this summary

    def named_batch(self) -> str:
        """The batch it failed in: its folder's summary.json, and for a carried failure which batch."""
        summary = (Path(self.batch) / BATCH_SUMMARY_FILE).as_posix()
        return summary if self.earlier_batch is None else f"{summary} (an earlier batch, of {self.earlier_batch})"


def _failed_pairs(cohort: _CohortFolders, runs_dir: Path) -> list[_FailedPair]:
    """The failed pairs of every batch below ``runs_dir``, each with the run its folder holds: a
    failed pair wrote nothing, so that run is an earlier one's unless it finished after the failure."""
    runs = {Path(os.path.realpath(run)): run for run in cohort.runs}
    failed = []
    for path in cohort.summaries:
        summary = _mapping(read_json_object(path))
        # This batch's outcomes, then the failures of earlier batches into the folder it carries.
        recorded: list[tuple[Any, str | None]] = [(outcome, None) for outcome in _listed(summary.get("outcomes"))]
        recorded += [(outcome, str(_mapping(outcome).get("batch_created")))
                     for outcome in _listed(summary.get(EARLIER_FAILURES))]
        for outcome, earlier_batch in recorded:
            outcome = _mapping(outcome)
            if outcome.get("status") != "failed":
                continue
            name = str(outcome.get("name", "?"))
            folder = Path(os.path.realpath(path.parent / name))  # cli.fuse writes a pair to <out>/<name>
            run = runs.get(folder)
            batch_created = summary.get("created") if earlier_batch is None else earlier_batch
            failed_at = outcome.get(OUTCOME_FINISHED, batch_created)
            failed.append(_FailedPair(path.parent.relative_to(runs_dir).as_posix(), name,
                                      str(outcome.get("error", "")), folder, run,
                                      run is not None and _finished_later(run, failed_at), earlier_batch))
    return failed


def _finished_later(run: Path, failed_at: Any) -> bool:
    """Whether ``run``'s provenance was created after the failure (both UTC ISO timestamps)."""
    try:
        return (datetime.fromisoformat(str(_mapping(read_json_object(run / PROVENANCE_FILE)).get("created")))
                > datetime.fromisoformat(str(failed_at)))
    except (TypeError, ValueError):  # a timestamp missing or unreadable: the failure is the latest word
        return False


def _batches_and_unfinished(cohort: _CohortFolders, runs_dir: Path, failed: Sequence[_FailedPair]) -> str:
    """The index's part below the finished runs: each batch's size and outcome counts as its
    summary.json records them, its failed pairs with their errors and what their folders hold, and
    the unfinished folders."""
    batches = []
    for path in cohort.summaries:
        where = html.escape(_readable(path.parent.relative_to(runs_dir).as_posix()))
        summary = read_json_object(path)
        if summary is None:
            batches.append(f"<li>{where}: {BATCH_SUMMARY_FILE} unreadable</li>")
            continue
        counts = ", ".join(f"{summary.get(status, '?')} {status}" for status in ("done", "skipped", "failed"))
        # Busy: another run held the pair's folder to the batch's end (summaries before that count lack it).
        busy = summary.get("busy")
        counts += f", {busy} busy (another run held their folders when the batch ended)" if busy else ""
        kept = summary.get("kept")  # an earlier version's results of the pair, neither redone nor failed
        counts += f", {kept} kept (results of an earlier version; --overwrite redoes them)" if kept else ""
        pairs = summary.get("pairs", "?")
        carried = len(_listed(summary.get(EARLIER_FAILURES)))
        counts += f"; {carried} failed in earlier batches into this folder" if carried else ""
        batches.append(f"<li>{where}: {html.escape(str(pairs))} pair{'' if pairs == 1 else 's'}, {html.escape(counts)} "
                       f"<span class=note>({BATCH_SUMMARY_FILE}, {html.escape(str(summary.get('created', '')))})"
                       "</span></li>")
    failed_rows = "".join(
        f"<tr><td>{html.escape(_readable(pair.batch))}"
        f"{f' (earlier batch, of {html.escape(pair.earlier_batch)})' if pair.earlier_batch else ''}</td>"
        f"<td>{html.escape(pair.name)}</td>"
        f"<td>{html.escape(pair.error)}</td><td>{_outputs_of(pair, runs_dir)}</td></tr>" for pair in failed)
    parts = []
    if batches:
        parts.append(f"<h2>Batches</h2><ul>{''.join(batches)}</ul>")
    if failed_rows:
        parts.append("<h2 class=flag>Failed pairs</h2><p class=note>A failed pair wrote nothing in that batch.</p>"
                     "<table><tr><th>batch</th><th>pair</th><th>error</th><th>outputs in its folder</th></tr>"
                     f"{failed_rows}</table>")
    if cohort.unfinished:
        listed = "".join(f"<li>{html.escape(_readable(folder.relative_to(runs_dir).as_posix()))}"
                         f"{_lacking(cohort.missing.get(folder))}</li>" for folder in cohort.unfinished)
        parts.append(f"<h2 class=flag>Unfinished run folders</h2><p class=note>No {PROVENANCE_FILE}: the run was "
                     f"interrupted (or is still running); or outputs missing beside it: deleted since. Either way "
                     f"its pair is not done, and rerunning the batch redoes it.</p><ul>{listed}</ul>")
    return "\n" + "\n".join(parts) if parts else ""


def _lacking(missing: Sequence[str] | None) -> str:
    """What an incomplete run folder lacks, as its entry in the unfinished list says it."""
    if not missing:
        return ""
    return (f" <span class=flag>(incomplete: {PROVENANCE_FILE} is there but {html.escape(', '.join(missing))} "
            f"{'is' if len(missing) == 1 else 'are'} missing)</span>")


def _outputs_of(pair: _FailedPair, runs_dir: Path) -> str:
    if pair.run is None:
        return "none"
    shown = html.escape(_readable(pair.run.relative_to(runs_dir).as_posix()))
    if pair.run_is_later:
        return f"a later run's ({shown}, listed above)"
    return f"an earlier run's ({shown}, listed above), not of this attempt"


def _readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (an old Latin-1 folder name) shown as �."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _url_path(relative: str) -> str:
    """A relative path as a link target: ``#``, ``?``, ``%`` and non-ASCII bytes percent-encoded."""
    return quote(os.fsencode(relative), safe="/")


@dataclass(frozen=True)
class _IndexRow:
    run: Path
    relative: str  # as the file system names it: shown through _readable, linked through _url_path
    max_suspicion: float | None
    suspicion: str
    flagged: str
    problems: str
    inputs: str
    created: str
    quality_missing: bool = False  # the run made quality maps (its provenance says) but quality.json is gone

    def rank(self) -> tuple[int, float, str]:
        """The row's place, most suspicious first. A run whose quality.json is missing though it made
        quality maps comes first of all: its suspicion is unknown, not low, so a reviewer must look at
        it rather than find it last among the runs without maps. Then the ranked runs by suspicion; then
        those that cannot be ranked (no maps, or a damaged quality.json); ties by name."""
        group = 0 if self.quality_missing else 1 if self.max_suspicion is not None else 2
        return group, -(self.max_suspicion or 0.0), self.relative

    @classmethod
    def of(cls, run: Path, runs_dir: Path) -> _IndexRow:
        relative = run.relative_to(runs_dir).as_posix()
        provenance = read_json_object(run / PROVENANCE_FILE)
        quality = read_json_object(run / QUALITY_FILE)
        roles = _mapping(_mapping(provenance).get("inputs"))
        inputs = " + ".join(_pair_names([Path(str(_mapping(roles.get(role)).get("path") or role))
                                         for role in ("reference", "moving")]))
        if provenance is None:
            inputs = f"{PROVENANCE_FILE} unreadable"
        created = str(_mapping(provenance).get("created", ""))
        if quality is None:
            damaged = (run / QUALITY_FILE).exists()
            made_maps = _mapping(_mapping(provenance).get("requested_settings")).get("quality") is True
            quality_missing = made_maps and not damaged
            state = (f"{QUALITY_FILE} unreadable" if damaged
                     else f"{QUALITY_FILE} missing" if quality_missing else "no quality maps")
            return cls(run, relative, None, "n/a", state, "", inputs, created, quality_missing)
        largest = quality.get("max_suspicion")
        max_suspicion = float(largest) if isinstance(largest, (int, float)) and np.isfinite(largest) else None
        suspicious, per_slice = quality.get("suspicious_slices"), quality.get("suspicion")
        flagged = (f"{len(suspicious)} of {len(per_slice)}" if isinstance(suspicious, list) and isinstance(per_slice, list)
                   else f"{QUALITY_FILE} incomplete")
        # Every map that flagged a slice (quality.json's flagged_by), not only the largest of them;
        # files written before flagged_by existed name one problem per slice.
        flagged_by = _mapping(quality.get("flagged_by")).values()
        named = ({PROBLEM_NAMES.get(str(name), str(name)) for names in flagged_by if isinstance(names, list)
                  for name in names} or {str(problem) for problem in _mapping(quality.get("problems")).values()})
        # A map flagging the whole volume flags no slice: its problem is named all the same.
        whole_volume = _mapping(_mapping(quality.get("whole_volume")).get("typical_slice_score"))
        named |= {f"{PROBLEM_NAMES.get(str(name), str(name))} (whole volume)" for name in whole_volume}
        problems = ", ".join(sorted(named))
        suspicion = f"{100 * max_suspicion:.2f} %" if max_suspicion is not None else "n/a"
        return cls(run, relative, max_suspicion, suspicion, flagged, problems, inputs, created)


def _listed(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one: a file of another shape reads as empty."""
    return value if isinstance(value, Mapping) else {}


