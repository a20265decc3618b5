"""Would a statistic along the phase-encode axis tell faint motion ghosts from clean T2 crops?

    .venv/bin/python bench/probe_ghost_anisotropy.py --records runs/visibility/t2-none.jsonl [--crops 120]

Motion ghosts repeat the anatomy along the phase-encode axis (one of the two in-plane axes), so
they add k-space energy away from the centre along that axis alone. The statistic: the log ratio
of the moving crop's high-frequency energy along y to that along x, minus the same for the
reference crop (same anatomy, no ghosts), in absolute value (the phase-encode axis is either).
Scored by its AUC, motion against clean, on the T1 -> T2 crops of the checkpoint's validation
stream in the ``none`` misalignment regime (the crops of ``eval_phantom3d --records``), beside
the shipped head's p(motion) on the same crops, over all motion crops and over the fainter half
(SSIM of the degraded input to its clean label above the median).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.model.checkpoint import read_metadata
from napari_unifuse.training.datasets import narrowed_validation

_MOTION, _CLEAN = DEGRADATION_CLASSES.index("motion"), DEGRADATION_CLASSES.index("none")


def log_energy_ratio(crop: np.ndarray) -> float:
    """log(E_y / E_x): the crop's spectral energy in the outer half of the frequencies along y over
    that along x (axes z, y, x)."""
    spectrum = np.abs(np.fft.fftn(crop - crop.mean())) ** 2

    def outer_energy(axis: int) -> float:
        outer = np.flatnonzero(np.abs(np.fft.fftfreq(crop.shape[axis])) > 0.25)
        return float(np.take(spectrum, outer, axis=axis).sum()) + 1e-12

    return float(np.log(outer_energy(1) / outer_energy(2)))


def anisotropy(moving: np.ndarray, reference: np.ndarray) -> float:
    """|log(E_y / E_x) of the moving crop − that of the reference crop|."""
    return abs(log_energy_ratio(moving) - log_energy_ratio(reference))


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties half."""
    return float(mannwhitneyu(positive, negative).statistic) / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--records", type=Path, required=True, help="eval_phantom3d --tasks t1-t2 --regimes none")
    parser.add_argument("--crops", type=int, default=120)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line][:args.crops]
    training = read_metadata(args.checkpoint)["training_config"]
    validation = narrowed_validation(training["data"], seed=training["seed"], spatial_dims=3, task="t1-t2",
                                     regime="none", length=len(records))
    statistic, head, classes, visibility = [], [], [], []
    for index, record in enumerate(records):
        sample = validation[index]
        if int(sample["class_index"]) != record["class_index"]:
            raise SystemExit(f"crop {index}: the records come from another stream")
        statistic.append(anisotropy(sample["moving"][0].numpy(), sample["reference"][0].numpy()))
        head.append(record["probabilities"][_MOTION])
        classes.append(record["class_index"])
        visibility.append(record["ssim_input"])
    classes_array, visibility_array = np.array(classes), np.array(visibility)
    motion = classes_array == _MOTION
    faint = motion & (visibility_array > np.median(visibility_array[motion]))
    clean = classes_array == _CLEAN
    print(f"{int(motion.sum())} motion crops ({int(faint.sum())} faint), {int(clean.sum())} clean")
    print("| score | AUC, all motion vs clean | AUC, faint half vs clean |")
    print("|---|---:|---:|")
    for name, values in (("phase-encode anisotropy", np.array(statistic)), ("shipped head's p(motion)", np.array(head))):
        print(f"| {name} | {auc(values[motion].tolist(), values[clean].tolist()):.3f} | "
              f"{auc(values[faint].tolist(), values[clean].tolist()):.3f} |")


if __name__ == "__main__":
    main()
