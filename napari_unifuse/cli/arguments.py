"""Argument types shared by the sub-commands: a bad value is argparse's one-line usage error (exit 2),
not a traceback from deep inside, nor a silent default; and the reading of the ``--pairs`` CSV that
synth, fuse and evaluate share, with one check of its header."""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import os
from collections.abc import Sequence
from pathlib import Path

from napari_unifuse.engine.device import DEVICE_CHOICES
from napari_unifuse.errors import InputError


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Every command's --device, with the same words for what auto picks."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto (default): CUDA when a GPU is available, else the CPU")


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a size, a count)."""
    return _whole_number(text, minimum=1)


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (a random seed, a number of optional passes)."""
    return _whole_number(text, minimum=0)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def user_path(text: str) -> Path:
    """A path option's value with a leading ``~`` or ``~user`` expanded, as the shell expands it but
    after ``=`` (``--out=~/runs``) or in quotes: the home folder, as a ``--pairs`` CSV's ``~/...``
    cell and nibabel take it, not a folder named ``~`` in the working folder."""
    return Path(os.path.expanduser(text))


ONE_PAIR_OR_MANY = "give --reference and --moving for one pair, or --pairs CSV for many"


def check_one_pair_or_many(args: argparse.Namespace, single_pair_options: Sequence[str]) -> None:
    """synth's and fuse's inputs: ``--reference`` and ``--moving`` (and the command's other
    ``single_pair_options``), or ``--pairs``, never both: a CSV beside them would be read without a
    word about them. No source on these errors: the message names the options, main() the command."""
    given = [f"--{option}" for option in single_pair_options if getattr(args, option) is not None]
    if args.pairs is not None and given:
        raise InputError(f"--pairs cannot be combined with {', '.join(given)}; {ONE_PAIR_OR_MANY}")
    if args.pairs is None and (args.reference is None or args.moving is None):
        raise InputError(ONE_PAIR_OR_MANY)

# ---- the --pairs CSV of synth, fuse and evaluate --------------------------------------------------
CsvRow = dict[str, str]  # column -> cell, stripped; "" for an optional cell the row does not reach
# The columns that name files in any command's CSV: their cells get a leading "~" expanded, as the
# path options do (user_path), before a command joins a relative one to the CSV's folder.
FILE_COLUMNS = frozenset({"reference", "moving", "label", "displacement"})
# Excel writes "sep=;" as a CSV's first line to name its separator, and reads it so.
EXCEL_SEPARATOR_LINE = "sep="


def read_pairs_rows(path: Path, required: Sequence[str], optional: Sequence[str]) -> list[tuple[int, CsvRow]]:
    """The rows of a ``--pairs`` CSV with the line each ends on, every column checked against
    ``required`` and ``optional``, and every row's ``required`` cells, before any row is used (an
    ``optional`` cell the row or the header lacks is ""). Every cell and column name is stripped
    (``a.png, b.png`` from a hand-written CSV), and a cell of ``FILE_COLUMNS`` has its ``~``
    expanded. A column no command reads (``lable``, ``degradaton``) is refused, naming it and the
    closest accepted one: left unread it would give clean pairs or no metrics without a word, as an
    unknown key in a YAML config would. So are a column named twice (csv.DictReader would keep only
    its last cell) and a cell under no column; a blank column or trailing cell with nothing in it (a
    spreadsheet's trailing comma), and a row with nothing in its cells (blank lines, a spreadsheet's
    ``,,`` rows, before the header or after it) are harmless and dropped. As spreadsheets save a
    CSV: UTF-8 with or without a byte order mark ("CSV UTF-8"), other text refused naming its line;
    separated by commas, or by semicolons or tabs where the header is (a European Excel's CSV); an
    Excel ``sep=`` first line names the separator."""
    if path.is_dir():
        raise InputError("is a folder, not a CSV file; --pairs takes a CSV file of pairs", path)
    if not path.exists():
        raise InputError("pairs CSV not found", path)
    try:
        records = _split_rows(_utf8_text(path.read_bytes(), path))
    except (OSError, csv.Error) as error:
        raise InputError(f"cannot read the pairs CSV: {error}", path) from error
    columns = [column.strip() for column in records[0][1]] if records else []
    numbered = records[1:]
    named_positions = [position for position, column in enumerate(columns) if column]
    check_pairs_columns([columns[position] for position in named_positions], path, required, optional)
    for line, cells in numbered:
        unnamed = [cell for position, cell in enumerate(cells)
                   if (position >= len(columns) or not columns[position]) and cell.strip()]
        if unnamed:
            raise InputError(f"line {line} of the CSV: the cell {unnamed[0]!r} is under no column of the header; "
                             "name its column or remove it", path)
    if not numbered:
        raise InputError("the CSV has no pairs, only its header line", path)
    for line, cells in numbered:
        for column in required:
            position = columns.index(column)
            if position >= len(cells):
                raise InputError(f"line {line} of the CSV: no {column} cell (the row has fewer cells than the "
                                 "header)", path)
            if not cells[position].strip():
                raise InputError(f"line {line} of the CSV: the {column} cell is empty", path)
    # Every optional column is in every row, "" where the header or the row lacks it.
    return [(line, {**dict.fromkeys(optional, ""), **{columns[position]: _cell(columns[position], cells, position)
                                                      for position in named_positions}})
            for line, cells in numbered]


