"""Would the 2-D Harvard checkpoint's guard decide otherwise on blurred images? (2026-12-06)

    OMP_NUM_THREADS=2 .venv/bin/python bench/probe_guard_blur_2d.py --harvard ../shared/data/harvard-aanlib
        [--split train] [--limit 10] [--regimes none mild large] [--sigmas 0 0.5 1 2]

The 3-D phantom checkpoint's guard blurs both images by half a voxel (``bench/probe_guard_blur.py``).
This runs the 2-D engine (``unifuse-2d-harvard``) on Harvard pairs as ``unifuse evaluate`` builds
them (degraded, misaligned in each regime; ``--limit`` pairs per task), records the guard's calls and
replays them with both images blurred by each sigma (pixels). Prints the estimate kept and its
end-point error (px, whole image) per sigma and pair, then the mean per task and regime.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_unifuse.cli.evaluate import EvaluationPair, checkpoint_split, pairs_from_harvard
from napari_unifuse.engine import inference
from napari_unifuse.engine.alignment_guard import IDENTITY, choose_displacement
from napari_unifuse.model.checkpoint import read_metadata

CHECKPOINT = "unifuse-2d-harvard"
GuardCall = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]


def guarded_pairs(harvard: Path, split: str, tasks: list[str], limit: int | None,
                  regimes: list[str]) -> Iterator[tuple[str, EvaluationPair, list[GuardCall]]]:
    """Each Harvard pair as ``unifuse evaluate`` builds it (degraded, misaligned in each regime), run
    through the 2-D engine, with the guard's calls (moving, reference, estimates, keywords) in the
    order the engine made them: the last one's decision is the engine's."""
    calls: list[GuardCall] = []

    def recording(moving, reference, estimates, **keywords):
        calls.append((moving, reference, dict(estimates), keywords))
        return choose_displacement(moving, reference, estimates, **keywords)

    inference.choose_displacement = recording
    engine = inference.FusionEngine(CHECKPOINT, device="cpu")
    cases = checkpoint_split(read_metadata(CHECKPOINT), None, None)
    for regime in regimes:
        for pair in pairs_from_harvard(harvard, split, tasks, limit, seed=0, size=None, none_fraction=0.0,
                                       cases=cases, regime=regime):
            calls.clear()
            engine.run_fusion(pair.reference, pair.moving, moving_modality=pair.moving_modality, quality=False)
            yield regime, pair, list(calls)


def replayed(pair: EvaluationPair, calls: list[GuardCall], **overrides: float) -> tuple[str, np.ndarray]:
    """The estimate the engine would keep (name, field) with its guard calls made again under
    ``overrides`` (keywords of ``choose_displacement``)."""
    fields, kept = {IDENTITY: np.zeros_like(pair.displacement)}, IDENTITY
    for moving, reference, estimates, keywords in calls:
        kept = choose_displacement(moving, reference, estimates, **keywords | overrides).kept
        fields |= estimates
    return kept, fields[kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--regimes", nargs="+", default=["none", "mild", "large"])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    args = parser.parse_args()
    errors: dict[float, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for regime, pair, calls in guarded_pairs(args.harvard, args.split, ["CT", "PET", "SPECT"], args.limit,
                                             args.regimes):
        kept_per_sigma = []
        for sigma in args.sigmas:
            kept, field = replayed(pair, calls, blur_voxels=sigma)
            error = float(np.linalg.norm(field - pair.displacement, axis=0).mean())
            errors[sigma][(pair.task, regime)].append(error)
            kept_per_sigma.append(f"{kept} ({error:.2f})")
        print(f"{regime} {pair.name} | " + " / ".join(kept_per_sigma), flush=True)
    for sigma, rows in errors.items():
        print(f"sigma {sigma:g}: " + ", ".join(f"{task} {regime} {np.mean(values):.2f}"
                                               for (task, regime), values in rows.items()))


if __name__ == "__main__":
    main()
