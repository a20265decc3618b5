"""How far could the fusion weight alone take the per-source gain? (issue 16)

    .venv/bin/python bench/probe_fusion_balance.py [--harvard ../shared/data/harvard-aanlib]
        [--checkpoint unifuse-2d-harvard] [--split val] [--regimes large ...] [--pairs N] [--figure PNG] [--write]

UniFuse's fused image is a per-voxel blend ``w · reference + (1 − w) · restored`` (``model.ufrf``).
Every pair runs once through ``FusionEngine`` as ``unifuse evaluate`` synthesises it; from its
fused, reference and restored outputs (the [0, 1] units the metrics take) the script recovers w
wherever the two sources differ by more than ``DEFINED``, and scores on the same aligned images:

* UniFuse as shipped;
* UniFuse with its weight's logit shifted toward the moving image by each of ``LOGIT_SHIFTS``
  (one calibrated prior on the weight head for every pair);
* UniFuse with its weight's logit shifted, pair by pair, so that the mean w where the sources
  differ is about each of ``BALANCED_MEANS`` (the network still decides where each source dominates;
  the shift sets how much overall);
* the same, one-sided: only pairs whose mean w exceeds each of ``CAPPED_MEANS`` are shifted, down
  to it (a pair that already leans toward the moving image keeps its blend): ``engine.fusion_balance``,
  which the engine applies with the cap a checkpoint's sidecar holds (``--write`` stores the best
  cap on the split run; this script scores the network's own blend, the engine's cap switched off);
* constant blends ``alpha · reference + (1 − alpha) · restored`` for each of ``ALPHAS``.

Per task: mean gain toward the reference and toward the moving image (SSIM to the clean label
beyond the other source's own, ``metrics.ssim_gains``) and the mean of their per-pair minimum,
and the mean bone retention on CT. Regimes are ``unifuse evaluate``'s: ``none``, ``mild``, ``large``
with degraded moving images, and ``none-clean`` (unmoved, clean: ``--none-fraction 1``).

For every variant the worst (regime, task) mean gain_min is printed: the issue's target is a floor
on every task and regime. ``--figure`` draws the first pair of each task (first regime): reference,
restored, clean label and ``FIGURE_VARIANTS``, all on the same grey scale, titled with their gains.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

from napari_unifuse.cli.evaluate import aligned_unit_luma, checkpoint_split, pairs_from_harvard, unit_intensities
from napari_unifuse.data.color import rgb_to_ycbcr
from napari_unifuse.engine.fusion_balance import METADATA_KEY, FusionBalance
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.metrics import ssim_gains
from napari_unifuse.metrics.retention import bone_retention
from napari_unifuse.model.checkpoint import read_metadata, set_metadata_section

LOGIT_SHIFTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
BALANCED_MEANS = (0.4, 0.45, 0.5)
CAPPED_MEANS = (0.25, 0.27, 0.3, 0.33, 0.36, 0.4)
ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFINED = 0.02  # |reference − restored| above which w = (fused − restored) / (reference − restored) is read
CLEAN_SUFFIX = "-clean"
FIGURE_VARIANTS = ("UniFuse", "UniFuse, mean w at most 0.3 per pair", "UniFuse, logit shift 0.5", "constant alpha 0.3")


def capped_name(cap: float) -> str:
    return f"UniFuse, mean w at most {cap:g} per pair"


def blends(fused: np.ndarray, reference: np.ndarray, restored: np.ndarray) -> dict[str, np.ndarray]:
    """The shipped fusion, its logit-shifted variants and the constant blends of the same images."""
    difference = reference - restored
    defined = np.abs(difference) > DEFINED
    weight = np.where(defined, (fused - restored) / np.where(defined, difference, 1.0), 0.5).clip(1e-4, 1 - 1e-4)
    logit = _logit(weight)
    out = {"UniFuse": fused}
    mean_weight = float(weight[defined].mean()) if defined.any() else 0.5
    shifts = {f"UniFuse, logit shift {shift:g}": shift for shift in LOGIT_SHIFTS}
    shifts |= {f"UniFuse, mean w {mean:g} per pair": _logit(mean_weight) - _logit(mean) for mean in BALANCED_MEANS}
    for name, shift in shifts.items():
        shifted = 1 / (1 + np.exp(shift - logit))
        out[name] = np.where(defined, shifted * reference + (1 - shifted) * restored, fused)
    for cap in CAPPED_MEANS:
        out[capped_name(cap)] = FusionBalance(cap).apply(reference, restored, weight)[0]
    for alpha in ALPHAS:
        out[f"constant alpha {alpha:g}"] = alpha * reference + (1 - alpha) * restored
    return {name: image.astype(np.float32) for name, image in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harvard", type=Path, default=Path("../shared/data/harvard-aanlib"))
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--split", choices=("train", "val"), default="val")
    parser.add_argument("--regimes", nargs="+", default=["large"], help="none, mild, large, none-clean")
    parser.add_argument("--pairs", type=int, help="pairs per task (default: all)")
    parser.add_argument("--figure", type=Path, help="draw the first pair of each task here (PNG)")
    parser.add_argument("--write", action="store_true",
                        help="store the cap with the highest worst (regime, task) gain_min in the checkpoint's "
                             "sidecar (engine.fusion_balance); meant for --split train over every regime")
    args = parser.parse_args()
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    engine = FusionEngine(args.checkpoint, device="cpu")
    engine.fusion_balance = None  # the network's own blend; the caps are applied here
    scores: dict[tuple[str, str, str], list[tuple[float, ...]]] = defaultdict(list)
    drawn: dict[str, list[tuple[str, np.ndarray]]] = {}
    pairs = [(regime, pair) for regime in args.regimes
             for pair in pairs_from_harvard(args.harvard, args.split, ["CT", "PET", "SPECT"], args.pairs, seed=0,
                                            size=None, none_fraction=1.0 if regime.endswith(CLEAN_SUFFIX) else 0.0,
                                            cases=cases, regime=regime.removesuffix(CLEAN_SUFFIX))]
    for regime, pair in pairs:
        result = engine.run_fusion(pair.reference, pair.moving)
        fused = rgb_to_ycbcr(result.fused.array)[..., 0] if result.fused.is_rgb else result.fused.array
        reference = unit_intensities(pair.reference)[0]
        restored = aligned_unit_luma(result)
        variants = blends(fused.astype(np.float64), reference.astype(np.float64), restored.astype(np.float64))
        for name, image in variants.items():
            gains = ssim_gains(image, reference, pair.label)
            bone = bone_retention(image, pair.label) if pair.moving_modality == "ct" else float("nan")
            scores[(regime, pair.task, name)].append((gains.a, gains.b, gains.minimum, bone))
        if regime == args.regimes[0] and pair.task not in drawn:
            drawn[pair.task] = [("reference", reference), ("restored, aligned", restored), ("clean label", pair.label)]
            for name in FIGURE_VARIANTS:
                gains = ssim_gains(variants[name], reference, pair.label)
                drawn[pair.task].append((f"{name}\ngain ref {gains.a:.2f}, moving {gains.b:.2f}", variants[name]))
    print(f"{args.split} split, {args.checkpoint}\n")
    print("| regime | task | fusion | pairs | gain_ref | gain_mov | gain_min | bone retention |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (regime, task, name), values in scores.items():
        mean = np.mean(values, axis=0)
        bone = "" if np.isnan(mean[3]) else f"{mean[3]:.3f}"
        print(f"| {regime} | {task} | {name} | {len(values)} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {bone} |")
    worst: dict[str, tuple[float, str, str]] = {}
    for (regime, task, name), values in scores.items():
        cell = (float(np.mean([value[2] for value in values])), regime, task)
        worst[name] = min(worst.get(name, cell), cell)
    print("\nworst (regime, task) mean gain_min:\n" + "\n".join(
        f"- {name}: {value:.3f} ({regime} {task})" for name, (value, regime, task) in worst.items()))
    if args.figure:
        _draw(drawn, args.figure, f"{args.split} split, {args.regimes[0]}")
    if args.write:
        cap = max(CAPPED_MEANS, key=lambda value: worst[capped_name(value)][0])
        _write_cap(args.checkpoint, cap, worst[capped_name(cap)], args)


def _write_cap(checkpoint: str, cap: float, worst: tuple[float, str, str], args: argparse.Namespace) -> None:
    sidecar = set_metadata_section(checkpoint, METADATA_KEY, {
        "max_mean_weight": cap,
        "calibration": (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
                        f"bench/probe_fusion_balance.py --split "
                        f"{args.split} --regimes {' '.join(args.regimes)}"
                        + (f" --pairs {args.pairs}" if args.pairs else "") + " --write"),
        "criterion": f"of the caps {list(CAPPED_MEANS)}, the one with the highest worst (regime, task) mean "
                     f"gain_min on the {args.split} split: {worst[0]:.3f} ({worst[1]} {worst[2]})",
    })
    print(f"wrote {METADATA_KEY}.max_mean_weight = {cap:g} to {sidecar}")


def _draw(drawn: dict[str, list[tuple[str, np.ndarray]]], path: Path, title: str) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(panels) for panels in drawn.values())
    figure, axes = plt.subplots(len(drawn), columns, figsize=(2.6 * columns, 2.9 * len(drawn)), squeeze=False)
    for row, (task, panels) in zip(axes, drawn.items()):
        for axis, (label, image) in zip(row, panels):
            axis.imshow(image, cmap="gray", vmin=0, vmax=1)
            axis.set_title(label, fontsize=7)
            axis.axis("off")
        row[0].text(-0.08, 0.5, task, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"figure: {path}")


def _logit(weight: np.ndarray | float) -> np.ndarray | float:
    return np.log(weight / (1 - weight))


if __name__ == "__main__":
    main()
