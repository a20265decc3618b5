"""Does the structural matching give the same field on one torch thread as on two? (issue 17)

    OMP_NUM_THREADS=2 .venv/bin/python bench/probe_matching_threads.py [--harvard ../shared/data/harvard-aanlib]
        [--regime large] [--unpinned]

Runs ``engine.classical.register_matching`` (the engine's matching: same function, same settings)
on every Harvard validation pair of a misalignment regime, as ``unifuse evaluate`` synthesises them,
once with ``torch.set_num_threads(1)`` and once with 2, and prints per task the mean end-point error
against the true field of each, how many pairs' fields differ by more than 0.5 px on average, and
the largest difference.

Since ``model.repeatable`` pins the matching to one torch thread, every pair should come out 0 px
apart. ``--unpinned`` runs the matching without the pin (``structural_matching.__wrapped__``), as
it ran before, which gives the tables of ``bench/results/matching_threads.md`` made at e64ddeb.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.engine import classical
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.model.matching import structural_matching

THREADS = (1, 2)
DIFFERENT_PX = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("../shared/data/harvard-aanlib"))
    parser.add_argument("--regime", default="large", choices=("none", "mild", "large"))
    parser.add_argument("--unpinned", action="store_true", help="the matching without its one-thread pin")
    args = parser.parse_args()
    if args.unpinned:  # register_matching reads the name from its module at each call
        classical.structural_matching = structural_matching.__wrapped__
    cases = checkpoint_split(read_metadata("unifuse-2d-harvard"), None, None)
    pairs = pairs_from_harvard(args.harvard, "val", ["CT", "PET", "SPECT"], None, seed=0, size=None,
                               none_fraction=0.0, cases=cases, regime=args.regime)
    rows: dict[str, list[tuple[float, ...]]] = {}
    for pair in pairs:
        reference, moving = unit_intensities(pair.reference)[0], unit_intensities(pair.moving)[0]
        fields = []
        for threads in THREADS:
            torch.set_num_threads(threads)
            fields.append(classical.register_matching(reference, moving, None))
        errors = [float(np.linalg.norm(field - pair.displacement, axis=0).mean()) for field in fields]
        apart = float(np.linalg.norm(fields[0] - fields[1], axis=0).mean())
        rows.setdefault(pair.task, []).append((*errors, apart))
    pin = "without" if args.unpinned else "with"
    print(f"{args.regime} regime, validation split; end-point error (px) of the matching ({pin} its one-thread pin)"
          " per torch thread count\n")
    print("| task | pairs | " + " | ".join(f"EPE, {n} thread{'s' * (n > 1)}" for n in THREADS)
          + f" | pairs > {DIFFERENT_PX} px apart | largest mean distance between the two fields (px) |")
    print("|---|---:|" + "---:|" * (len(THREADS) + 2))
    for task, values in rows.items():
        table = np.array(values)
        apart = table[:, -1]
        print(f"| {task} | {len(table)} | " + " | ".join(f"{v:.2f}" for v in table[:, :-1].mean(axis=0))
              + f" | {(apart > DIFFERENT_PX).sum()} | {apart.max():.2f} |")


if __name__ == "__main__":
    main()
