"""`unifuse report RUNS_DIR`: the QC index of a cohort, the runs most suspicious first.

Lists every run below RUNS_DIR (a folder holding ``provenance.json``, as ``unifuse fuse`` and the
workbench write them), ranked by the largest per-slice suspicion in its ``quality.json``, and links
each run's ``report.html`` (written by ``unifuse fuse --report`` or the workbench's QC report
button; ``unifuse fuse`` skips a run that is done, so a run fused without ``--report`` gets its page
from ``unifuse fuse --report --overwrite``). Writes ``RUNS_DIR/index.html``. A folder below RUNS_DIR
that cannot be read (permission denied) is left out of the index, and named on stderr.

An ``index.html`` already there is refreshed when it is a QC index unifuse wrote (``unifuse report``
or ``unifuse fuse --report``, known by how the page begins); any other file of that name is refused
unless ``--overwrite``, never silently replaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_unifuse.cli.arguments import user_path
from napari_unifuse.engine.report import INDEX_FILE, write_index
from napari_unifuse.errors import InputError

# How every QC index that engine.report.write_index writes begins (unifuse report, unifuse fuse
# --report, this version and earlier ones), and its heading: together no page of another origin
# has them. A test writes an index and checks it is recognised, so a change of the page is noticed.
INDEX_PAGE_START = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>UniFuse QC: '
INDEX_PAGE_HEADING = "<h1>UniFuse QC: "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write the QC index of a folder of runs, most suspicious first",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=user_path, metavar="RUNS_DIR", help="folder of run folders (unifuse fuse --out)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace a RUNS_DIR/{INDEX_FILE} that is not a QC index unifuse wrote (refused "
                             "otherwise; an index unifuse wrote is always refreshed)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.runs_dir.exists():  # a typo, most often: "not a folder" would hide that
        raise InputError("does not exist", args.runs_dir)
    if not args.runs_dir.is_dir():
        raise InputError("not a folder", args.runs_dir)
    index = args.runs_dir / INDEX_FILE
    if not args.overwrite and index.is_file() and not is_qc_index(index):
        raise InputError(f"is not a QC index unifuse wrote, and {INDEX_FILE} is where the index goes; pass "
                         "--overwrite to replace it, or move it away", index)
    try:
        path = write_index(args.runs_dir, on_unreadable=say_unreadable("report"))
    except OSError as error:
        raise InputError(f"cannot write {INDEX_FILE} there ({error.strerror or error})", args.runs_dir) from error
    print(f"QC index: {path}")
    return 0


def is_qc_index(path: Path) -> bool:
    """Whether ``path`` is a QC index page that ``engine.report.write_index`` wrote (judged by how it
    begins, ``INDEX_PAGE_START``, and its heading), which a new index may replace; an unreadable
    file is not."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            beginning = handle.read(len(INDEX_PAGE_START) + 4096)  # the title, then the heading after the style
    except OSError:
        return False
    return beginning.startswith(INDEX_PAGE_START) and INDEX_PAGE_HEADING in beginning


def say_unreadable(command: str):
    """``write_index``'s ``on_unreadable`` for a command line: one line on stderr per folder."""

    def say(folder: Path, error: OSError) -> None:
        print(f"unifuse {command}: warning: {folder}: cannot be read ({error.strerror or error}); "
              "its runs are left out of the index", file=sys.stderr)

    return say
