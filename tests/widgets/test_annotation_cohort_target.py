"""Export cohort CSV to a path that cannot take it: one plain message saying what to choose, never
"failed unexpectedly … please report this", and a table that is not a cohort export left alone."""

from __future__ import annotations

import pytest

from napari_unifuse._qt.annotation_panel import AnnotationPanel
from napari_unifuse.engine.annotations import Annotation, AnnotationStore

from .conftest import add_pair

pytestmark = pytest.mark.gui


def export_to(make_napari_viewer, tmp_path, target) -> None:
    viewer = make_napari_viewer()
    add_pair(viewer)
    AnnotationStore(tmp_path / "runs" / "case1").add(Annotation("misalignment", "dr-a", slice_index=3))
    panel = AnnotationPanel(viewer)
    panel.set_run(tmp_path / "runs" / "case1", tmp_path / "runs", viewer.layers["T1"])
    panel.cohort_csv.value = str(target)
    panel.export.clicked()


def test_exporting_into_a_missing_folder_says_to_choose_an_existing_one(make_napari_viewer, tmp_path,
                                                                          notifications):
    export_to(make_napari_viewer, tmp_path, tmp_path / "missing" / "cohort.csv")
    assert [message for severity, message in notifications if severity == "error"] == [
        f"Export cohort: {tmp_path / 'missing'}: there is no such folder; choose an existing folder for the cohort CSV"]


def test_exporting_over_a_pairs_table_leaves_it_and_says_why(make_napari_viewer, tmp_path, notifications):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,moving\nmr.nii.gz,ct.nii.gz\n", encoding="utf-8")
    export_to(make_napari_viewer, tmp_path, pairs)
    assert pairs.read_text(encoding="utf-8") == "reference,moving\nmr.nii.gz,ct.nii.gz\n"
    errors = [message for severity, message in notifications if severity == "error"]
    assert errors == [f"Export cohort: {pairs}: is not a cohort export (its header names other columns), so it is "
                      "not replaced; choose another file name"]
