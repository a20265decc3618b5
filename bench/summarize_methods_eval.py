"""docs/results/methods.md: every method side by side, from `unifuse evaluate --methods` runs.

    .venv/bin/python bench/summarize_methods_eval.py --results runs/methods-eval \\
        --unifuse docs/results/harvard2d-val [--out docs/results/methods.md]

``--results`` holds one folder per regime (``large``, ``mild``, ``none``), each the ``--out`` of
``unifuse evaluate --harvard ... --misalignment REGIME --methods ...``. UniFuse is not rerun: its rows
come from ``--unifuse``'s folder of the same regime (the same Harvard validation pairs and seeds),
restricted to the pairs the methods run scored, so every mean is over the same pairs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

TASKS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
REGIMES = ("large", "mild", "none")
COLUMNS = ("ncc", "epe", "Q_abf", "Q_ssim", "Q_vif", "MI", "gain_min", "seconds")
LOWER_IS_BETTER = {"epe", "seconds"}
COPIES = ("copy-reference", "copy-moving")


def _read(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _mean(rows: list[dict], column: str) -> float:
    values = np.array([float(row[column]) for row in rows], dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _cell(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3g}"


def regime_rows(results: Path, unifuse: Path, regime: str) -> list[dict]:
    rows = [row for row in _read(results / regime / "per_pair.csv") if not row["method"].endswith(COPIES)]
    pairs = {row["pair"] for row in rows}
    reference = unifuse / regime / "per_pair.csv"
    if reference.is_file():
        rows += [row for row in _read(reference) if row["method"].startswith("UniFuse") and row["pair"] in pairs]
    return rows


def regime_table(rows: list[dict]) -> list[str]:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lines = ["| task | method | n | " + " | ".join(COLUMNS) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for task in TASKS:
        for method in methods:
            members = [row for row in rows if row["task"] == task and row["method"] == method]
            if members:
                lines.append(f"| {task} | {method} | {len(members)} | "
                             + " | ".join(_cell(_mean(members, column)) for column in COLUMNS) + " |")
    return lines


def targets(rows: list[dict], method: str, rivals: tuple[str, ...], columns: tuple[str, ...]) -> list[str]:
    """One line per task: does ``method``'s mean beat each rival's on each column?"""
    lines = []
    for task in TASKS:
        ours = [row for row in rows if row["task"] == task and row["method"] == method]
        if not ours:
            continue
        verdicts = []
        for rival in rivals:
            theirs = [row for row in rows if row["task"] == task and row["method"] == rival]
            for column in columns:
                mine, other = _mean(ours, column), _mean(theirs, column)
                better = mine < other if column in LOWER_IS_BETTER else mine > other
                verdicts.append(f"{column} vs {rival}: {_cell(mine)} vs {_cell(other)} "
                                f"{'✓' if better else '✗'}")
        lines.append(f"* {task}: " + "; ".join(verdicts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--unifuse", type=Path, default=Path("docs/results/harvard2d-val"))
    parser.add_argument("--fusion-method", default="mmif-amin:none",
                        help="the row held to the fusion target on aligned pairs (regime none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = ["# Every method side by side (Harvard validation split)", "",
            "Made by `bench/summarize_methods_eval.py` from `unifuse evaluate --methods` runs; UniFuse's rows "
            "are those of docs/results/harvard2d-val on the same pairs (not rerun). Degraded moving images "
            "(evaluate's default); mean per pair; epe in px; seconds per pair on the evaluating machine.", ""]
    for regime in REGIMES:
        if not (args.results / regime / "per_pair.csv").is_file():
            continue
        rows = regime_rows(args.results, args.unifuse, regime)
        text += [f"## Misalignment: {regime}", "", *regime_table(rows), ""]
        if regime == "none":
            text += [f"Target on aligned pairs: {args.fusion_method} against max and wavelet fusion of the "
                     "unmoved pair:", "",
                     *targets(rows, args.fusion_method, ("identity + max", "identity + wavelet"),
                              ("Q_abf", "Q_vif", "gain_min")), ""]
        if any(row["method"] == "bsafusion" for row in rows):
            text += ["BSAFusion's alignment against the identity:", "",
                     *targets(rows, "bsafusion", ("identity + max",), ("ncc", "epe")), ""]
    report = "\n".join(text)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
