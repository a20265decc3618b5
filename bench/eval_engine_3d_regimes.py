"""The 3-D engine (``FusionEngine.run_fusion``, as ``unifuse fuse`` runs it) on MNI phantom pairs of
the paper's three tasks, in each misalignment regime: what it kept, how far that is from the truth,
and whether it beats doing nothing.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_engine_3d_regimes.py [--side 128] [--seeds 0 1]
        [--checkpoint unifuse-3d-phantom] [--dense-refinement {checkpoint,on,off}]
        [--out bench/results/engine_3d_regimes.md]

Pairs: ``data.phantoms`` at ``side``³, the moving modality degraded by its task's degradation and
misaligned by ``data.misalign`` in the regime (large, mild: a 2-4 voxel residual, none). Columns:
the estimate the guard kept (and the initial alignment the network refined), the end-point error
of the kept field against the true one and the identity's (mean over the head, voxels), NCC to the
clean label of the degraded input moved by the kept field and by nothing, the fused image's
smaller per-source gain (``metrics.ssim_gains``) and the named degradation with its probability.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from napari_unifuse.data.misalign import misalignment_from_options, warp_array
from napari_unifuse.data.pairs import make_pair
from napari_unifuse.data.phantoms import make_brain_phantoms
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.io import ImageVolume, normalize_intensity
from napari_unifuse.io.normalize import CT_WINDOW_HU
from napari_unifuse.metrics import registration_metrics, ssim_gains
from napari_unifuse.training.datasets import MODALITY_DEGRADATION, PHANTOM_INTENSITY, PHANTOM_TASKS

REGIMES = ("none", "mild", "large")
HEAD = 0.05


def in_units(image: ImageVolume, modality: str) -> ImageVolume:
    """A [0, 1] phantom as a scanner would store it: CT back in Hounsfield units (the engine
    windows CT), other modalities as they are (their percentile normalisation maps [0, 1] to itself)."""
    if modality != "ct":
        return ImageVolume(image.array, image.geometry)
    lower, upper = CT_WINDOW_HU
    return ImageVolume(lower + image.array * (upper - lower), image.geometry)


def phantom_pairs(side: int, tasks: Iterable[str], regimes: Iterable[str], seeds: Iterable[int]) -> Iterator[tuple]:
    """(task, regime, seed, pair, reference modality, moving modality) for every combination: the
    phantoms at ``side``³, the moving modality degraded by its task's degradation and misaligned in
    the regime, each seed drawing its own (``data.pairs.make_pair``)."""
    phantoms = make_brain_phantoms((side,) * 3, tuple(PHANTOM_INTENSITY))
    regimes, seeds = list(regimes), list(seeds)
    for task in tasks:
        reference_name, moving_name = PHANTOM_TASKS[task]
        reference_modality, moving_modality = PHANTOM_INTENSITY[reference_name], PHANTOM_INTENSITY[moving_name]
        reference = normalize_intensity(phantoms[reference_name], reference_modality)[0]
        label = normalize_intensity(phantoms[moving_name], moving_modality)[0]
        for regime in regimes:
            for seed in seeds:
                pair = make_pair(reference, label, MODALITY_DEGRADATION[moving_name], np.random.default_rng(seed),
                                 misalignment=misalignment_from_options({"regime": regime}))
                yield task, regime, seed, pair, reference_modality, moving_modality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--dense-refinement", choices=("checkpoint", "on", "off"), default="checkpoint",
                        help="whether the guard weighs the dense MIND refinement of the matching's field "
                             "(checkpoint: as its sidecar says)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engine = FusionEngine(args.checkpoint, device="cpu",
                          weigh_dense_refinement={"checkpoint": None, "on": True, "off": False}[args.dense_refinement])
    lines = [f"3-D engine on {args.side}³ MNI phantom pairs, checkpoint {args.checkpoint}, seeds {args.seeds}, "
             f"dense refinement weighed: {engine.weigh_dense_refinement}", "",
             "| task | regime | seed | kept (initial) | EPE kept | EPE identity | NCC kept | NCC identity "
             "| gain_min | named (p) | seconds |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    # (task, regime) -> (kept, identity) end-point errors per seed, for the summary.
    errors: dict[tuple[str, str], list[tuple[float, float]]] = {}
    # The 3-D training tasks, modalities and degradations (training.datasets).
    for task, regime, seed, pair, reference_modality, moving_modality in phantom_pairs(
            args.side, PHANTOM_TASKS, REGIMES, args.seeds):
        start = time.perf_counter()
        result = engine.run_fusion(in_units(pair.reference, reference_modality),
                                   in_units(pair.moving, moving_modality),
                                   reference_modality=reference_modality, moving_modality=moving_modality,
                                   quality=False)
        seconds = time.perf_counter() - start
        head = pair.label.array > HEAD
        truth = pair.displacement
        kept_epe = np.linalg.norm(result.displacement - truth, axis=0)[head].mean()
        identity_epe = np.linalg.norm(truth, axis=0)[head].mean()
        errors.setdefault((task, regime), []).append((kept_epe, identity_epe))
        moved = warp_array(pair.moving.array, result.displacement)
        ncc_kept = registration_metrics(moved, pair.label.array, mask=head)["ncc"]
        ncc_identity = registration_metrics(pair.moving.array, pair.label.array, mask=head)["ncc"]
        gain = ssim_gains(result.fused.array, pair.reference.array, pair.label.array).minimum
        named, probability = max(result.class_probs.items(), key=lambda item: item[1])
        # The field the network refined: SimpleITK's when it beat the matching, else the matching's.
        initial = "simpleitk" if result.provenance.get("initial_alignment", {}).get("kept") == "simpleitk" \
            else "matching"
        lines.append(f"| {task} | {regime} | {seed} | {result.alignment_guard.kept} ({initial}) | "
                     f"{kept_epe:.2f} | {identity_epe:.2f} | {ncc_kept:.3f} | {ncc_identity:.3f} | "
                     f"{gain:.3f} | {named} ({probability:.2f}) | {seconds:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Mean over seeds {args.seeds} (guard floor {engine.min_credible_motion:g} voxels, "
              f"similarity blur {engine.similarity_blur:g} voxels):", "",
              "| task | regime | EPE kept | EPE identity | change |", "|---|---|---:|---:|---:|"]
    for (task, regime), pairs in errors.items():
        kept_mean, identity_mean = np.mean(pairs, axis=0)
        change = f"{100 * (kept_mean / identity_mean - 1):+.0f} %" if identity_mean > 0 else "—"
        lines.append(f"| {task} | {regime} | {kept_mean:.2f} | {identity_mean:.2f} | {change} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
