"""Is the mild regime's field in the non-affine part of a multimodal estimate? (2026-12-06)

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_nonaffine_residual.py --harvard ../shared/data/harvard-aanlib
        [--limit 8] [--regimes mild none]

On the atlas pairs the multimodal similarity is off by 3-9 px, mostly affinely (SPECT 10009: 9.6 of
its 9.8 px; docs/alignment_guard.md). The mild regime's field is mostly elastic. If the bias were
affine and the elastic part were recoverable, the estimate less its least-squares affine part over
the reference's tissue would beat the identity on mild pairs and stay near zero on aligned ones.
For Harvard training pairs (degraded, each regime; ``--limit`` per task) this prints the end-point
error over the tissue (px) of: the identity, the matching, the dense MIND refinement of it, each
less its affine part, and the true field less its own affine part (what the idea could reach at best).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from napari_unifuse.engine.alignment_guard import tissue_mask
from napari_unifuse.engine.classical import refine_dense, register_matching
from napari_unifuse.io import Geometry
from napari_unifuse.training.datasets import build_datasets


def without_affine_part(field: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``field`` (ndim, *spatial) less the affine map fitted to it by least squares over ``mask``."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in field.shape[1:]), indexing="ij"))
    design = np.concatenate([grid.reshape(len(grid), -1).T, np.ones((grid[0].size, 1))], axis=1)
    inside = mask.reshape(-1)
    coefficients, *_ = np.linalg.lstsq(design[inside], field.reshape(len(field), -1)[:, inside].T, rcond=None)
    return field - (design @ coefficients).T.reshape(field.shape)


def training_samples(harvard: Path, regime: str,
                     limit: int) -> Iterator[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """(task, pair id, reference, degraded moving image, true field) of the first ``limit`` Harvard
    training pairs per task, misaligned in ``regime``, as the training datasets draw them."""
    data = {"kind": "harvard", "root": str(harvard), "tasks": ["CT-MRI", "PET-MRI", "SPECT-MRI"],
            "none_fraction": 0.0, "val_fraction": 0.1, "split_seed": 0, "misalignment": {"regime": regime}}
    train, _ = build_datasets(data, seed=0, spatial_dims=2)
    taken: dict[str, int] = defaultdict(int)
    for index, source in enumerate(train.pairs):
        if taken[source.task] >= limit:
            continue
        taken[source.task] += 1
        sample = train[index]
        yield (source.task, source.pair_id, sample["reference"][0].numpy(), sample["moving"][0].numpy(),
               sample["displacement"].numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--regimes", nargs="+", default=["mild", "none"])
    args = parser.parse_args()
    errors: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for regime in args.regimes:
        for task, pair_id, reference, moving, truth in training_samples(args.harvard, regime, args.limit):
            mask = tissue_mask(reference)
            matching = register_matching(reference, moving, Geometry.identity(2))
            dense = refine_dense(reference, moving, matching)
            fields = {"identity": np.zeros_like(truth), "matching": matching,
                      "matching less affine": without_affine_part(matching, mask), "dense": dense,
                      "dense less affine": without_affine_part(dense, mask),
                      "truth less affine": without_affine_part(truth, mask)}
            for name, field in fields.items():
                errors[(task, regime)][name].append(float(np.linalg.norm(field - truth, axis=0)[mask].mean()))
            print(regime, task, pair_id,
                  " | ".join(f"{name} {values[-1]:.2f}" for name, values in errors[(task, regime)].items()),
                  flush=True)
    names = list(next(iter(errors.values())))
    print("\n| task | regime | " + " | ".join(names) + " |\n|---|---|" + "---:|" * len(names))
    for (task, regime), rows in errors.items():
        print(f"| {task} | {regime} | " + " | ".join(f"{np.mean(rows[name]):.2f}" for name in names) + " |")


if __name__ == "__main__":
    main()
