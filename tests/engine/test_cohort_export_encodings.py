"""The cohort export and file names or files in other encodings: a run folder whose name is not
UTF-8 (a Latin-1 name unpacked on Linux) is exported with its bytes escaped, and an export that
Excel re-saved as "CSV UTF-8" (a byte order mark first) is still an export that may be replaced."""

from __future__ import annotations

import csv
import os

from napari_unifuse.engine.annotations import Annotation, AnnotationStore, export_cohort


def test_a_run_folder_named_in_latin1_is_exported_with_its_byte_escaped(tmp_path):
    run = tmp_path / os.fsdecode(b"r\xe9n")
    AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=1))
    target = tmp_path / "cohort.csv"
    assert export_cohort([run], target).rows == 1
    with target.open(newline="", encoding="utf-8") as handle:
        [row] = csv.DictReader(handle)
    assert row["run"] == f"{tmp_path}/r\\xe9n"
    assert row["reviewer"] == "dr-a"


def test_a_utf8_run_folder_name_is_exported_as_it_is(tmp_path):
    run = tmp_path / "rün 1, a"
    AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=1))
    target = tmp_path / "cohort.csv"
    export_cohort([run], target)
    with target.open(newline="", encoding="utf-8") as handle:
        assert [row["run"] for row in csv.DictReader(handle)] == [str(run)]


def test_an_export_resaved_by_excel_as_csv_utf8_is_replaced(tmp_path):
    run = tmp_path / "case1"
    AnnotationStore(run).add(Annotation("misalignment", "dr-a", slice_index=1))
    target = tmp_path / "cohort.csv"
    export_cohort([run], target)
    target.write_bytes(b"\xef\xbb\xbf" + target.read_bytes())
    AnnotationStore(run).add(Annotation("other", "dr-b", slice_index=2))
    assert export_cohort([run], target).rows == 2
    assert not target.read_bytes().startswith(b"\xef\xbb\xbf")


def test_an_annotation_text_that_is_not_utf8_is_exported_escaped(tmp_path):
    """A reviewer taken from a Latin-1 $USER (os.environ keeps its byte as a lone surrogate)."""
    run = tmp_path / "case1"
    AnnotationStore(run).add(Annotation("misalignment", os.fsdecode(b"r\xe9v"), note="ok", slice_index=1))
    target = tmp_path / "cohort.csv"
    assert export_cohort([run], target).rows == 1
    with target.open(newline="", encoding="utf-8") as handle:
        [row] = csv.DictReader(handle)
    assert (row["reviewer"], row["note"]) == ("r\\udce9v", "ok")