def _utf8_text(data: bytes, path: Path) -> str:
    """``data`` as UTF-8 text, a byte order mark dropped; InputError naming the first line that is
    not (a Latin-1, cp1252 or UTF-16 file), which the user can only fix by saving it again."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"line {line} of the CSV is not UTF-8 text (byte 0x{data[error.start]:02x}); save it as "
                         'UTF-8 ("CSV UTF-8" in Excel)', path) from None


def _split_rows(text: str) -> list[tuple[int, list[str]]]:
    """The rows of a CSV's ``text`` (``_nonblank_rows``), split at commas; at what an Excel ``sep=`` first
    line names, that line dropped; or at semicolons or tabs where the header, split at commas, is
    one name holding them (a European Excel's CSV: no column name holds either)."""
    rows = _nonblank_rows(text, ",")
    header = rows[0][1] if rows else []
    named = _separator_named_by(header)
    if named is not None:
        return _nonblank_rows(text, named)[1:]
    if len(header) == 1:
        separator = next((character for character in ";\t" if character in header[0]), None)
        if separator:
            return _nonblank_rows(text, separator)
    return rows


def _nonblank_rows(text: str, separator: str) -> list[tuple[int, list[str]]]:
    """The rows of ``text`` split at ``separator``, each with the line it ends on, those with
    nothing in their cells left out."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    return [(reader.line_num, cells) for cells in reader if any(cell.strip() for cell in cells)]


def _separator_named_by(cells: list[str]) -> str | None:
    """The separator an Excel ``sep=;`` first line names (its cells as split at commas), else None."""
    line = ",".join(cells)
    named = line.removeprefix(EXCEL_SEPARATOR_LINE)
    return named if named != line and len(named) == 1 else None


def _cell(column: str, cells: list[str], position: int) -> str:
    """The cell at ``position`` of a row, stripped ("" past its end), a file column's ``~`` expanded."""
    cell = cells[position].strip() if position < len(cells) else ""
    return os.path.expanduser(cell) if column in FILE_COLUMNS else cell


def check_pairs_columns(columns: Sequence[str], path: Path, required: Sequence[str],
                        optional: Sequence[str]) -> None:
    """Raise a one-line InputError naming ``path`` where ``columns`` (a CSV header) has a column
    that is neither ``required`` nor ``optional`` (with the closest of those, when one is close),
    one named twice, or lacks a ``required`` one."""
    accepted = (*required, *optional)
    takes = f"the columns are {', '.join(required)}" + (f" and optionally {', '.join(optional)}" if optional else "")
    unknown = [column for column in dict.fromkeys(columns) if column not in accepted]
    if unknown:
        described = []
        for column in unknown:
            # Lower-cased: "Reference" is as likely a slip as "refrence".
            close = difflib.get_close_matches(column.strip().lower(), accepted, n=1)
            described.append(f"{column!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InputError(f"unknown column{'s' if len(unknown) > 1 else ''} {', '.join(described)}; {takes}", path)
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise InputError(f"the header names the column{'s' if len(repeated) > 1 else ''} {', '.join(repeated)} "
                         "more than once; keep one of each", path)
    missing = [column for column in required if column not in columns]
    if missing:
        raise InputError(f"the CSV needs a header with the columns {', '.join(required)}; missing "
                         f"{', '.join(missing)} ({takes})", path)
