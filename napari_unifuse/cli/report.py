"""`unifuse report RUNS_DIR`: the QC index of a cohort, the runs most suspicious first.

Lists every run below RUNS_DIR (a folder holding ``provenance.json``, as ``unifuse fuse`` and the
workbench write them), ranked by the largest per-slice suspicion in its ``quality.json``, and links
each run's ``report.html`` (written by ``unifuse fuse --report`` or the workbench's QC report
button; ``unifuse fuse`` skips a run that is done, so a run fused without ``--report`` gets its page
from ``unifuse fuse --report --overwrite``). Writes ``RUNS_DIR/index.html``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unifuse.engine.report import write_index
from napari_unifuse.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write the QC index of a folder of runs, most suspicious first",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="folder of run folders (unifuse fuse --out)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.runs_dir.is_dir():
        raise InputError("not a folder", args.runs_dir)
    path = write_index(args.runs_dir)
    print(f"QC index: {path}")
    return 0
