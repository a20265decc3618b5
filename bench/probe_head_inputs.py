"""What should the 3-D degradation head read: DAPL's read-outs, the patch statistics, or both?

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_head_inputs.py [--checkpoint unifuse-3d-phantom]
        [--config configs/phantom3d-cpu-head.yaml] [--train 480] [--val 360] [--cache runs/head_inputs]

The head refit's crops (``--config``'s data section: the same draws, the same none fraction), moved
by the matching as DAPL reads them, give the classifier's full input with the read-outs and the
patch statistics side by side (the checkpoint's network, its head input widened to both). Two
questions, per task, on the ``--val`` held-out crops of the validation stream:

* Which inputs tell clean from degraded? A logistic regression (standardised, C = 0.3), 5-fold
  cross-validated on the held-out crops alone, on the pooled read-outs, the pooled statistics,
  and both: AUC and accuracy of "degraded".
* What does the refit's MLP head make of them? DAPL's head for each input (``classifier_statistics_only``
  off or on), fitted as the refit fits it (``training.degradation_head``, with ``--config``'s
  steps, batch, learning-rate schedule and weight decay) on the ``--train`` crops' whole-crop rows:
  its accuracy over all five classes and its clean-vs-degraded AUC, on the training and the
  held-out crops.

About 1.2 s a crop on one thread, nearly all of it synthesis and the matching; ``--cache`` keeps the
collected inputs so that a second run only fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from napari_unifuse.model.checkpoint import load_weights, read_config
from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.dapl import PATCH_STATISTICS, DegradationAwarePromptLearning
from napari_unifuse.model.unifuse import UniFuse
from napari_unifuse.training.config import load_config
from napari_unifuse.training.datasets import build_datasets, sample_rng
from napari_unifuse.training.degradation_head import (
    HEAD_INPUT_FIELDS,
    HEAD_MODULE,
    collect_readouts,
    fit_degradation_head,
)


def collect(checkpoint: str, config_path: str, split: str, length: int) -> dict:
    """Pooled read-outs + statistics (N, rows, F), classes and tasks of ``length`` crops of ``split``."""
    config = load_config(config_path)
    data = {**config.data, "train_length": length, "val_length": length}
    train_set, val_set = build_datasets(data, seed=config.seed, spatial_dims=3)
    dataset = train_set if split == "train" else val_set
    dataset.set_epoch(0)
    network = UniFuse(dataclasses.replace(read_config(checkpoint), readout_patch_statistics=True,
                                          classifier_statistics_only=False))
    load_weights(network, checkpoint, except_module=HEAD_MODULE, fields_of_that_module=HEAD_INPUT_FIELDS)
    tasks = []
    for index in range(length):  # the draws of PhantomPairs.clean_pair: phantom size, then task
        rng = sample_rng(dataset.seed, dataset.stream, dataset.epoch, index)
        if len(dataset.shapes) > 1:
            rng.integers(len(dataset.shapes))
        tasks.append(dataset.tasks[int(rng.integers(len(dataset.tasks)))])
    readouts, labels = collect_readouts(network, dataset, torch.device("cpu"), batch_size=16,
                                        progress=lambda done, total: print(f"{split}: {done}/{total}", flush=True))
    return {"inputs": readouts, "labels": labels, "tasks": tasks}


def statistics_columns(width: int) -> list[int]:
    """Columns of the statistics in a pooled row [mean of (read-outs, statistics), spread of them]."""
    half = width // 2
    return [column for start in (half - PATCH_STATISTICS, width - PATCH_STATISTICS)
            for column in range(start, start + PATCH_STATISTICS)]


def cross_validated(inputs: np.ndarray, degraded: np.ndarray) -> tuple[float, float]:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=3000))
    probability = cross_val_predict(model, inputs, degraded, cv=5, method="predict_proba")[:, 1]
    return roc_auc_score(degraded, probability), float(((probability > 0.5) == degraded).mean())


def fitted_head(config: UniFuseConfig, config_path: str, inputs: torch.Tensor, labels: torch.Tensor) -> nn.Sequential:
    """DAPL's head for ``config``, fitted on ``inputs`` as the refit of ``config_path`` fits it."""
    head = DegradationAwarePromptLearning(config).classifier
    train = load_config(config_path).train
    fit_degradation_head(
        head, inputs, labels, steps=train.max_steps, batch_size=train.batch_size, weight_decay=train.weight_decay,
        seed=0, learning_rate=lambda step: train.min_lr + (train.lr - train.min_lr) * 0.5 * (
            1 + math.cos(math.pi * step / train.max_steps)))
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="unifuse-3d-phantom")
    parser.add_argument("--config", default="configs/phantom3d-cpu-head.yaml")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--val", type=int, default=360)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    splits = {}
    for split, length in (("val", args.val), ("train", args.train)):
        path = args.cache / f"{split}_{length}.pt" if args.cache else None
        if path is not None and path.is_file():
            splits[split] = torch.load(path, weights_only=True)
            continue
        splits[split] = collect(args.checkpoint, args.config, split, length)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(splits[split], path)
    config = dataclasses.replace(read_config(args.checkpoint), readout_patch_statistics=True)
    width = splits["val"]["inputs"].shape[-1]
    statistics = statistics_columns(width)
    readouts = [column for column in range(width) if column not in statistics]
    columns = {"read-outs": readouts, "statistics": statistics, "both": list(range(width))}
    val = splits["val"]
    rows = val["inputs"][:, 0].numpy()
    tasks, labels = np.array(val["tasks"]), val["labels"].numpy()
    print("\nclean vs degraded, logistic regression 5-fold on the held-out crops: AUC / accuracy")
    print("| inputs | " + " | ".join(sorted(set(tasks))) + " |")
    for name, chosen in columns.items():
        cells = []
        for task in sorted(set(tasks)):
            mask = tasks == task
            auc, accuracy = cross_validated(rows[mask][:, chosen], (labels[mask] != 0).astype(int))
            cells.append(f"{auc:.2f} / {accuracy:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nMLP head fitted on the training crops: 5-class accuracy / clean-vs-degraded AUC")
    print("| inputs | crops | " + " | ".join(sorted(set(tasks))) + " |")
    for name in ("both", "statistics"):
        chosen = columns[name]
        head = fitted_head(dataclasses.replace(config, classifier_statistics_only=name == "statistics"), args.config,
                           splits["train"]["inputs"][:, :1, chosen], splits["train"]["labels"])
        for split, data in (("training", splits["train"]), ("held out", val)):
            with torch.no_grad():
                probabilities = torch.softmax(head(data["inputs"][:, 0, chosen]), dim=-1).numpy()
            split_tasks, split_labels = np.array(data["tasks"]), data["labels"].numpy()
            cells = []
            for task in sorted(set(split_tasks)):
                mask = split_tasks == task
                accuracy = (probabilities[mask].argmax(1) == split_labels[mask]).mean()
                auc = roc_auc_score(split_labels[mask] != 0, 1 - probabilities[mask, 0])
                cells.append(f"{accuracy:.2f} / {auc:.2f}")
            print(f"| {name} | {split} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
