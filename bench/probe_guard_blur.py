"""Calibrate the alignment guard's blur (``alignment_guard.similarity_blur_voxels``) for the 3-D
phantom checkpoint on training seeds, and optionally write it into the sidecar.

    OMP_NUM_THREADS=2 .venv/bin/python bench/probe_guard_blur.py [--seeds 1 2 3 4]
        [--tasks t1-t2 mr-ct ct-pet] [--regimes none mild large] [--sigmas 0 0.5 1 1.5 2]
        [--out bench/results/guard_blur_3d.md] [--write]

On the MRI → CT mild phantom pairs the guard keeps SimpleITK's field where the matching's, or the
dense refinement's, is closer to the truth (docs/alignment_guard.md, "MRI → CT is the limit"): the
joint histogram of these phantoms is sharpest at the exact alignment, and SimpleITK optimises the
very measure the guard scores. A Gaussian blur of both images before the mutual information would
judge the alignment at the scale of the residual instead. This probe runs the 3-D engine as
``bench/eval_engine_3d_regimes.py`` does (same pairs, the checkpoint's own settings), captures the
images and candidate fields of the guard's two decisions (the matching against SimpleITK for the
initial field; that field and the dense refinement against the identity), stops before the
network, and replays both decisions with both images blurred by each sigma (voxels).

Each row: the end-point error over the head (voxels) of the identity, the matching, SimpleITK and
the dense refinement, then per sigma the estimate kept, its end-point error and the last
challenge's gain in noise units (z).

The rule, as ``bench/calibrate_guard_floor.py``'s for the floor: among the sigmas whose `none`
regime keeps the mean end-point error at most 0.5 voxels on every task and moves no pair by more
than 1.5 voxels, the one with the lowest end-point error summed over tasks and regimes; sums within
``TIE_VOXELS`` of the lowest tie, and the smallest sigma of a tie is chosen (the images closest to
as given). ``--write`` stores it in the sidecar with the command.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.engine import inference
from napari_unifuse.engine.alignment_guard import IDENTITY, METADATA_KEY, choose_displacement
from napari_unifuse.engine.methods import DENSE, MATCHING, SIMPLEITK
from napari_unifuse.model.checkpoint import read_metadata, set_metadata_section
from napari_unifuse.training.datasets import PHANTOM_TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_engine_3d_regimes import HEAD, in_units, phantom_pairs  # noqa: E402

CHECKPOINT = "unifuse-3d-phantom"
NONE_EPE_LIMIT, NONE_MOTION_LIMIT = 0.5, 1.5
# Summed end-point errors closer than this (voxels) tie: about SimpleITK's run-to-run spread.
TIE_VOXELS = 0.05


class _GuardCaptured(Exception):
    """Raised after the guard's second decision: the network's pass is not needed here."""


def capture_guard_calls(engine: inference.FusionEngine, reference, moving, **options) -> list[tuple]:
    """The arguments of the engine's ``choose_displacement`` calls for one pair, up to the second."""
    calls: list[tuple] = []

    def recording(moving_image, reference_image, estimates, **keywords):
        calls.append((moving_image, reference_image, dict(estimates), keywords))
        decision = choose_displacement(moving_image, reference_image, estimates, **keywords)
        if len(calls) == 2:
            raise _GuardCaptured
        return decision

    inference.choose_displacement = recording
    try:
        engine.run_fusion(reference, moving, quality=False, **options)
    except _GuardCaptured:
        pass
    finally:
        inference.choose_displacement = choose_displacement
    return calls


def replay(calls: list[tuple], sigma: float):
    """Both decisions again with the guard's blur at ``sigma`` voxels: (kept name, final decision)."""
    (moving, reference, initial_candidates, keywords), (_, _, final_candidates, _) = calls
    keywords = keywords | {"blur_voxels": sigma}
    initial = choose_displacement(moving, reference, initial_candidates, **keywords)
    name = SIMPLEITK if initial.kept == SIMPLEITK else MATCHING
    final = choose_displacement(moving, reference, {name: initial_candidates[name], DENSE: final_candidates[DENSE]},
                                **keywords)
    return final.kept, final


