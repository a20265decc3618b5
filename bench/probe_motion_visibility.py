"""Are the degraded crops the 3-D head misses the ones whose degradation barely shows?

    .venv/bin/python bench/eval_phantom3d.py --tasks t1-t2 --regimes none --batches 60 \\
        --records runs/visibility/t2-none.jsonl
    .venv/bin/python bench/probe_motion_visibility.py runs/visibility/t2-none.jsonl [--out FILE.md]

Reads ``eval_phantom3d``'s per-crop records and, per task and degradation, splits the degraded
crops by the SSIM of the degraded input to its clean label (in the ``none`` misalignment regime
that is the degradation's visibility alone: 1 is invisible) into quartiles, and gives each
quartile's recall (the fraction named by their degradation) and median probability of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_unifuse.data.degrade import DEGRADATION_CLASSES


def quartile_rows(records: list[dict], class_index: int) -> list[str]:
    ssim = np.array([record["ssim_input"] for record in records])
    right = np.array([record["predicted_class"] == class_index for record in records])
    probability = np.array([record["probabilities"][class_index] for record in records])
    edges = np.quantile(ssim, [0.0, 0.25, 0.5, 0.75, 1.0])
    quartile = np.clip(np.searchsorted(edges, ssim, side="right") - 1, 0, 3)
    return [f"| {edges[q]:.3f}-{edges[q + 1]:.3f} | {int((quartile == q).sum())} | "
            f"{right[quartile == q].mean():.2f} | {np.median(probability[quartile == q]):.2f} |"
            for q in range(4) if (quartile == q).any()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line]
    clean = DEGRADATION_CLASSES.index("none")
    lines = []
    for task in sorted({record["task"] for record in records}):
        of_task = [record for record in records if record["task"] == task]
        clean_records = [record for record in of_task if record["class_index"] == clean]
        clean_right = sum(record["predicted_class"] == clean for record in clean_records)
        lines += [f"## {task} ({', '.join(sorted({record['regime'] for record in of_task}))}; {len(of_task)} crops)",
                  "", f"clean crops named none: {clean_right} of {len(clean_records)}", ""]
        for class_index in sorted({record["class_index"] for record in of_task} - {clean}):
            name = DEGRADATION_CLASSES[class_index]
            degraded = [record for record in of_task if record["class_index"] == class_index]
            lines += [f"{name}: {len(degraded)} crops, SSIM of the degraded input to the clean one by quartile",
                      "", f"| SSIM(input, clean) | crops | named {name} | median p({name}) |",
                      "|---|---:|---:|---:|", *quartile_rows(degraded, class_index), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
