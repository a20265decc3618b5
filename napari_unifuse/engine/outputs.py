"""The on-disk contract of one fused pair, written so that a half-written run never looks done.

``fused.<ext>``, ``aligned.<ext>`` (restored + aligned moving), ``displacement.nii.gz`` (ITK
displacement field, moving → reference), ``degradation.json`` and ``provenance.json``; ``<ext>`` is
``png`` for raster-image inputs and ``nii.gz`` otherwise. With quality maps (``result.quality``)
also ``invented.nii.gz``, ``lost.nii.gz``, ``restoration_change.nii.gz``, ``uncertainty.nii.gz``
(when computed) and ``quality.json`` (thresholds, per-slice scores, suspicious slices): float maps
in the reference geometry, NIfTI even for PNG inputs (8 bits would round the maps away; a 2D
NIfTI keeps the pixel spacing). Everything is first written into a hidden
staging folder next to the outputs and then renamed into place (a rename within one file system is
atomic), ``provenance.json`` last: its presence is what marks a pair as finished for
``unifuse fuse --pairs`` resuming.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from napari_unifuse.engine.quality import UNCERTAINTY, QualityMaps
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.io import ImageVolume, write_image
from napari_unifuse.io.fields import write_displacement

PROVENANCE_FILE = "provenance.json"
DEGRADATION_FILE = "degradation.json"
DISPLACEMENT_FILE = "displacement.nii.gz"
QUALITY_FILE = "quality.json"
# Map name (engine.quality) → file; the uncertainty is named for what it is on disk.
QUALITY_MAP_FILES = {"invented": "invented.nii.gz", "lost": "lost.nii.gz",
                     "restoration_change": "restoration_change.nii.gz", UNCERTAINTY: "uncertainty.nii.gz"}


def output_file_names(extension: str) -> tuple[str, ...]:
    """The five outputs in the order they are moved into place; the completion marker comes last."""
    return (f"fused.{extension}", f"aligned.{extension}", DISPLACEMENT_FILE, DEGRADATION_FILE, PROVENANCE_FILE)


def quality_file_names(quality: QualityMaps) -> tuple[str, ...]:
    """The quality outputs of ``quality``: one file per map it holds, then ``quality.json``."""
    return (*(QUALITY_MAP_FILES[name] for name in quality.maps()), QUALITY_FILE)


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / PROVENANCE_FILE).is_file()


def write_json(data: Any, path: Path) -> None:
    # default=str: paths and other plain objects in checkpoint metadata are recorded as text.
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_fusion_outputs(result: FusionResult, out_dir: str | Path) -> dict[str, Path]:
    """Write the five outputs, and the quality outputs when ``result.quality`` is set, into
    ``out_dir`` (created if needed); return name → final path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_file_names(result.output_extension)
    if result.quality is not None:
        names = (*names[:-1], *quality_file_names(result.quality), PROVENANCE_FILE)
    staging = Path(tempfile.mkdtemp(prefix=".unifuse-partial-", dir=out_dir))
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
        write_json(result.provenance, staging / PROVENANCE_FILE)
        # Drop an earlier run's marker first, so old and new files mixed never look complete.
        (out_dir / PROVENANCE_FILE).unlink(missing_ok=True)
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out_dir / name for name in names}
