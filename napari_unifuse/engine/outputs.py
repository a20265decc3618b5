"""The on-disk contract of one fused pair, written so that a half-written run never looks done.

``fused.<ext>``, ``aligned.<ext>`` (restored + aligned moving), ``displacement.nii.gz`` (ITK
displacement field, moving → reference), ``degradation.json`` and ``provenance.json``; ``<ext>`` is
``png`` for a raster-image reference, ``mha`` for a colour (RGB PET/SPECT) result on another
reference's grid, ``nii.gz`` otherwise. With quality maps (``result.quality``)
also ``invented.nii.gz``, ``lost.nii.gz``, ``restoration_change.nii.gz``, ``uncertainty.nii.gz``
(when computed) and ``quality.json`` (thresholds, per-slice scores, suspicious slices): float maps
in the reference geometry, NIfTI even for PNG inputs (8 bits would round the maps away; a 2D
NIfTI keeps the pixel spacing). Everything is first written into a hidden
staging folder next to the outputs and then renamed into place (a rename within one file system is
atomic), ``provenance.json`` last: its presence is what marks a pair as finished for
``unifuse fuse --pairs`` resuming. ``metrics.json`` (given a label's metrics) is staged with them.

A folder is written for one run at a time: every file an earlier run left there under a name this
package writes (``known_output_names``) goes before the new files move in, so old and new never
mix; other files are left alone. No output may replace or remove an input: an input that sits at
one of those names in the folder is refused before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_unifuse.engine.quality import UNCERTAINTY, QualityMaps
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import InputError
from napari_unifuse.io import ImageVolume, write_image
from napari_unifuse.io.fields import write_displacement

PROVENANCE_FILE = "provenance.json"
DEGRADATION_FILE = "degradation.json"
DISPLACEMENT_FILE = "displacement.nii.gz"
QUALITY_FILE = "quality.json"
# Map name (engine.quality) → file; the uncertainty is named for what it is on disk.
QUALITY_MAP_FILES = {"invented": "invented.nii.gz", "lost": "lost.nii.gz",
                     "restoration_change": "restoration_change.nii.gz", UNCERTAINTY: "uncertainty.nii.gz"}
METRICS_FILE = "metrics.json"
# The hidden folder a run's outputs are written into before they move in together.
STAGING_PREFIX = ".unifuse-partial-"
REPORT_FILE = "report.html"  # engine.report's QC page of a run
# The workbench's review maps, saved beside the outputs: float maps, NIfTI (MHA for PNG runs).
REVIEW_MAP_NAMES = ("alignment_error", "jacobian_determinant", "folding")
REVIEW_MAP_EXTENSIONS = ("nii.gz", "mha")
# FusionResult.output_extension: raster-image references, colour results on other grids, the rest.
IMAGE_EXTENSIONS = ("png", "mha", "nii.gz")


def output_file_names(extension: str) -> tuple[str, ...]:
    """The five outputs in the order they are moved into place; the completion marker comes last."""
    return (f"fused.{extension}", f"aligned.{extension}", DISPLACEMENT_FILE, DEGRADATION_FILE, PROVENANCE_FILE)


def quality_file_names(quality: QualityMaps) -> tuple[str, ...]:
    """The quality outputs of ``quality``: one file per map it holds, then ``quality.json``."""
    return (*(QUALITY_MAP_FILES[name] for name in quality.maps()), QUALITY_FILE)


def known_output_names() -> frozenset[str]:
    """Every file name ``write_fusion_outputs``, the QC page and the workbench give a run folder:
    the outputs for either image extension, the quality outputs, the label's metrics,
    ``report.html`` and the review maps."""
    return frozenset({*(name for extension in IMAGE_EXTENSIONS for name in output_file_names(extension)),
                      *QUALITY_MAP_FILES.values(), QUALITY_FILE, METRICS_FILE, REPORT_FILE,
                      *(f"{name}.{extension}" for name in REVIEW_MAP_NAMES for extension in REVIEW_MAP_EXTENSIONS)})


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / PROVENANCE_FILE).is_file()


def read_provenance(out_dir: str | Path) -> dict[str, Any] | None:
    """The provenance of the finished run in ``out_dir``; None where there is none, it is unreadable
    or it is not of the shape a run writes (another tool's ``provenance.json``)."""
    provenance = read_json_object(Path(out_dir) / PROVENANCE_FILE)
    return provenance if _is_run_provenance(provenance) else None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, damaged or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_run_provenance(provenance: Any) -> bool:
    """Whether ``provenance`` has the sections a run records, as JSON objects: inputs (one object
    per role) and method always; checkpoint, model_config and requested_settings where present."""
    if not isinstance(provenance, dict):
        return False
    inputs = provenance.get("inputs")
    return (isinstance(inputs, dict) and all(isinstance(source, dict) for source in inputs.values())
            and isinstance(provenance.get("method"), dict)
            and all(isinstance(provenance.get(section), dict | None)
                    for section in ("checkpoint", "model_config", "requested_settings")))


def refuse_overwriting_inputs(out_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise an InputError naming the first input that writing outputs into ``out_dir`` would
    replace or remove: one that is (by path, link or hard link) a file of ``known_output_names``
    there. None entries (an optional input not given) are ignored."""
    out_dir = Path(out_dir)
    for source in (Path(source) for source in inputs if source is not None):
        for name in sorted(known_output_names()):
            if _same_file(out_dir / name, source):
                raise InputError(f"this input sits where the {name} output goes and would be replaced; "
                                 "write the outputs to another folder", source)


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist: not the same file
        return False


def write_json(data: Any, path: Path) -> None:
    """Standard JSON: an undefined value (NaN, e.g. the SSIM of a blank slice, or ±inf) is ``null``.

    Python would write ``NaN``, which jq, JavaScript and most JSON readers outside Python reject.
    """
    # default=str: paths and other plain objects in checkpoint metadata are recorded as text.
    path.write_text(json.dumps(_finite_or_null(data), indent=2, default=str, allow_nan=False) + "\n",
                    encoding="utf-8")


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):  # numpy scalars would otherwise be written as strings
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_fusion_outputs(result: FusionResult, out_dir: str | Path, *, metrics: Mapping[str, float] | None = None,
                         remove_report: bool = False) -> dict[str, Path]:
    """Write the five outputs, the quality outputs when ``result.quality`` is set and
    ``metrics.json`` when ``metrics`` are given into ``out_dir`` (created if needed); return name →
    final path.

    Files of ``known_output_names`` an earlier run left in ``out_dir`` are removed before the new
    ones move in; ``report.html`` only with ``remove_report`` (the caller writes this run's page
    afterwards, or none): a page written for this very result before it was saved is current.
    Refuses (InputError) before writing anything when that would replace or remove an input
    recorded in ``result.provenance``."""
    out_dir = Path(out_dir)
    recorded_inputs = result.provenance.get("inputs", {}).values()
    refuse_overwriting_inputs(out_dir, (source.get("path") for source in recorded_inputs))
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_file_names(result.output_extension)
    if result.quality is not None:
        names = (*names[:-1], *quality_file_names(result.quality), PROVENANCE_FILE)
    if metrics is not None:
        names = (*names[:-1], METRICS_FILE, PROVENANCE_FILE)
    for leftover in out_dir.glob(f"{STAGING_PREFIX}*"):  # a write killed midway (SIGKILL skips `finally`)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        write_image(result.fused, staging / names[0])
        write_image(result.aligned, staging / names[1])
        write_displacement(result.displacement, result.fused.geometry, staging / DISPLACEMENT_FILE)
        write_json(result.degradation_report(), staging / DEGRADATION_FILE)
        if result.quality is not None:
            for name, array in result.quality.maps().items():
                volume = ImageVolume(array, result.fused.geometry, {"role": name})
                write_image(volume, staging / QUALITY_MAP_FILES[name])
            write_json(result.quality.to_dict(), staging / QUALITY_FILE)
        if metrics is not None:
            write_json(dict(metrics), staging / METRICS_FILE)
        write_json(result.provenance, staging / PROVENANCE_FILE)
        # Drop an earlier run's marker first, so old and new files mixed never look complete.
        (out_dir / PROVENANCE_FILE).unlink(missing_ok=True)
        kept = set(names) if remove_report else {*names, REPORT_FILE}
        for name in sorted(known_output_names() - kept):
            (out_dir / name).unlink(missing_ok=True)
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / name for name in names}
