"""Does a second pass of the structural matching improve on the first? (2026-12-06, not adopted)

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_matching_two_passes.py --harvard ../shared/data/harvard-aanlib
        [--limit 10] [--regime large]

The matching runs again on the moving image warped by its first field, and the two fields are
composed (``model.warp.compose``). Prints the end-point error over the reference's tissue (px) of the
identity, one pass and two passes, per Harvard training pair (degraded moving images) and per task.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.classical import register_matching
from napari_unifuse.io import Geometry
from napari_unifuse.model.warp import compose, warp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_nonaffine_residual import training_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--regime", default="large", choices=("large", "mild", "none"))
    args = parser.parse_args()
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, pair_id, reference, moving, truth in training_samples(args.harvard, args.regime, args.limit):
        tissue = tissue_mask(reference)
        first = register_matching(reference, moving, Geometry.identity(2))
        moved = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(first)[None])[0, 0].numpy()
        second = register_matching(reference, moved, Geometry.identity(2))
        both = compose(torch.from_numpy(first)[None], torch.from_numpy(second)[None])[0].numpy()
        for name, field in (("identity", np.zeros_like(truth)), ("one pass", first), ("two passes", both)):
            errors[task][name].append(float(np.linalg.norm(field - truth, axis=0)[tissue].mean()))
        print(task, pair_id, " | ".join(f"{name} {values[-1]:.2f}"
                                                      for name, values in errors[task].items()), flush=True)
    for task, rows in errors.items():
        print(task, " | ".join(f"{name} {np.mean(values):.2f}" for name, values in rows.items()))


if __name__ == "__main__":
    main()
