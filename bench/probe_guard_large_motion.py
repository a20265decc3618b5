"""How much evidence should a large correction need? The guard's large-motion factor on the 2-D
checkpoint's training split (2026-12-06).

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_guard_large_motion.py --harvard ../shared/data/harvard-aanlib
        [--split train] [--tasks CT PET SPECT] [--limit 1000] [--factors 1 1.5 2 3 4]

A challenger moving the tissue by more than ``LARGE_MOTION_VOXELS`` (12) from the incumbent needs a gain
of only ``LARGE_MOTION_FACTOR`` (1) noise unit, against k = 4 for smaller ones: on grossly misaligned
validation pairs CT-MRI's mutual information gained little for right 17-23 px corrections. On the
training split the guard moves aligned SPECT pairs by 10-36 px (bench/results/guard_floor_2d.md). This
runs the engine on the pairs of the ``none`` and ``large`` regimes, replays the guard's decisions with
each factor, and prints per task: aligned pairs moved (and the mean end-point error over the tissue,
px) and the large regime's mean end-point error.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.engine import alignment_guard
from napari_unifuse.engine.alignment_guard import IDENTITY, tissue_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_guard_blur_2d import guarded_pairs, replayed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--tasks", nargs="+", default=["CT", "PET", "SPECT"])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    args = parser.parse_args()
    shipped = alignment_guard.LARGE_MOTION_FACTOR
    # (task, regime) -> factor -> per pair: (kept something else than the identity, end-point error)
    kept: dict[tuple[str, str], dict[float, list[tuple[bool, float]]]] = defaultdict(lambda: defaultdict(list))
    for regime, pair, calls in guarded_pairs(args.harvard, args.split, args.tasks, args.limit, ["none", "large"]):
        tissue = tissue_mask(pair.reference.array.astype(np.float32))
        names = []
        for factor in args.factors:
            alignment_guard.LARGE_MOTION_FACTOR = factor
            name, field = replayed(pair, calls)
            error = float(np.linalg.norm(field - pair.displacement, axis=0)[tissue].mean())
            kept[pair.task, regime][factor].append((name != IDENTITY, error))
            names.append(f"{name} {error:.2f}")
        alignment_guard.LARGE_MOTION_FACTOR = shipped
        print(f"{regime} {pair.name} | " + " / ".join(names), flush=True)
    print(f"\n| task | | {' | '.join(f'factor {factor:g}' for factor in args.factors)} |")
    print("|---|---|" + "---:|" * len(args.factors))
    for task in dict.fromkeys(task for task, _ in kept):
        aligned, large = kept[task, "none"], kept[task, "large"]
        print(f"| {task} | none: pairs moved (EPE) | " + " | ".join(
            f"{sum(moved for moved, _ in aligned[f])} of {len(aligned[f])} ({np.mean([e for _, e in aligned[f]]):.2f})"
            for f in args.factors) + " |")
        print(f"| {task} | large: EPE | " + " | ".join(f"{np.mean([e for _, e in large[f]]):.2f}"
                                                     for f in args.factors) + " |")


if __name__ == "__main__":
    main()
