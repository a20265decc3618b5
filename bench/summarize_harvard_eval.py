"""The README's tables from `unifuse evaluate` runs on the Harvard validation split, one per regime.

    .venv/bin/python bench/summarize_harvard_eval.py --results docs/results/harvard2d-val \\
        --harvard ../shared/data/harvard-aanlib [--out docs/results/harvard2d-val/summary.md]

Reads ``<results>/<folder>/per_pair.csv`` for each run of ``RUNS`` found (the three misalignment
regimes with degraded inputs, and co-registered clean pairs) and prints:

* fusion: UniFuse beside max / average / wavelet fusion of the matching's aligned pair and the two
  copies (gain_min, which a copy cannot win, then the papers' metrics);
* alignment: end-point error (over the grid and over the reference's tissue) and NCC of UniFuse,
  identity, the matching, the dense instance optimisation and SimpleITK, with UniFuse's wins over
  identity, and (``none``) the pairs it moved;
* restoration: per task and true degradation class (the pairs are rebuilt with the checkpoint's
  split and seed to recover it), the restored output's SSIM to the clean label beside the degraded
  input warped by the same field.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_unifuse.cli.evaluate import checkpoint_split, pairs_from_harvard, rounding_ties
from napari_unifuse.model.checkpoint import read_metadata

TASKS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
FUSIONS = ("matching + max", "matching + average", "matching + wavelet", "matching + copy-reference",
           "matching + copy-moving")
FUSION_COLUMNS = ("gain_min", "bone_retention", "Q_abf", "Q_ssim", "Q_vif", "MI", "Q_CB", "VIF_F")
REGISTRATIONS = ("identity + max", "matching + max", "dense + max", "sitk + max")
MOVED_PX = 1.5
# Result folder -> (misalignment regime, fraction of clean moving images) of its `unifuse evaluate`
# run: the three regimes on degraded inputs (evaluate's default), and co-registered clean pairs.
RUNS = {"large": ("large", 0.0), "mild": ("mild", 0.0), "none": ("none", 0.0), "none-clean": ("none", 1.0)}


def _read(path: Path) -> list[dict]:
    with path.open() as handle:
        return [{k: (float(v) if k not in ("regime", "pair", "task", "method") else v) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def _mean(rows: list[dict], column: str) -> float:
    values = np.asarray([row[column] for row in rows], dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _cell(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3g}"


def fusion_table(rows: list[dict], unifuse: str) -> list[str]:
    lines = ["| task | method | " + " | ".join(FUSION_COLUMNS) + " |", "|---|---|" + "---:|" * len(FUSION_COLUMNS)]
    for task in TASKS:
        for method in (unifuse, *FUSIONS):
            members = [r for r in rows if r["task"] == task and r["method"] == method]
            if members:
                name = method.replace("matching + ", "")
                lines.append(f"| {task} | {name} | " + " | ".join(_cell(_mean(members, c)) for c in FUSION_COLUMNS) + " |")
    return lines


def alignment_table(rows: list[dict], unifuse: str, regime: str) -> list[str]:
    evaluated = {row["method"] for row in rows}
    names = [name for name in (unifuse, *REGISTRATIONS) if name in evaluated]
    header = "| task | " + " | ".join(f"{n.replace(' + max', '')} EPE / tissue EPE / NCC" for n in names)
    header += " | UniFuse NCC > identity | UniFuse EPE < identity |"
    if regime == "none":
        header += f" pairs UniFuse moved > {MOVED_PX} px |"
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for task in TASKS:
        cells = []
        for name in names:
            members = [r for r in rows if r["task"] == task and r["method"] == name]
            cells.append(" / ".join(f"{_mean(members, column):.{digits}f}"
                                    for column, digits in (("epe", 2), ("epe_tissue", 2), ("ncc", 3))))
        ours = {r["pair"]: r for r in rows if r["task"] == task and r["method"] == unifuse}
        identity = {r["pair"]: r for r in rows if r["task"] == task and r["method"] == "identity + max"}
        ncc_wins = sum(_beats(ours[p]["ncc"], identity[p]["ncc"]) for p in ours)
        epe_wins = sum(_beats(identity[p]["epe"], ours[p]["epe"]) for p in ours)
        line = f"| {task} | " + " | ".join(cells) + f" | {ncc_wins}/{len(ours)} | {epe_wins}/{len(ours)} |"
        if regime == "none":
            line += f" {sum(r['epe'] > MOVED_PX for r in ours.values())}/{len(ours)} |"
        lines.append(line)
    return lines


def _beats(higher: float, lower: float) -> bool:
    """``higher`` > ``lower`` by more than float rounding (``unifuse evaluate``'s rule for a win)."""
    return higher > lower and not rounding_ties(np.float64(higher), np.float64(lower))


def restoration_table(rows: list[dict], unifuse: str, degradations: dict[str, str]) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["method"] == unifuse:
            groups[(row["task"], degradations[row["pair"]])].append(row)
    lines = ["| task | degradation | n | warped input SSIM | restored SSIM | restored better |", "|---|---|---:|---:|---:|---:|"]
    for (task, degradation), members in sorted(groups.items()):
        wins = sum(_beats(r["restored_ssim"], r["warped_input_ssim"]) for r in members)
        lines.append(f"| {task} | {degradation} | {len(members)} | {_mean(members, 'warped_input_ssim'):.3f} | "
                     f"{_mean(members, 'restored_ssim'):.3f} | {wins}/{len(members)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--harvard", type=Path, required=True)
    parser.add_argument("--checkpoint", default="unifuse-2d-harvard")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = checkpoint_split(read_metadata(args.checkpoint), None, None)
    sections = []
    for folder, (regime, none_fraction) in RUNS.items():
        path = args.results / folder / "per_pair.csv"
        if not path.is_file():
            continue
        rows = _read(path)
        unifuse = next(r["method"] for r in rows if r["method"].startswith("UniFuse"))
        pairs = pairs_from_harvard(args.harvard, "val", ["CT", "PET", "SPECT"], None, seed=0, size=None,
                                   none_fraction=none_fraction, cases=cases, regime=regime)
        degradations = {pair.name: pair.degradation for pair in pairs}
        inputs = "clean" if none_fraction == 1.0 else "degraded"
        sections += [f"## Misalignment: {regime}, {inputs} inputs ({len({r['pair'] for r in rows})} pairs)", "",
                     "Fusion (fused vs reference and clean label; the classical rules fuse the matching's aligned, "
                     "still degraded image; the copies fuse nothing):", "", *fusion_table(rows, unifuse), "",
                     "Alignment (end-point error in px vs the synthesised field, over the grid and over the "
                     "reference's tissue, NCC of the aligned image to the clean label):", "",
                     *alignment_table(rows, unifuse, regime), "",
                     "Restoration (UniFuse's restored output and its degraded input warped by the same field, "
                     "vs the clean label):", "", *restoration_table(rows, unifuse, degradations), ""]
    text = "\n".join(sections)
    print(text)
    if args.out:
        args.out.write_text("# Harvard validation split: summary of `unifuse evaluate`\n\n"
                            "Made by `bench/summarize_harvard_eval.py` from the per-regime folders beside "
                            "this file.\n\n" + text)


if __name__ == "__main__":
    main()
