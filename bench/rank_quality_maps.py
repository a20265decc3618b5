"""Do the quality maps rank the slices worth a look? Spearman ρ against what a label would show.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/rank_quality_maps.py
        [--harvard /work/shared/data/harvard-aanlib] [--phantom-pairs 4] [--out docs/results/quality_maps.md]

Two questions, per task:

* does the **invented-structure** score rank images by the restored image's error against the clean
  label (mean |restored − label| in the [0, 1] window)? Scores: the per-slice flagged fraction the
  workbench navigates by, and the mean of the map (continuous, no ties at 0);
* does the **alignment uncertainty** rank them by the field's end-point error (mean |u − u_true|,
  voxels)? Scores: the flagged fraction and the mean spread (mm).

Harvard AANLIB: the validation split of ``unifuse-2d-harvard`` as ``unifuse evaluate`` builds it
(``cli.evaluate.pairs_from_harvard``; mild misalignment, every pair degraded), one value per pair.
3D phantoms: the validation split of ``unifuse-3d-phantom``'s training config (mild misalignment),
``--phantom-pairs`` volumes per task, one value per axial slice, pooled over the volumes of a task
(slices of one volume are not independent: read ρ as a ranking summary, the p-value as optimistic).
Inputs are handed to the engine as 8-bit images, like the Harvard PNGs, so that the restored
image maps back to the label's [0, 1] units (``/ 255``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from napari_unifuse.cli.evaluate import aligned_unit_luma, checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.training.datasets import build_datasets

HARVARD_CHECKPOINT, PHANTOM_CHECKPOINT = "unifuse-2d-harvard", "unifuse-3d-phantom"
REGIME = "mild"


@dataclass
class Item:
    """One ranked unit (a 2D pair or one slice of a volume): scores and what a label shows."""

    task: str
    invented_flagged: float
    invented_mean: float
    restored_error: float
    uncertainty_flagged: float
    uncertainty_mean: float
    epe: float


def per_slice_mean(array: np.ndarray) -> np.ndarray:
    """(S,) mean of each z slice of a volume; a 2D image is one slice."""
    return array.reshape(array.shape[0], -1).mean(axis=1) if array.ndim == 3 else np.array([array.mean()])


def items_of_run(task: str, engine: FusionEngine, reference: ImageVolume, moving: ImageVolume, label: np.ndarray,
                 displacement: np.ndarray) -> list[Item]:
    result = engine.run_fusion(reference, moving)
    quality = result.quality
    restored = aligned_unit_luma(result)
    restored_error = per_slice_mean(np.abs(restored - label))
    epe = per_slice_mean(np.linalg.norm(result.displacement - displacement, axis=0))
    scores = quality.slice_scores
    invented_mean, uncertainty_mean = per_slice_mean(quality.invented), per_slice_mean(quality.uncertainty_mm)
    return [Item(task, float(scores["invented"][s]), float(invented_mean[s]), float(restored_error[s]),
                 float(scores["uncertainty_mm"][s]), float(uncertainty_mean[s]), float(epe[s]))
            for s in range(quality.slice_count)]


def harvard_items(root: Path, limit: int | None) -> list[Item]:
    engine = FusionEngine(HARVARD_CHECKPOINT, device="cpu")
    cases = checkpoint_split(read_metadata(HARVARD_CHECKPOINT), None, None)
    pairs = pairs_from_harvard(root, "val", ["CT", "PET", "SPECT"], limit, seed=0, size=None, none_fraction=0.0,
                               cases=cases, regime=REGIME)
    items = []
    for number, pair in enumerate(pairs, start=1):
        print(f"[harvard {number}/{len(pairs)}] {pair.name} ({pair.degradation})", flush=True)
        items += items_of_run(pair.task, engine, pair.reference, pair.moving, pair.label, pair.displacement)
    return items


def _uint8_volume(array: np.ndarray) -> ImageVolume:
    return ImageVolume(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), Geometry.identity(3))


def phantom_items(pairs_per_task: int) -> list[Item]:
    engine = FusionEngine(PHANTOM_CHECKPOINT, device="cpu")
    training = read_metadata(PHANTOM_CHECKPOINT)["training_config"]
    items = []
    for task in training["data"]["tasks"]:
        data = {**training["data"], "tasks": [task], "misalignment": {"regime": REGIME}}
        _, validation = build_datasets(data, seed=training["seed"], spatial_dims=3)
        for index in range(min(pairs_per_task, len(validation))):
            sample = validation[index]
            reference = _uint8_volume(sample["reference"][0].numpy())
            moving = _uint8_volume(sample["moving"][0].numpy())
            label = unit_intensities(_uint8_volume(sample["label"][0].numpy()))[0]
            print(f"[phantom {task} {index + 1}/{pairs_per_task}] shape {reference.array.shape}", flush=True)
            items += items_of_run(task, engine, reference, moving, label, sample["displacement"].numpy())
    return items


def _rho(x: list[float], y: list[float]) -> str:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return "n/a (constant)"
    result = spearmanr(x, y)
    return f"{result.statistic:+.2f} (p {result.pvalue:.2g})"


def table(items: list[Item], unit: str) -> str:
    rows = [f"| task | {unit}s | invented flagged vs restored error | invented mean vs restored error | "
            "uncertainty flagged vs EPE | uncertainty mean vs EPE | flagged by invented | flagged by uncertainty |",
            "|---|---:|---|---|---|---|---:|---:|"]
    for task in dict.fromkeys(item.task for item in items):
        group = [item for item in items if item.task == task]

        def column(name: str) -> list[float]:
            return [getattr(item, name) for item in group]

        rows.append(
            f"| {task} | {len(group)} | {_rho(column('invented_flagged'), column('restored_error'))} | "
            f"{_rho(column('invented_mean'), column('restored_error'))} | "
            f"{_rho(column('uncertainty_flagged'), column('epe'))} | "
            f"{_rho(column('uncertainty_mean'), column('epe'))} | "
            f"{sum(v > 0 for v in column('invented_flagged'))} | "
            f"{sum(v > 0 for v in column('uncertainty_flagged'))} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("/work/shared/data/harvard-aanlib"))
    parser.add_argument("--harvard-limit", type=int, help="at most this many validation pairs per task")
    parser.add_argument("--phantom-pairs", type=int, default=4, help="validation volumes per phantom task")
    parser.add_argument("--out", type=Path, default=Path("docs/results/quality_maps.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    harvard = harvard_items(args.harvard, args.harvard_limit)
    harvard_seconds = time.perf_counter() - start
    phantom = phantom_items(args.phantom_pairs)
    seconds = time.perf_counter() - start
    report = (
        "# How the quality maps rank what is worth a look\n\n"
        "Spearman ρ (p-value) per task between a quality-map score and what the clean label shows: the "
        "invented-structure score against the restored image's mean absolute error to the label ([0, 1] "
        "window), and the alignment uncertainty against the field's mean end-point error (voxels). "
        "*flagged*: the per-slice flagged fraction the workbench navigates by; *mean*: the map's mean. "
        "The last two columns count the items with any voxel flagged. "
        f"Misalignment regime: {REGIME}. Made by `bench/rank_quality_maps.py` in {seconds / 60:.0f} min on "
        "a shared 2-core CPU.\n\n"
        f"## Harvard AANLIB validation split (`{HARVARD_CHECKPOINT}`), one value per pair\n\n"
        f"{len(harvard)} pairs{' (at most %d per task)' % args.harvard_limit if args.harvard_limit else ''}, "
        f"{harvard_seconds / 60:.0f} min.\n\n{table(harvard, 'pair')}\n\n"
        f"## 3D phantoms (`{PHANTOM_CHECKPOINT}` validation split), one value per axial slice\n\n"
        f"{args.phantom_pairs} volumes per task, slices pooled per task.\n\n{table(phantom, 'slice')}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
