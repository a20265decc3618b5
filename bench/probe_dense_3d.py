"""Does the dense MIND instance optimisation (``model.dense_refinement``, ConvexAdam's Adam stage)
improve on the field the 3-D engine keeps, on MNI phantom pairs of each task and regime?

    OMP_NUM_THREADS=2 .venv/bin/python bench/probe_dense_3d.py [--side 128] [--seeds 0 5 6]
        [--regimes mild] [--levels 32768 262144] [--out bench/results/probe_dense_3d.md]

The pairs of ``bench/eval_engine_3d_regimes.py`` (same synthesis, same seeds). For each, the
engine's kept field without the refinement among the guard's candidates (``quality=False``), then
the dense refinement started from it on optimisation levels of at most ``--levels`` voxels (the
module's budget was 65 536 and is now 262 144: a 128³ pair is optimised on 32³, then 64³).
End-point error against the true field over the head, voxels, and NCC of the degraded input moved
by each field to the clean label.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.metrics import registration_metrics
from napari_unifuse.model import dense_refinement as dense_module
from napari_unifuse.training.datasets import PHANTOM_TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_engine_3d_regimes import HEAD, in_units, phantom_pairs  # noqa: E402


def refine(moving: np.ndarray, reference: np.ndarray, start: np.ndarray, level_voxels: int) -> np.ndarray:
    """``start`` refined on a level of at most ``level_voxels`` voxels (the module's constant, set here)."""
    dense_module._MAX_LEVEL_VOXELS = level_voxels
    image = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None] for x in (moving, reference)]
    field = torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32))[None]
    return dense_module.dense_refinement(image[0], image[1], field)[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 5, 6])
    parser.add_argument("--regimes", nargs="+", default=["mild"])
    parser.add_argument("--levels", type=int, nargs="+", default=[2 ** 15, 2 ** 18])
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # The engine without the refinement among its candidates: this measures what it would add.
    engine = FusionEngine(args.checkpoint, device="cpu", weigh_dense_refinement=False)
    levels = [f"dense ≤{level}" for level in args.levels]
    header = (["task", "regime", "seed", "kept", "EPE identity", "EPE kept"] + [f"EPE {name}" for name in levels]
              + ["NCC kept"] + [f"NCC {name}" for name in levels] + ["dense seconds"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, regime, seed, pair, reference_modality, moving_modality in phantom_pairs(
            args.side, PHANTOM_TASKS, args.regimes, args.seeds):
        result = engine.run_fusion(in_units(pair.reference, reference_modality),
                                   in_units(pair.moving, moving_modality),
                                   reference_modality=reference_modality, moving_modality=moving_modality,
                                   quality=False)
        head = pair.label.array > HEAD
        truth = pair.displacement

        def epe(field: np.ndarray) -> float:
            return float(np.linalg.norm(field - truth, axis=0)[head].mean())

        def ncc(field: np.ndarray) -> float:
            moved = warp_array(pair.moving.array, field)
            return registration_metrics(moved, pair.label.array, mask=head)["ncc"]

        fields, seconds = [], []
        for level in args.levels:
            start = time.perf_counter()
            fields.append(refine(pair.moving.array, pair.reference.array, result.displacement, level))
            seconds.append(time.perf_counter() - start)
        row = [task, regime, str(seed), result.alignment_guard.kept, f"{epe(np.zeros_like(truth)):.2f}",
               f"{epe(result.displacement):.2f}"] + [f"{epe(f):.2f}" for f in fields] + [
            f"{ncc(result.displacement):.3f}"] + [f"{ncc(f):.3f}" for f in fields] + [
            " / ".join(f"{s:.1f}" for s in seconds)]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
