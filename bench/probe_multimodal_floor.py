"""How far can a registration get on the mild regime when the similarity is multimodal, and when not?

    .venv/bin/python bench/probe_multimodal_floor.py [--harvard ../shared/data/harvard-aanlib]
        [--regime mild] [--limit 6]

For each Harvard validation pair of ``unifuse evaluate`` (same split, seeds and regime), the
degraded moving image is registered twice by each classical method (``engine.classical``: SimpleITK
rigid + B-spline on Mattes MI, and the dense MIND instance optimisation): onto the MRI reference
(multimodal, what every pipeline faces) and onto the clean label, the moving modality itself aligned
(monomodal, the same method with an easy similarity). The end-point error over the label's tissue
(px) of both, beside the identity's, separates what the methods can do from what the similarity
lets them do.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.cli.evaluate import EvaluationPair, checkpoint_split, pairs_from_harvard
from napari_unifuse.engine import classical
from napari_unifuse.engine.inference import _prepare
from napari_unifuse.model.checkpoint import read_metadata

REPOSITORY = Path(__file__).resolve().parents[1]
METHODS = ("sitk", "dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvard", type=Path, default=REPOSITORY.parent / "shared" / "data" / "harvard-aanlib")
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard", help="whose case split to use")
    parser.add_argument("--regime", default="mild")
    parser.add_argument("--limit", type=int, default=6, help="pairs per task")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    pairs = pairs_from_harvard(args.harvard, "val", ["CT", "PET", "SPECT"], args.limit, seed=0, size=None,
                               none_fraction=0.0, cases=cases, regime=args.regime)
    errors: dict[str, list[dict[str, float]]] = defaultdict(list)
    for pair in pairs:
        reference = _prepare(pair.reference, "auto").luma.array
        row = registration_errors(pair, {"onto MRI": reference, "onto clean label": pair.label})
        errors[pair.task].append(row)
        print(pair.name, pair.degradation, {k: round(v, 2) for k, v in row.items()}, flush=True)
    print_means(errors, f"Mean end-point error over the label's tissue (px), {args.regime} regime")


def registration_errors(pair: EvaluationPair, fixed_images: dict[str, np.ndarray]) -> dict[str, float]:
    """End-point error over the label's tissue (px) of the identity and of each method registering
    the pair's degraded moving image onto each fixed image (``"<method> <fixed name>"``)."""
    moving = _prepare(pair.moving, "auto").luma.array
    tissue = pair.label > 0.05 * np.percentile(pair.label, 99)

    def error(field: np.ndarray) -> float:
        return float(np.linalg.norm(field - pair.displacement, axis=0)[tissue].mean())

    row = {"identity": error(np.zeros_like(pair.displacement))}
    for fixed_name, fixed in fixed_images.items():
        for method in METHODS:
            row[f"{method} {fixed_name}"] = error(classical.register(method, fixed, moving).displacement)
    return row


def print_means(rows_by_task: dict[str, list[dict[str, float]]], heading: str) -> None:
    """A markdown table of each column's mean per task."""
    columns = list(next(iter(rows_by_task.values()))[0])
    print(f"\n{heading}\n")
    print("| task | pairs | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for task, rows in rows_by_task.items():
        print(f"| {task} | {len(rows)} | " + " | ".join(f"{np.mean([r[c] for r in rows]):.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
