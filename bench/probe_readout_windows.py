"""Why does a larger view of the same phantom change the 3-D degradation call?

    .venv/bin/python bench/eval_phantom3d.py --crop 64 --batches 30 --records runs/eval64/records.jsonl
    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_readout_windows.py runs/eval64/records.jsonl [--task ct-pet]
        [--regime none] [--crops 4]

From ``bench/eval_phantom3d.py --crop N`` records: the misses per phantom size (the crops' first
draw, ``training.datasets.PhantomPairs.clean_pair``), for every task and regime. Then, for the first
``--crops`` missed crops of ``--task`` / ``--regime`` and as many clean ones, the network's
probability of the crop's true degradation (of the modality's degradation, for the clean ones) in
each window of its training crop, stepped by a quarter window along every axis and each read alone
(no ``readout_window``), as a training crop is: the centred window, the corner windows the engine's
tiling reads (``DegradationAwarePromptLearning._windows``), and the anatomy-weighted mean of the
tiling, of half-overlapping windows and of every quarter step, with the share of anatomy of the
centred and the corner windows.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.model.checkpoint import load_checkpoint, read_metadata, training_crop
from napari_unifuse.training.datasets import MODALITY_DEGRADATION, PHANTOM_TASKS, narrowed_validation, sample_rng

_ANATOMY = 0.05  # as model.dapl's window weights


def phantom_side(dataset, index: int) -> int:
    rng = sample_rng(dataset.seed, dataset.stream, dataset.epoch, index)
    return dataset.shapes[int(rng.integers(len(dataset.shapes)))][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--crop", type=int, default=64, help="the crop side the records were made with")
    parser.add_argument("--task", default="ct-pet")
    parser.add_argument("--regime", default="none")
    parser.add_argument("--crops", type=int, default=4)
    args = parser.parse_args()
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    window = training_crop(read_metadata(args.checkpoint))
    if args.crop < window or (args.crop - window) % window:
        parser.error(f"--crop must be a multiple of the {window}-voxel read-out window, so that windows tile it")
    training = read_metadata(args.checkpoint)["training_config"]
    data = {**training["data"], "crop": args.crop}
    records = [json.loads(line) for line in args.records.read_text().splitlines()]

    def dataset(task: str, regime: str, length: int):
        return narrowed_validation(data, seed=training["seed"], spatial_dims=3, task=task, regime=regime,
                                   length=length)

    print(f"## Degraded crops missed, by phantom side ({args.crop}³ crops)\n")
    print("| task | regime | " + " | ".join(f"{side}³" for side, *_ in training["data"]["shapes"]) + " |")
    print("|---|---|" + "---:|" * len(training["data"]["shapes"]))
    for task in training["data"]["tasks"]:
        for regime in dict.fromkeys(record["regime"] for record in records):
            rows = [r for r in records if r["task"] == task and r["regime"] == regime]
            if not rows:
                continue
            pairs = dataset(task, regime, len(rows))
            missed, degraded = Counter(), Counter()
            for index, record in enumerate(rows):
                if record["class_index"] != 0:
                    side = phantom_side(pairs, index)
                    degraded[side] += 1
                    missed[side] += record["predicted_class"] != record["class_index"]
            print(f"| {task} | {regime} | " + " | ".join(
                f"{missed[side]} / {degraded[side]}" for side, *_ in training["data"]["shapes"]) + " |")

    rows = [r for r in records if r["task"] == args.task and r["regime"] == args.regime]
    degradation = DEGRADATION_CLASSES.index(MODALITY_DEGRADATION[PHANTOM_TASKS[args.task][1]])
    chosen = ([i for i, r in enumerate(rows) if r["class_index"] != 0 and r["predicted_class"] != r["class_index"]]
              [: args.crops] + [i for i, r in enumerate(rows) if r["class_index"] == 0][: args.crops])
    pairs = dataset(args.task, args.regime, len(rows))
    step = window // 4
    starts = range(0, args.crop - window + 1, step)
    centre, tiling, half = len(starts) // 2, slice(None, None, 4), slice(None, None, 2)
    print(f"\n## {args.task}, {args.regime}: p({DEGRADATION_CLASSES[degradation]}) in {window}³ windows, "
          f"read alone, stepped by {step} voxels\n")
    print("| crop | phantom | truth | named (p) | centred window (anatomy) | corner windows (anatomy) | "
          "weighted mean: tiling / half overlap / every step |")
    print("|---:|---:|---|---|---:|---|---|")
    model.dapl.readout_window = None
    with torch.no_grad():
        for index in chosen:
            sample = pairs[index]
            moving, reference = sample["moving"][None], sample["reference"][None]
            shape = (len(starts),) * 3
            probability, anatomy = np.zeros(shape), np.zeros(shape)
            for position in np.ndindex(shape):
                box = (slice(None), slice(None), *(slice(starts[i], starts[i] + window) for i in position))
                probability[position] = float(model.classify(moving[box].contiguous(),
                                                             reference[box].contiguous())[0][0, degradation])
                anatomy[position] = float((torch.maximum(moving[box], reference[box]) > _ANATOMY).float().mean())

            def weighted(select: slice) -> float:
                weights = anatomy[select, select, select] + 1e-3
                return float((probability[select, select, select] * weights).sum() / weights.sum())

            record = rows[index]
            corners = probability[tiling, tiling, tiling].ravel()
            print(f"| {index} | {phantom_side(pairs, index)}³ | {DEGRADATION_CLASSES[record['class_index']]} | "
                  f"{DEGRADATION_CLASSES[record['predicted_class']]} "
                  f"({record['probabilities'][record['predicted_class']]:.2f}) | "
                  f"{probability[centre, centre, centre]:.2f} ({anatomy[centre, centre, centre]:.2f}) | "
                  f"{corners.min():.2f}-{corners.max():.2f} ({anatomy[tiling, tiling, tiling].mean():.2f}) | "
                  f"{weighted(tiling):.2f} / {weighted(half):.2f} / {weighted(slice(None)):.2f} |", flush=True)


if __name__ == "__main__":
    main()
