"""Would a floor on credible motion per moving modality serve the 2-D Harvard checkpoint? (2026-12-06)

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_guard_floor_2d.py --harvard ../shared/data/harvard-aanlib
        [--split train] [--limit 25] [--tasks CT PET SPECT] [--floors 2 3 4 5 6 7 8 10]

The 8-voxel floor of ``unifuse-2d-harvard`` was chosen for all three tasks at once, on the training
split (docs/alignment_guard.md, "A floor on credible motion"). Its reason, the multimodal
similarity's offset from the atlas, is a property of the moving modality: mutual information peaks
within 0.6 px of the atlas on CT and 2.5-3.5 px away on PET and SPECT (docs/atlas_offset.md). This
runs the engine on Harvard pairs as ``unifuse evaluate`` builds them (degraded moving images, each
regime, ``--limit`` pairs per task), records the guard's decisions and replays them with each floor.
Per task, the rule of ``bench/calibrate_guard_floor.py``: among the floors whose `none` regime keeps
the mean end-point error at most 0.5 px and moves no pair by more than 1.5 px, those whose summed
mean end-point error (mild + large, over the reference's tissue) is within 0.05 px of the lowest tie,
and the largest of them is taken (bench/results/guard_floor_2d.md).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.engine.alignment_guard import tissue_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_guard_blur_2d import guarded_pairs, replayed  # noqa: E402

REGIMES = ("none", "mild", "large")
NONE_EPE_LIMIT, NONE_MOTION_LIMIT, TIE_PIXELS = 0.5, 1.5, 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--tasks", nargs="+", default=["CT", "PET", "SPECT"])
    parser.add_argument("--floors", type=float, nargs="+", default=[2, 3, 4, 5, 6, 7, 8, 10])
    args = parser.parse_args()
    # (task, regime) -> floor -> per pair: (end-point error, mean motion) over the reference's tissue
    kept: dict[tuple[str, str], dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for regime, pair, calls in guarded_pairs(args.harvard, args.split, args.tasks, args.limit, list(REGIMES)):
        tissue = tissue_mask(pair.reference.array.astype(np.float32))
        names = []
        for floor in args.floors:
            name, field = replayed(pair, calls, min_credible_motion=floor)
            error = float(np.linalg.norm(field - pair.displacement, axis=0)[tissue].mean())
            kept[pair.task, regime][floor].append((error, float(np.linalg.norm(field, axis=0)[tissue].mean())))
            names.append(f"{name} {error:.2f}")
        print(f"{regime} {pair.name} | " + " / ".join(names), flush=True)

    print("\nMean end-point error over the tissue (px) of the kept field, per floor (px):\n")
    print("| task | regime | " + " | ".join(f"{floor:g}" for floor in args.floors) + " |")
    print("|---|---|" + "---:|" * len(args.floors))
    for (task, regime), rows in kept.items():
        print(f"| {task} | {regime} | " + " | ".join(f"{np.mean([e for e, _ in rows[f]]):.2f}" for f in args.floors)
              + " |")
    for task in sorted({task for task, _ in kept}):
        def admissible(floor: float) -> bool:
            aligned = kept[task, "none"][floor]
            return (np.mean([e for e, _ in aligned]) <= NONE_EPE_LIMIT
                    and max(m for _, m in aligned) <= NONE_MOTION_LIMIT)

        def total(floor: float) -> float:
            return float(sum(np.mean([e for e, _ in kept[task, regime][floor]]) for regime in ("mild", "large")))

        allowed = [floor for floor in args.floors if admissible(floor)]
        lowest = min((total(floor) for floor in allowed), default=None)
        chosen = max((floor for floor in allowed if total(floor) <= lowest + TIE_PIXELS), default=None)
        print(f"{task}: sums " + ", ".join(f"{floor:g}: {total(floor):.2f}{'' if floor in allowed else ' (moves none)'}"
                                          for floor in args.floors) + f" -> floor {chosen}")


if __name__ == "__main__":
    main()
