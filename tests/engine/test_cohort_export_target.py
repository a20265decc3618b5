"""Where the cohort CSV goes: a folder that does not exist, a folder given as the file, or a CSV
that is not a cohort export (a --pairs table typed by hand) is refused with a message, before any
run is read; an earlier cohort export is replaced."""

from __future__ import annotations

import csv

import pytest

from napari_unifuse.engine.annotations import Annotation, AnnotationStore, export_cohort
from napari_unifuse.errors import InputError


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "runs" / "case1"
    AnnotationStore(folder).add(Annotation("misalignment", "dr-a", slice_index=3))
    return folder


@pytest.mark.parametrize("file_for_a_folder", [False, True])
def test_a_cohort_csv_in_a_missing_folder_is_refused(tmp_path, run, file_for_a_folder):
    target = tmp_path / "missing" / "cohort.csv"
    if file_for_a_folder:
        target.parent.write_text("a file where the folder should be", encoding="utf-8")
    with pytest.raises(InputError, match="missing: there is no such folder; choose an existing folder"):
        export_cohort([run], target)
    assert target.parent.is_file() == file_for_a_folder and not target.exists()


def test_a_folder_as_the_cohort_csv_is_refused(tmp_path, run):
    target = tmp_path / "cohort.csv"
    target.mkdir()
    with pytest.raises(InputError, match="is a folder; choose a file name ending in .csv"):
        export_cohort([run], target)
    assert target.is_dir() and not any(target.iterdir())


def test_a_csv_that_is_no_cohort_export_is_not_replaced(tmp_path, run):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\nmr.nii.gz,ct.nii.gz\n", encoding="utf-8")
    with pytest.raises(InputError, match="not a cohort export .* not replaced; choose another file name"):
        export_cohort([run], pairs)
    assert pairs.read_text(encoding="utf-8") == "reference,moving\nmr.nii.gz,ct.nii.gz\n"


@pytest.mark.parametrize("earlier_header", [
    None,  # this version's own export
    "run,id,created,reviewer,category,note,slice_index,slice_axis,region_kind,region_world",  # the first version's
])
def test_an_earlier_cohort_export_is_replaced(tmp_path, run, earlier_header):
    target = tmp_path / "cohort.csv"
    if earlier_header is None:
        export_cohort([run], target)
    else:
        target.write_text(f"{earlier_header}\n{run},abc,2024-01-01,dr-b,other,,1,0,,[]\n", encoding="utf-8")
    AnnotationStore(run).add(Annotation("other", "dr-b", slice_index=4))
    assert export_cohort([run], target).rows == 2
    with target.open(newline="", encoding="utf-8") as handle:
        assert [row["slice_index"] for row in csv.DictReader(handle)] == ["3", "4"]


def test_an_empty_file_is_replaced(tmp_path, run):
    """Nothing to lose: e.g. made by a file dialog that creates the file it names."""
    target = tmp_path / "cohort.csv"
    target.touch()
    assert export_cohort([run], target).rows == 1
