"""The --pairs CSV as spreadsheets save it: rows of empty cells after the pairs and blank lines
before the header hold nothing, a header with spaces after its commas names its columns, a
semicolon- or tab-separated file (a European Excel's "CSV") and Excel's "sep=" first line are read,
and a file that is not UTF-8 is refused naming its line and how to save it."""

from __future__ import annotations

import pytest

from napari_unifuse.cli.arguments import read_pairs_rows
from napari_unifuse.errors import InputError

REQUIRED, OPTIONAL = ("reference", "moving"), ("label",)
PAIR = {"reference": "r.png", "moving": "m.png", "label": "l.png"}


def _rows(tmp_path, content: bytes):
    path = tmp_path / "pairs.csv"
    path.write_bytes(content)
    return read_pairs_rows(path, required=REQUIRED, optional=OPTIONAL)


@pytest.mark.parametrize("after", [b",,\r\n,,\r\n", b" , ,\n", b"\t\n"])
def test_rows_of_empty_cells_after_the_pairs_are_skipped(tmp_path, after):
    assert _rows(tmp_path, b"reference,moving,label\r\nr.png,m.png,l.png\r\n" + after) == [(2, PAIR)]


def test_only_rows_of_empty_cells_after_the_header_are_no_pairs(tmp_path):
    with pytest.raises(InputError, match="the CSV has no pairs, only its header line"):
        _rows(tmp_path, b"reference,moving,label\n,,\n,,\n")


def test_blank_lines_before_the_header_are_skipped_and_lines_keep_their_numbers(tmp_path):
    content = b"\n   \n,,\nreference,moving,label\nr.png,m.png,l.png\n\nr2.png,,\n"
    with pytest.raises(InputError, match="line 7 of the CSV: the moving cell is empty"):
        _rows(tmp_path, content)
    assert _rows(tmp_path, content.replace(b"r2.png,,", b"r2.png,m2.png,")) == [
        (5, PAIR), (7, {"reference": "r2.png", "moving": "m2.png", "label": ""})]


@pytest.mark.parametrize("header", [b"reference, moving, label", b'"reference "," moving",label'])
def test_a_header_with_spaces_around_its_names_names_its_columns(tmp_path, header):
    assert _rows(tmp_path, header + b"\nr.png, m.png ,l.png\n") == [(2, PAIR)]


@pytest.mark.parametrize("content", [
    b"reference;moving;label\r\nr.png;m.png;l.png\r\n",  # a European Excel's CSV
    b"sep=;\r\nreference;moving;label\r\nr.png;m.png;l.png\r\n",
    b"reference\tmoving\tlabel\nr.png\tm.png\tl.png\n",
])
def test_a_semicolon_or_tab_separated_csv_is_read(tmp_path, content):
    lines = 3 if content.startswith(b"sep=") else 2
    assert _rows(tmp_path, content) == [(lines, PAIR)]


def test_a_semicolon_separated_csv_keeps_commas_in_its_cells(tmp_path):
    assert _rows(tmp_path, b"reference;moving\nscan 1, left.png;m.png\n") == [
        (2, {"reference": "scan 1, left.png", "moving": "m.png", "label": ""})]


def test_excels_sep_line_naming_commas_is_skipped(tmp_path):
    assert _rows(tmp_path, b"sep=,\nreference,moving,label\nr.png,m.png,l.png\n") == [(3, PAIR)]


def test_a_semicolon_separated_row_keeps_the_checks_of_its_cells(tmp_path):
    with pytest.raises(InputError, match="line 3 of the CSV: the cell 'x.png' is under no column of the header"):
        _rows(tmp_path, b"reference;moving\nr.png;m.png\nr.png;m.png;x.png\n")


@pytest.mark.parametrize(("content", "line"), [
    ("reference,moving,label\nr.png,m.png,l.png\nréf.png,m2.png,\n".encode("latin-1"), 3),  # Latin-1 / cp1252
    ("reference,moving,label\r\nr.png,m.png,l.png\r\n".encode("utf-16"), 1),  # Excel's "Unicode text"
])
def test_a_csv_that_is_not_utf8_is_refused_naming_its_line_and_how_to_save_it(tmp_path, content, line):
    with pytest.raises(InputError, match=rf"pairs.csv: line {line} of the CSV is not UTF-8 text \(byte 0x[0-9a-f]{{2}}\); "
                                         r'save it as UTF-8 \("CSV UTF-8" in Excel\)$'):
        _rows(tmp_path, content)


def test_a_comma_separated_header_keeps_its_unknown_column_message(tmp_path):
    with pytest.raises(InputError, match=r"unknown column 'lable' \(did you mean 'label'\?\)"):
        _rows(tmp_path, b"reference,moving,lable\nr.png,m.png,l.png\n")
