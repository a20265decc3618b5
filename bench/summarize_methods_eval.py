"""docs/results/methods.md: every method side by side, from `unifuse evaluate --methods` runs.

    .venv/bin/python bench/summarize_methods_eval.py --results runs/methods-eval [more ...] \\
        [--unifuse docs/results/harvard2d-val/guard8] [--out docs/results/methods.md] [--compact NAME ...] \\
        [--note docs/results/methods_simpleitk_note.md]
    .venv/bin/python bench/summarize_methods_eval.py --retest docs/results/methods/* [more evaluate outputs ...]

Each ``--results`` folder holds one folder per regime (``large``, ``mild``, ``none``), each the
``--out`` of ``unifuse evaluate --harvard ... --misalignment REGIME --methods ...``; several folders
(methods evaluated in separate runs, e.g. in parallel) are merged, a (pair, method) row that two
runs share being taken from the first. Where no run evaluated UniFuse (``--checkpoint``), its rows
come from ``--unifuse``'s folder of the same regime (the same Harvard validation pairs and seeds),
restricted to the pairs the methods run scored, so every mean is over the same pairs.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

TASKS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
# Result folders in report order, with their section titles; none-clean (the unmoved pair with a
# clean moving image, evaluate --none-fraction 1) is MMIF-AMIN's own setting: aligned clean pairs.
REGIMES = {"large": "Misalignment: large", "mild": "Misalignment: mild", "none": "Misalignment: none",
           "none-clean": "Misalignment: none, clean moving images"}
ALIGNED = ("none", "none-clean")
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


def merged_rows(results: list[Path], regime: str) -> list[dict]:
    """Every run's per-pair rows of ``regime``, a (pair, method) that two runs share from the first."""
    merged: dict[tuple[str, str], dict] = {}
    for folder in results:
        table = folder / regime / "per_pair.csv"
        for row in _read(table) if table.is_file() else []:
            merged.setdefault((row["pair"], row["method"]), row)
    return list(merged.values())


def regime_rows(results: list[Path], unifuse: Path, regime: str) -> list[dict]:
    rows = [row for row in merged_rows(results, regime) if not row["method"].endswith(COPIES)]
    pairs = {row["pair"] for row in rows}
    reference = unifuse / regime / "per_pair.csv"
    if reference.is_file() and not any(row["method"].startswith("UniFuse") for row in rows):
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


def write_folder(results: list[Path], regime: str, title: str, folder: Path) -> None:
    """``folder``: the merged runs as one ``unifuse evaluate`` output (per_pair.csv, evaluation.csv,
    paired.csv, evaluation.md), the tables and pair-by-pair tests made by evaluate's own code, so
    that every engine method is compared with every other row, whichever run scored it."""
    from napari_unifuse.cli.evaluate import METRIC_COLUMNS, regime_section, summarise, write_csv

    # A run made before evaluate had a column (epe_tissue, say) leaves it NaN: the means and the
    # pair-by-pair tests then leave that run's rows out of that column only.
    records = [{**row, **{column: float(row.get(column, "nan")) for column in METRIC_COLUMNS}}
               for row in merged_rows(results, regime)]
    engine_methods = [method for method in dict.fromkeys(row["method"] for row in records) if " + " not in method]
    summary = summarise(records)
    section, paired = regime_section(regime, summary, records, engine_methods, "identity")
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(records, folder / "per_pair.csv")
    write_csv(summary, folder / "evaluation.csv")
    write_csv(paired, folder / "paired.csv")
    (folder / "evaluation.md").write_text(
        f"# {title}: every method on the Harvard validation split\n\nMerged by `bench/summarize_methods_eval.py "
        f"--folders` from {', '.join(str(path / regime) for path in results)}; mean ± std, then each engine method "
        "against every other row, pair by pair (Δ, wins, Wilcoxon p).\n\n" + section, encoding="utf-8")


def retest_folder(folder: Path) -> None:
    """Rebuild the pair-by-pair tests of a ``unifuse evaluate`` output folder, its evaluation.md's
    "against each pipeline" sections and its paired.csv, from its per_pair.csv with evaluate's own
    code (``paired_comparison``, ``paired_section``): no pair is recomputed, and every other line of
    the report stays as it is. For results made before a change to the tests (rounding ties)."""
    from napari_unifuse.cli.evaluate import PAIRED_SECTION_TITLE, paired_comparison, paired_section, write_csv

    per_pair = _read(folder / "per_pair.csv")
    with (folder / "paired.csv").open(newline="", encoding="utf-8") as handle:
        fields = next(csv.reader(handle))  # kept as the folder has them (merged folders have no regime)
    regimes = {row.get("regime") for row in per_pair}
    lines = (folder / "evaluation.md").read_text(encoding="utf-8").split("\n")
    kept, paired, regime = [], [], None
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## Misalignment: "):
            regime = line.removeprefix("## Misalignment: ")
        if not (line.startswith("### ") and line.endswith(PAIRED_SECTION_TITLE)):
            kept.append(line)
            index += 1
            continue
        # Title, blank line, what the numbers are, blank line, then the table.
        header, end = lines[index + 4], index + 5
        if not header.startswith("| task | versus | "):
            raise ValueError(f"{folder / 'evaluation.md'}: no pair-by-pair table under {line!r}")
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        method = line.removeprefix("### ").removesuffix(PAIRED_SECTION_TITLE)
        columns = tuple(cell.strip().removesuffix(": Δ, wins, p") for cell in header.strip("|").split("|")[2:])
        # A run of several regimes has a section each; a merged folder's title need not be its rows' regime.
        of_regime = [row for row in per_pair if len(regimes) == 1 or row["regime"] == regime]
        records = [{**row, **{column: float(row.get(column) or "nan") for column in columns}} for row in of_regime]
        rows = paired_comparison(records, method, columns)
        kept += paired_section(method, rows, columns).removesuffix("\n").split("\n")
        paired += [{field: {"regime": records[0].get("regime"), **row}[field] for field in fields} for row in rows]
        index = end
    (folder / "evaluation.md").write_text("\n".join(kept), encoding="utf-8")
    write_csv(paired, folder / "paired.csv")


