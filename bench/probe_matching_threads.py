"""How reproducible is UniFuse's 2-D alignment across torch thread counts, and do more starts help?

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_matching_threads.py --out runs/threads/base-1.json
    OMP_NUM_THREADS=2 .venv/bin/python bench/probe_matching_threads.py --out runs/threads/base-2.json
    .venv/bin/python bench/probe_matching_threads.py --compare runs/threads/base-1.json runs/threads/base-2.json

Runs the shipped ``unifuse-2d-harvard`` engine (alignment guard included, no quality maps) on the
first ``--limit`` pairs per task of a Harvard split in one misalignment regime, as ``unifuse
evaluate`` builds them, and writes each pair's end-point error (px) to ``--out``. ``--variant``
swaps the matching's MI refinement (``model.mi_refinement._refine_pair``) for a trial version:

* ``base``: the shipped one;
* ``float64``: the same in double precision;
* ``one-thread``: the same under ``torch.set_num_threads(1)``;
* ``jitter``: each rigid start also from six perturbed copies (±4 px along each axis, ±0.05 rad),
  21 starts in all.

``--compare A B`` prints, per task, the mean of each and the pair-by-pair differences (pairs that
differ by more than 0.01 px and 1 px, Wilcoxon p).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "unifuse-2d-harvard"
# (rotation rad, shift px per axis) added to each rigid start by the ``jitter`` variant.
JITTER = ((0.0, (4.0, 0.0)), (0.0, (-4.0, 0.0)), (0.0, (0.0, 4.0)), (0.0, (0.0, -4.0)),
          (0.05, (0.0, 0.0)), (-0.05, (0.0, 0.0)))


def _install(variant: str) -> None:
    import napari_unifuse.model.mi_refinement as refinement
    from napari_unifuse.model.warp import compose, identity_grid

    shipped = refinement._refine_pair
    if variant == "float64":
        def trial(moving, reference, structural, starts, spacing):
            return shipped(moving.double(), reference.double(), structural.double(),
                           [start.double() for start in starts], spacing).to(moving.dtype)
    elif variant == "one-thread":
        def trial(*args):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return shipped(*args)
            finally:
                torch.set_num_threads(threads)
    elif variant == "jitter":
        def trial(moving, reference, structural, starts, spacing):
            spatial = tuple(reference.shape[2:])
            grid = identity_grid(spatial, moving.device, moving.dtype)
            jittered = []
            for start in starts:
                jittered.append(start)
                for rotation, shift in JITTER:
                    motion = refinement.rigid_displacement(start.new_tensor([[rotation]]), start.new_tensor([shift]),
                                                           grid, spatial)
                    jittered.append(compose(start, motion))
            return shipped(moving, reference, structural, jittered, spacing)
    else:
        return
    refinement._refine_pair = trial


def run(args: argparse.Namespace) -> None:
    from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard
    from napari_unifuse.engine.inference import FusionEngine
    from napari_unifuse.model.checkpoint import read_metadata

    _install(args.variant)
    pairs = pairs_from_harvard(args.harvard, args.split, ["CT", "PET", "SPECT"], args.limit, seed=0, size=None,
                               none_fraction=0.0, cases=checkpoint_split(read_metadata(CHECKPOINT), None, None),
                               regime=args.regime)
    engine = FusionEngine(CHECKPOINT, device="cpu")
    errors = {}
    for pair in pairs:
        result = engine.run_fusion(pair.reference, pair.moving, quality=False)
        errors[pair.name] = float(np.linalg.norm(result.displacement - pair.displacement, axis=0).mean())
        print(f"{pair.name}: {errors[pair.name]:.2f} px ({result.alignment_guard.kept})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"variant": args.variant, "threads": torch.get_num_threads(),
                                    "regime": args.regime, "split": args.split, "epe": errors}, indent=1))
    _summary({args.out.name: errors})


def _summary(runs: dict[str, dict[str, float]]) -> None:
    for name, errors in runs.items():
        means = {task: np.mean([v for k, v in errors.items() if k.startswith(task)]) for task in ("CT", "PET", "SPECT")}
        print(name, " ".join(f"{task} {value:.2f}" for task, value in means.items()))


def compare(first: Path, second: Path) -> None:
    from scipy.stats import wilcoxon

    a, b = (json.loads(path.read_text())["epe"] for path in (first, second))
    _summary({first.name: a, second.name: b})
    for task in ("CT", "PET", "SPECT"):
        names = [name for name in a if name.startswith(task) and name in b]
        differences = np.array([b[name] - a[name] for name in names])
        p = wilcoxon(differences).pvalue if np.any(differences != 0) else 1.0
        print(f"{task}: {len(names)} pairs, mean difference {differences.mean():+.2f} px, "
              f"{int((abs(differences) > 0.01).sum())} differ by > 0.01 px, "
              f"{int((differences < -1).sum())} better / {int((differences > 1).sum())} worse by > 1 px, p {p:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("../shared/data/harvard-aanlib"))
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--regime", choices=("large", "mild", "none"), default="large")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--variant", choices=("base", "float64", "one-thread", "jitter"), default="base")
    parser.add_argument("--out", type=Path, default=Path("runs/threads/run.json"))
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
