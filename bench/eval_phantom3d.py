"""Per-task, per-regime validation of a 3-D checkpoint on the MNI152 phantoms.

    .venv/bin/python bench/eval_phantom3d.py [--checkpoint unifuse-3d-phantom] [--batches 6] [--batch-size 2]
        [--tasks t1-t2 ...] [--regimes none ...] [--records FILE.jsonl] [--out FILE.md] [--data-from CHECKPOINT]
        [--crop 64] [--class-as-engine]

The phantom validation split of the checkpoint's own training config, or of ``--data-from``'s (same shapes, crop and seed;
its length, or ``--batches`` x ``--batch-size`` crops of the same validation stream when that is
more), one task and one misalignment regime at a time, scored by
``training.validation.validate``: the fused image's smaller per-source gain, the restored image's
SSIM to the clean label beside the degraded input warped by the same field, end-point error, and
class accuracy with its Wilson 95 % interval (a row of 12 crops cannot tell 0.92 from 0.99), and
the accuracy on the clean and on the degraded crops alone.
Writes a markdown table (stdout, and ``--out``); ``--records`` also writes one JSON line per crop
(task, regime, true and predicted class, class probabilities, the input's SSIM to its label), for
``bench/probe_motion_visibility.py``.
``--crop`` draws crops of another side from the same stream (the same draws of phantom, task,
degradation and severity; the crop's position and field are drawn for its own size). The network then reads its degradation
class in windows of its training crop and averages them, as the engine does on whole volumes
(``DegradationAwarePromptLearning.readout_window``), so a 64³ crop of a 32³-trained checkpoint is
eight read-out windows and tells how the class call gains from seeing more of the image.
``--class-as-engine`` scores the class alone, read as the engine reads it (``UniFuse.classify``:
the moving image as acquired, before the matching resamples it), without running the network;
the validation's own class column reads it from the forward pass, on the moved image.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from torch.utils.data import DataLoader

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.data.misalign import MISALIGNMENT_REGIMES
from napari_unifuse.model import UniFuse
from napari_unifuse.model.checkpoint import load_checkpoint, read_metadata, training_crop
from napari_unifuse.training.datasets import narrowed_validation
from napari_unifuse.training.validation import validate

CLASS_COLUMNS = ("class_accuracy", "class_accuracy_clean", "class_accuracy_degraded")
COLUMNS = ("fusion_gain_min", "ssim_restored", "ssim_warped_input", "epe_voxels", *CLASS_COLUMNS)
_CLEAN_CLASS = DEGRADATION_CLASSES.index("none")


def accuracy_interval(accuracy: float, crops: int) -> str:
    """Wilson's 95 % interval of a class accuracy measured on ``crops`` crops."""
    interval = binomtest(round(accuracy * crops), crops).proportion_ci(confidence_level=0.95, method="wilson")
    return f"{interval.low:.2f}-{interval.high:.2f}"


@torch.no_grad()
def class_as_engine(model: UniFuse, batches: Iterable[dict], records: list[dict]) -> dict[str, float]:
    """Class accuracy (all, clean, degraded crops) of ``UniFuse.classify`` on the acquired moving image."""
    right: dict[str, list[float]] = {column: [] for column in CLASS_COLUMNS}
    for batch in batches:
        probabilities = model.classify(batch["moving"], batch["reference"])[0]
        for truth, p in zip(batch["class_index"].tolist(), probabilities):
            predicted = int(p.argmax())
            records.append({"class_index": truth, "predicted_class": predicted, "probabilities": p.tolist()})
            right["class_accuracy"].append(float(predicted == truth))
            right["class_accuracy_clean" if truth == _CLEAN_CLASS else "class_accuracy_degraded"].append(
                float(predicted == truth))
    return {column: float(np.mean(values)) if values else float("nan") for column, values in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--data-from", metavar="CHECKPOINT",
                        help="take the validation data from this checkpoint's training config instead "
                             "(to score two checkpoints on the same crops)")
    parser.add_argument("--batches", type=int, default=6, help="validation batches per task and regime")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="crops per batch (the 3-D training's: 6 x 2 = 12 crops per task and regime)")
    parser.add_argument("--tasks", nargs="+", help="default: every task of the training config")
    parser.add_argument("--regimes", nargs="+", choices=MISALIGNMENT_REGIMES, default=list(MISALIGNMENT_REGIMES))
    parser.add_argument("--records", type=Path, help="one JSON line per crop")
    parser.add_argument("--crop", type=int, help="crop side (default: the training config's)")
    parser.add_argument("--class-as-engine", action="store_true",
                        help="score only the class, read by UniFuse.classify on the acquired moving image")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, _ = load_checkpoint(args.checkpoint)
    model.dapl.readout_window = training_crop(read_metadata(args.checkpoint))
    training = read_metadata(args.data_from or args.checkpoint)["training_config"]
    if args.crop:
        training = {**training, "data": {**training["data"], "crop": args.crop}}
    unknown = set(args.tasks or ()) - set(training["data"]["tasks"])
    if unknown:
        parser.error(f"tasks {sorted(unknown)} are not in the checkpoint's training config")
    records: list[dict] = []
    crops = args.batches * args.batch_size
    columns = CLASS_COLUMNS if args.class_as_engine else COLUMNS
    rows = ["| task | regime | " + " | ".join(columns) + f" | class accuracy, 95 % interval ({crops} crops) |",
            "|---|---|" + "---:|" * (len(columns) + 1)]
    for task in args.tasks or training["data"]["tasks"]:
        for regime in args.regimes:
            validation = narrowed_validation(training["data"], seed=training["seed"], spatial_dims=3, task=task,
                                             regime=regime, length=crops)
            loader = DataLoader(validation, batch_size=args.batch_size)
            crop_records: list[dict] = []
            if args.class_as_engine:
                scores = class_as_engine(model, itertools.islice(loader, args.batches), crop_records)
            else:
                scores = validate(model, loader, torch.device("cpu"), args.batches, records=crop_records)
            records.extend({"task": task, "regime": regime, **record} for record in crop_records)
            rows.append(f"| {task} | {regime} | " + " | ".join(f"{scores[c]:.3f}" for c in columns)
                        + f" | {accuracy_interval(scores['class_accuracy'], crops)} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.records:
        args.records.write_text("".join(json.dumps(record) + "\n" for record in records))
    if args.out:
        args.out.write_text(f"# `{args.checkpoint}` on the phantom validation split\n\n{table}\n")


if __name__ == "__main__":
    main()
