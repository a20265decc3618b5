"""`unifuse report RUNS_DIR`: the QC index of a cohort, the runs most suspicious first.

Lists every run below RUNS_DIR (a folder holding ``provenance.json``, as ``unifuse fuse`` and the
workbench write them), ranked by the largest per-slice suspicion in its ``quality.json``, and links
each run's ``report.html`` (written by ``unifuse fuse --report`` or the workbench's QC report
button; ``unifuse fuse`` skips a run that is done, so a run fused without ``--report`` gets its page
from ``unifuse fuse --report --overwrite``). Writes ``RUNS_DIR/index.html``. A folder below RUNS_DIR
that cannot be read (permission denied) is left out of the index, and named on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_unifuse.engine.report import INDEX_FILE, write_index
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
    try:
        path = write_index(args.runs_dir, on_unreadable=say_unreadable("report"))
    except OSError as error:
        raise InputError(f"cannot write {INDEX_FILE} there ({error.strerror or error})", args.runs_dir) from error
    print(f"QC index: {path}")
    return 0


def say_unreadable(command: str):
    """``write_index``'s ``on_unreadable`` for a command line: one line on stderr per folder."""

    def say(folder: Path, error: OSError) -> None:
        print(f"unifuse {command}: warning: {folder}: cannot be read ({error.strerror or error}); "
              "its runs are left out of the index", file=sys.stderr)

    return say