def choose_sigma(kept_errors: dict[float, dict[tuple[str, str], list[float]]],
                 none_motion: dict[float, list[float]]) -> float | None:
    """The rule of the module docstring; None when no sigma keeps the aligned pairs in place."""
    admissible = [sigma for sigma, rows in kept_errors.items()
                  if max(none_motion[sigma], default=0.0) <= NONE_MOTION_LIMIT
                  and all(np.mean(errors) <= NONE_EPE_LIMIT for (_, regime), errors in rows.items() if regime == "none")]
    if not admissible:
        return None
    totals = {sigma: sum(map(np.mean, kept_errors[sigma].values())) for sigma in admissible}
    best = min(totals.values())
    return min(sigma for sigma, total in totals.items() if total <= best + TIE_VOXELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(PHANTOM_TASKS), choices=list(PHANTOM_TASKS))
    parser.add_argument("--regimes", nargs="+", default=["none", "mild", "large"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the rows and the choice here (markdown)")
    parser.add_argument("--write", action="store_true", help="store the chosen sigma in the checkpoint's sidecar")
    args = parser.parse_args()
    engine = inference.FusionEngine(CHECKPOINT, device="cpu")
    if not engine.weigh_dense_refinement:
        raise SystemExit("the checkpoint no longer weighs the dense refinement: this probe replays that engine")
    lines = ["task regime seed | EPE identity / matching / simpleitk / dense | kept (EPE; z) per sigma "
             + " / ".join(f"{sigma:g}" for sigma in args.sigmas)]
    print(lines[0], flush=True)
    kept_errors: dict[float, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    none_motion: dict[float, list[float]] = defaultdict(list)
    for task, regime, seed, pair, reference_modality, moving_modality in phantom_pairs(
            args.side, args.tasks, args.regimes, args.seeds):
        calls = capture_guard_calls(engine, in_units(pair.reference, reference_modality),
                                    in_units(pair.moving, moving_modality),
                                    reference_modality=reference_modality, moving_modality=moving_modality)
        head, truth = pair.label.array > HEAD, pair.displacement
        fields = {IDENTITY: np.zeros_like(truth), **calls[0][2], DENSE: calls[1][2][DENSE]}
        errors = {name: float(np.linalg.norm(field - truth, axis=0)[head].mean())
                  for name, field in fields.items()}
        kept = []
        for sigma in args.sigmas:
            name, decision = replay(calls, sigma)
            last = decision.challenges[-1]
            kept.append(f"{name} ({errors[name]:.2f}; z {last.gain / max(last.noise, 1e-12):+.1f})")
            kept_errors[sigma][(task, regime)].append(errors[name])
            if regime == "none":
                none_motion[sigma].append(float(np.linalg.norm(fields[name], axis=0)[head].mean()))
        lines.append(f"{task} {regime} {seed} | "
                     + " / ".join(f"{errors[name]:.2f}" for name in (IDENTITY, MATCHING, SIMPLEITK, DENSE))
                     + " | " + " / ".join(kept))
        print(lines[-1], flush=True)
    lines.append("")
    lines.append("summed mean end-point error over tasks and regimes, per sigma: " + ", ".join(
        f"{sigma:g}: {sum(map(np.mean, rows.values())):.2f}" for sigma, rows in kept_errors.items()))
    chosen = choose_sigma(kept_errors, none_motion)
    lines.append(f"chosen sigma: {chosen}")
    print("\n".join(lines[-2:]), flush=True)
    if args.out:
        args.out.write_text("```\n" + "\n".join(lines) + "\n```\n")
    if args.write and chosen is not None:
        # The section holds the guard's other calibrations: add to it.
        sidecar = set_metadata_section(CHECKPOINT, METADATA_KEY, {
            **read_metadata(CHECKPOINT).get(METADATA_KEY, {}),
            "similarity_blur_voxels": chosen,
            "similarity_blur_calibration": (f"bench/probe_guard_blur.py --side {args.side} --seeds "
                                            f"{' '.join(map(str, args.seeds))} --sigmas "
                                            f"{' '.join(f'{sigma:g}' for sigma in args.sigmas)}"),
        })
        print(f"wrote {METADATA_KEY}.similarity_blur_voxels = {chosen:g} to {sidecar}")


if __name__ == "__main__":
    main()