def compact_table(tables: dict[str, list[dict]], methods: list[str]) -> list[str]:
    """The README's table: ``methods`` only (``UniFuse`` also finds ``UniFuse (checkpoint)``),
    every regime and task, the alignment and fusion columns."""
    columns = ("ncc", "epe", "Q_abf", "Q_vif", "gain_min", "seconds")
    lines = ["| regime | task | method | " + " | ".join(columns) + " |", "|---|---|---|" + "---:|" * len(columns)]
    for regime, rows in tables.items():
        for task in TASKS:
            for name in methods:
                members = [row for row in rows if row["task"] == task
                           and (row["method"] == name or row["method"].startswith(f"{name} ("))]
                if members:
                    lines.append(f"| {regime} | {task} | {members[0]['method']} | "
                                 + " | ".join(_cell(_mean(members, column)) for column in columns) + " |")
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


def header(results: list[Path], unifuse: Path, notes: list[Path]) -> list[str]:
    """The title, where the rows come from, and each ``notes`` file's text as a paragraph of its own:
    caveats on the merged runs that a regeneration must keep."""
    text = ["# Every method side by side (Harvard validation split)", "",
            "Made by `bench/summarize_methods_eval.py` from `unifuse evaluate --methods` runs (UniFuse's rows "
            f"from {unifuse} where a run did not evaluate it). Degraded moving images (evaluate's "
            "default) except in the last section; mean per pair; epe in px; seconds per pair as each run "
            f"measured them. Runs merged: {', '.join(f'`{folder}`' for folder in results)}. What the tables "
            "show is discussed in the README (Every method on the Harvard validation split).", ""]
    for note in notes:
        text += [note.read_text(encoding="utf-8").strip(), ""]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="+")
    parser.add_argument("--unifuse", type=Path, default=Path("docs/results/harvard2d-val/guard8"),
                        help="evaluate runs of the shipped UniFuse engine on the same pairs (per regime)")
    parser.add_argument("--fusion-method", default="mmif-amin:none",
                        help="the row held to the fusion target on aligned pairs (none and none-clean)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", type=Path, nargs="+", metavar="FILE",
                        help="Markdown paragraphs put under the header, e.g. docs/results/methods_simpleitk_note.md")
    parser.add_argument("--compact", nargs="+", metavar="NAME",
                        help="also print one table of these methods over every regime (the README's)")
    parser.add_argument("--folders", type=Path,
                        help="also write the merged runs per regime as evaluate outputs under this folder")
    parser.add_argument("--retest", type=Path, nargs="+", metavar="FOLDER",
                        help="only rebuild the pair-by-pair tests of these evaluate output folders from their "
                             "per_pair.csv (retest_folder), e.g. docs/results/methods/*")
    args = parser.parse_args()
    if args.retest:
        for folder in args.retest:
            retest_folder(folder)
        return
    if not args.results:
        parser.error("--results is required (unless --retest)")
    tables: dict[str, list[dict]] = {}
    text = header(args.results, args.unifuse, args.note or [])
    for regime, title in REGIMES.items():
        if not any((folder / regime / "per_pair.csv").is_file() for folder in args.results):
            continue
        rows = tables[regime] = regime_rows(args.results, args.unifuse, regime)
        if args.folders:
            write_folder(args.results, regime, title, args.folders / regime)
        text += [f"## {title}", "", *regime_table(rows), ""]
        if regime in ALIGNED:
            text += [f"Target on aligned pairs: {args.fusion_method} against max and wavelet fusion of the "
                     "unmoved pair:", "",
                     *targets(rows, args.fusion_method, ("identity + max", "identity + wavelet"),
                              ("Q_abf", "Q_vif", "gain_min")), ""]
        if regime not in ALIGNED and any(row["method"] == "bsafusion" for row in rows):
            text += ["BSAFusion's alignment against the identity:", "",
                     *targets(rows, "bsafusion", ("identity + max",), ("ncc", "epe")), ""]
    report = "\n".join(text)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)
    if args.compact:
        print("\n".join(["", *compact_table(tables, args.compact)]))


if __name__ == "__main__":
    main()
