"""`unifuse synth`: turn an aligned, clean image pair into a degraded, misaligned training pair.

For each pair it writes, into ``OUT`` (one pair) or, with ``--pairs``, one folder per CSV row
numbered from 0 in the CSV's order (``OUT/0000/``, ``OUT/0001/``, ...):

* ``reference.<ext>``  the reference, unchanged;
* ``moving.<ext>``     the moving image degraded, then misaligned (UniFuse's I'_D);
* ``label.<ext>``      the clean moving image aligned to the reference (I_D);
* ``displacement.nii.gz``  the ground-truth ITK displacement field on the reference grid
  (LPS mm): resampling ``moving`` through it with SimpleITK/ANTs/Slicer gives ``label``;
* ``meta.json``        degradation class, every drawn parameter, the seed and intensity mapping.

``<ext>`` follows each input: ``png`` for PNG/JPG images, ``nii.gz`` for everything else. The
moving image is put on the reference grid first when its geometry differs. Degradations act on
intensities normalised as ``io.normalize_intensity`` does (recorded in meta.json); volumes are
written back in the input's units, PNGs as 8-bit.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

from napari_unifuse import __version__
from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.errors import InputError
from napari_unifuse.io import (
    normalize_intensity,
    read_image,
    resample_to_reference,
    write_displacement,
    write_image,
)
from napari_unifuse.io.normalize import MODALITIES

_PNG_INPUTS = (".png", ".jpg", ".jpeg")
DISPLACEMENT_FILE = "displacement.nii.gz"
META_FILE = "meta.json"


@dataclass(frozen=True)
class SynthJob:
    reference: Path
    moving: Path
    degradation: str
    seed: int
    out: Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="make a degraded, misaligned pair (with its ground truth) from aligned clean images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reference", type=Path, help="high-quality reference image")
    parser.add_argument("--moving", type=Path, help="the other modality, clean and aligned to the reference")
    parser.add_argument("--pairs", type=Path,
                        help="CSV with columns reference,moving[,degradation,seed]; paths relative to the CSV")
    parser.add_argument("--degradation", choices=DEGRADATION_CLASSES, default="none",
                        help="degradation of the moving image (default: none; a CSV column overrides it)")
    parser.add_argument("--severity", type=float, default=0.5, help="degradation strength in [0, 1] (default 0.5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (default 0); a CSV row without one uses seed + the number of its "
                             "output folder (0000: seed, 0001: seed + 1, ...)")
    parser.add_argument("--modality", choices=MODALITIES, default="auto",
                        help="modality of the moving image, for its intensity normalisation (default: auto)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for job in _jobs(args):
        synthesize(job, severity=args.severity, modality=args.modality)
        print(f"{job.out}: {job.degradation} pair (seed {job.seed})")
    return 0


def _jobs(args: argparse.Namespace) -> list[SynthJob]:
    if (args.pairs is None) == (args.reference is None or args.moving is None):
        raise InputError("give either --reference and --moving, or --pairs CSV", "--pairs")
    if args.pairs is None:
        return [SynthJob(args.reference, args.moving, args.degradation, args.seed, args.out)]
    try:
        with args.pairs.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            numbered = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the pairs CSV: {error}", args.pairs) from error
    if not numbered or not {"reference", "moving"} <= set(numbered[0][1]):
        raise InputError("the CSV needs a header with at least the columns reference,moving", args.pairs)
    folder = args.pairs.parent
    jobs = []
    # number: the row's output folder and default seed offset; line: where to look in the CSV.
    for number, (line, row) in enumerate(numbered):
        degradation = (row.get("degradation") or args.degradation).strip()
        if degradation not in DEGRADATION_CLASSES:
            raise InputError(f"line {line} of the CSV: unknown degradation {degradation!r}; use one of "
                             f"{', '.join(DEGRADATION_CLASSES)}", args.pairs)
        try:
            seed = int(row["seed"]) if (row.get("seed") or "").strip() else args.seed + number
        except ValueError as error:
            raise InputError(f"line {line} of the CSV: the seed {row['seed']!r} is not an integer",
                             args.pairs) from error
        jobs.append(SynthJob(folder / row["reference"].strip(), folder / row["moving"].strip(), degradation, seed,
                             args.out / f"{number:04d}"))
    return jobs


def _extension(path: Path) -> str:
    return "png" if path.name.lower().endswith(_PNG_INPUTS) else "nii.gz"


def synthesize(job: SynthJob, severity: float = 0.5, modality: str = "auto") -> dict:
    """Make and write one pair; returns what went into meta.json."""
    files = {
        "reference": job.out / f"reference.{_extension(job.reference)}",
        "moving": job.out / f"moving.{_extension(job.moving)}",
        "label": job.out / f"label.{_extension(job.moving)}",
        "displacement": job.out / DISPLACEMENT_FILE,
        "meta": job.out / META_FILE,
    }
    inputs = {job.reference.resolve(), job.moving.resolve()}
    clashes = [str(path) for path in files.values() if path.resolve() in inputs]
    if clashes:
        raise InputError(f"the outputs would overwrite the inputs ({', '.join(clashes)}); choose another --out",
                         job.out)

    reference = read_image(job.reference)
    moving = read_image(job.moving)
    if moving.ndim != reference.ndim:
        raise InputError(f"the moving image is {moving.ndim}D but the reference is {reference.ndim}D", job.moving)
    on_reference_grid = moving.on_grid_of(reference, atol=1e-3)
    clean = moving if on_reference_grid else resample_to_reference(moving, reference)
    normalized, mapping = normalize_intensity(clean, modality)
    pair = make_pair(reference, normalized, job.degradation, rng=job.seed, severity=severity)

    job.out.mkdir(parents=True, exist_ok=True)
    write_image(reference, files["reference"])
    for role, volume in (("moving", pair.moving), ("label", pair.label)):
        # PNG holds [0, 1] floats as 8 bits (the inverse of io's /255); volumes go back to input units.
        array = volume.array if files[role].suffix == ".png" else mapping.inverse(volume.array)
        write_image(replace(volume, array=array, source=None), files[role])
    write_displacement(pair.displacement, reference.geometry, files["displacement"])

    meta = {
        "unifuse_version": __version__,
        "inputs": {"reference": str(job.reference), "moving": str(job.moving)},
        "files": {role: path.name for role, path in files.items() if role != "meta"},
        "degradation": pair.degradation,
        "class_index": pair.class_index,
        "seed": job.seed,
        "severity": severity,
        "moving_resampled_to_reference": not on_reference_grid,
        "intensity_mapping": mapping.to_dict(),
        "displacement_convention": (
            "ITK displacement field, LPS mm, on the reference grid: label(p) = moving(p + d(p)); "
            "in voxels (array order) it is u with label(x) = moving(x + u(x))"
        ),
        "params": pair.params,
    }
    files["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta

