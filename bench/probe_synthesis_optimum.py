"""Does a monomodal intermediate put the true field at its optimum on the Harvard pairs? (issue 17)

    .venv/bin/python bench/probe_synthesis_optimum.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split train|val] [--regimes mild large] [--pairs 10]

The alignment guard's floor and the unmet mild and large targets rest on one finding: across
modalities, mutual information (and normalised gradient fields) score the matching's estimates
at or above the true field on these pairs (docs/alignment_guard.md, docs/atlas_offset.md). The
classical way around a multimodal similarity is a *monomodal intermediate*: synthesise the moving
modality from the reference and register onto the synthesis. This probe asks whether that
similarity would do better before anyone builds it: does it score the truth above the estimate?

The synthesis: the moving image (PET/SPECT luma or CT, [0, 1]) as a blurred piecewise-linear map
of the MRI, ``M ≈ G_sigma * f(R) + b``, f on 12 linear bins of the MRI's intensity and sigma from
``SIGMAS`` (the PET/SPECT scanner's blur), fitted by least squares over the head (the MRI's
foreground, Gaussian-blurred 2 px). Its score is the fraction of the moving image's variance the
MRI explains (R²), refitted for every position: the moving image unmoved, moved by the field the
engine kept (``FusionEngine``, the matching's or the identity), and moved by the true field. The
moving image is smoothed (Gaussian, ``PRESMOOTH`` px) before any of the three, so that the
resampling of the two moved positions, which smooths a degraded image's noise, does not favour
them over the unmoved one.

Pairs as ``unifuse evaluate`` synthesises them (same split, seeds and regimes; all three tasks,
since the case split depends on the task list). Per regime and task: mean tissue end-point error
(px) of the identity and of the kept field, mean R² at the three positions, and on how many
pairs the truth's R² is below the kept field's (among the pairs the engine moved) or below the
identity's (among those it left alone).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.alignment_guard import IDENTITY, tissue_mask
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.model.checkpoint import read_metadata

BINS = 12
SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # px
HEAD_BLUR = 2.0  # px
HEAD_LEVEL = 0.02  # "shows anything" (model.mi_refinement.FOREGROUND)
PRESMOOTH = 1.0  # px


def _bin_weights(reference: np.ndarray) -> np.ndarray:
    """(BINS, *shape) linear ("hat") weights of each voxel's MRI intensity over BINS bin centres."""
    position = np.clip(reference, 0, 1) * (BINS - 1)
    centres = np.arange(BINS, dtype=np.float64).reshape(-1, *[1] * reference.ndim)
    return np.clip(1 - np.abs(position[None] - centres), 0, None)


def synthesis_r2(reference: np.ndarray, moving: np.ndarray) -> float:
    """R² over the head of the best ``G_sigma * f(reference) + b`` (sigma in SIGMAS) for ``moving``."""
    head = ndimage.gaussian_filter(reference.astype(np.float64), HEAD_BLUR) > HEAD_LEVEL
    target = moving[head].astype(np.float64)
    weights = _bin_weights(reference.astype(np.float64))
    best = np.inf
    for sigma in SIGMAS:
        blurred = np.stack([ndimage.gaussian_filter(w, sigma) if sigma else w for w in weights])
        design = np.column_stack([blurred[:, head].T, np.ones(target.size)])
        coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
        best = min(best, float(((design @ coefficients - target) ** 2).mean()))
    return 1.0 - best / float(target.var())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("../shared/data/harvard-aanlib"))
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--regimes", nargs="+", default=["mild", "large"])
    parser.add_argument("--pairs", type=int, default=10, help="pairs per task")
    args = parser.parse_args()
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    engine = FusionEngine(args.checkpoint, device="cpu")
    print("| regime | task | pairs | moved | tissue EPE (px): identity / kept | R²: identity / kept / truth "
          "| truth below kept (moved) | truth below identity (unmoved) |")
    print("|---|---|---:|---:|---|---|---|---|")
    for regime in args.regimes:
        pairs = pairs_from_harvard(args.harvard, args.split, ["CT", "PET", "SPECT"], args.pairs, seed=0, size=None,
                                   none_fraction=0.0, cases=cases, regime=regime)
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        for pair in pairs:
            result = engine.run_fusion(pair.reference, pair.moving)
            kept = np.asarray(result.displacement, dtype=np.float32)
            truth = np.zeros_like(kept) if pair.displacement is None else np.asarray(pair.displacement, np.float32)
            reference = unit_intensities(pair.reference)[0]
            moving = ndimage.gaussian_filter(unit_intensities(pair.moving)[0], PRESMOOTH)
            tissue = tissue_mask(reference)
            scores = {name: synthesis_r2(reference, warp_array(moving, field))
                      for name, field in (("identity", np.zeros_like(kept)), ("kept", kept), ("truth", truth))}
            rows[pair.task].append({
                **scores, "moved": float(result.alignment_guard.kept != IDENTITY),
                "epe_identity": float(np.linalg.norm(truth, axis=0)[tissue].mean()),
                "epe_kept": float(np.linalg.norm(kept - truth, axis=0)[tissue].mean())})
        for task, task_rows in rows.items():
            column = {key: np.array([row[key] for row in task_rows]) for key in task_rows[0]}
            moved = column["moved"] > 0
            print(f"| {regime} | {task} | {len(task_rows)} | {int(moved.sum())} | "
                  f"{column['epe_identity'].mean():.2f} / {column['epe_kept'].mean():.2f} | "
                  f"{column['identity'].mean():.3f} / {column['kept'].mean():.3f} / {column['truth'].mean():.3f} | "
                  f"{int((column['truth'] < column['kept'])[moved].sum())} of {int(moved.sum())} | "
                  f"{int((column['truth'] < column['identity'])[~moved].sum())} of {int((~moved).sum())} |",
                  flush=True)


if __name__ == "__main__":
    main()
