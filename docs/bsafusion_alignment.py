"""NCC of BSAFusion's aligned moving image vs. identity on the misaligned Harvard validation pairs.

The validation split (whole atlas cases, val_fraction 0.1, split_seed 0: the same cases as
unifuse-2d-harvard's), whole 256x256 images, synthesised the way ``unifuse evaluate --harvard``
does (every moving image degraded unless --none-fraction says otherwise, one misalignment regime at
a time). Per task and regime: mean NCC(moving, label) (identity), mean NCC(aligned, label), how
many pairs improved, and the mean end-point error of the field vs. of the zero field.

    python docs/bsafusion_alignment.py --checkpoint bsafusion-2d-harvard \
        --harvard ../shared/data/harvard-aanlib [--regimes large,mild,none] [--out table.md]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from napari_unifuse.metrics import registration_metrics
from napari_unifuse.model.checkpoint import load_checkpoint
from napari_unifuse.training.datasets import build_datasets


def measure(checkpoint: str, root: Path, regimes: list[str], none_fraction: float, seed: int) -> list[dict]:
    network, metadata = load_checkpoint(checkpoint, method="bsafusion")
    data = metadata["training_config"]["data"]
    rows = []
    for regime in regimes:
        _, validation = build_datasets(
            {"kind": "harvard", "root": str(root), "tasks": data["tasks"], "none_fraction": none_fraction,
             "val_fraction": data["val_fraction"], "split_seed": data["split_seed"],
             "misalignment": {"regime": regime}},
            seed=seed, spatial_dims=2)
        per_task = defaultdict(list)
        for index, pair in enumerate(validation.pairs):
            sample = validation[index]
            with torch.no_grad():
                out = network(sample["moving"][None], sample["reference"][None])
            label = sample["label"][0].numpy()
            per_task[pair.task].append((
                registration_metrics(sample["moving"][0].numpy(), label)["ncc"],
                registration_metrics(out.aligned[0, 0].numpy(), label)["ncc"],
                float((out.displacement[0] - sample["displacement"]).norm(dim=0).mean()),
                float(sample["displacement"].norm(dim=0).mean()),
            ))
        for task, values in sorted(per_task.items()):
            array = np.asarray(values, dtype=float)
            rows.append({"regime": regime, "task": task, "pairs": len(array),
                         "ncc_identity": np.nanmean(array[:, 0]), "ncc_aligned": np.nanmean(array[:, 1]),
                         "improved": int(np.sum(array[:, 1] > array[:, 0])),
                         "epe": array[:, 2].mean(), "epe_identity": array[:, 3].mean()})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| regime | task | pairs | NCC identity | NCC BSAFusion | improved | EPE (px) | EPE identity (px) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['task']} | {r['pairs']} | {r['ncc_identity']:.4f} | "
                     f"{r['ncc_aligned']:.4f} | {r['improved']}/{r['pairs']} | {r['epe']:.2f} | {r['epe_identity']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bsafusion-2d-harvard")
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--regimes", default="large,mild,none")
    parser.add_argument("--none-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = markdown(measure(args.checkpoint, args.harvard, args.regimes.split(","), args.none_fraction, args.seed))
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
