"""Two workbenches (two reviewers, or two napari windows) on one pair share its run folder: what one
saves or flags there must not be overwritten, misdescribed or hidden by the other."""

from __future__ import annotations

import json
import threading

import pytest

import napari_unifuse._qt.workbench as workbench_module
from napari_unifuse._qt.run_panel import NO_LABEL, WorkerHandover
from napari_unifuse._qt.workbench import UniFuseWorkbench
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE
from napari_unifuse.engine.outputs import METRICS_FILE, PROVENANCE_FILE, REPORT_FILE
from napari_unifuse.io import Geometry

from .conftest import add_pair
from .test_workbench import RUN_TIMEOUT_MS, make_workbench, run_and_wait

pytestmark = pytest.mark.gui


def workbench_on(viewer, tmp_path, checkpoint, names=("T1", "T2"), ground_truth=NO_LABEL) -> UniFuseWorkbench:
    """A workbench on a 48 × 48 pair (the same pixels whatever ``names``), runs folder tmp_path/runs."""
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=names)
    workbench = make_workbench(viewer, tmp_path, checkpoint)
    workbench.run_panel.ground_truth.value = ground_truth
    return workbench


def held_on_call(number: int, real):
    """``real``, except that its ``number``-th call waits for the returned event first."""
    release, calls = threading.Event(), []

    def held(*args):
        calls.append(True)
        if len(calls) == number:
            release.wait(timeout=60)
        return real(*args)

    return held, release


def test_metrics_of_a_save_overtaken_by_another_runs_save_leave_that_runs_metrics_json(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch):
    """A saves before its volume metrics; B (the same pair, with a ground truth) saves into the same
    folder; A's metrics then arrive and must not replace B's metrics.json (its label metrics)."""
    held, release = held_on_call(1, workbench_module.volume_metrics)
    monkeypatch.setattr(workbench_module, "volume_metrics", held)
    first = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2])
    second = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2], ground_truth="T2 ground truth")
    first.run_panel.run_button.clicked()
    qtbot.waitUntil(lambda: first.outcome is not None, timeout=RUN_TIMEOUT_MS)
    folder = first.selection.folder
    first.save_outputs()  # metrics.json promised
    run_and_wait(qtbot, second)
    assert second.selection.folder == folder
    second.save_outputs()
    saved_by_second = (folder / METRICS_FILE).read_text(encoding="utf-8")
    assert "ncc" in json.loads(saved_by_second)

    release.set()
    qtbot.waitUntil(lambda: first.worker is None, timeout=RUN_TIMEOUT_MS)
    assert (folder / METRICS_FILE).read_text(encoding="utf-8") == saved_by_second
    assert not any(message.startswith("Saved the volume metrics") for _, message in notifications)
    errors = [message for level, message in notifications if level == "error"]
    assert any("another run's outputs, saved there since" in message and "Save outputs" in message
               for message in errors), errors
    assert first.outcome.volume_metrics is not None  # the Metrics tab still has them, and a new Save writes them
    first.save_outputs()
    assert json.loads((folder / METRICS_FILE).read_text(encoding="utf-8")).keys() == \
        workbench_module.metrics_file_contents(first.outcome.volume_metrics).keys()


def test_a_qc_report_is_refused_beside_another_runs_later_save(make_napari_viewer, qtbot, tmp_path,
                                                               checkpoint_files, notifications):
    """A saved, then B saved the same pair (with a ground truth) into the folder: A's page would sit
    beside B's provenance and metrics, so A is told to save again first; and so is A's report worker,
    should B's Save come between the button and the page."""
    first = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2])
    second = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2], ground_truth="T2 ground truth")
    run_and_wait(qtbot, first)
    run_and_wait(qtbot, second)
    folder = first.selection.folder
    assert second.selection.folder == folder
    first.save_outputs()
    second.save_outputs()

    first.write_qc_report()
    assert first.report_worker is None and not (folder / REPORT_FILE).exists()
    assert any("outputs saved from another run" in message for level, message in notifications if level == "error")
    failed = UniFuseWorkbench._build_report(WorkerHandover(
        (first.outcome.result, first.outcome.volume_metrics, first.selection, [])))
    assert "outputs saved from another run" in str(failed.error) and not (folder / REPORT_FILE).exists()

    first.save_outputs()  # its own outputs back: its page may go beside them
    write_report = UniFuseWorkbench._build_report(WorkerHandover(
        (first.outcome.result, first.outcome.volume_metrics, first.selection, [])))
    assert write_report == folder / REPORT_FILE
    assert json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))["created"] == \
        first.outcome.result.provenance["created"]


def test_a_run_joins_the_folder_another_workbench_made_for_the_same_inputs_while_it_ran(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, monkeypatch):
    """B started its run (its folder chosen by its layer names) before A, on the same pixels under other
    names, flagged and so made its folder: B's flags must go to A's folder, not to a second one."""
    held, release = held_on_call(2, UniFuseWorkbench._fuse_and_analyse)
    monkeypatch.setattr(UniFuseWorkbench, "_fuse_and_analyse", staticmethod(held))
    first = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2])
    second = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2], names=("sub01_t1", "sub01_t2"))
    run_and_wait(qtbot, first)
    second.run_panel.run_button.clicked()
    first.annotation_panel.reviewer.value = "alice"
    first.annotation_panel.add_slice_flag()
    release.set()
    qtbot.waitUntil(lambda: second.worker is None, timeout=RUN_TIMEOUT_MS)
    assert second.selection.folder == first.selection.folder
    assert second.annotation_panel.store.run_dir == first.selection.folder
    assert [flag.reviewer for flag in second.annotation_panel.annotations] == ["alice"]
    assert [path.name for path in (tmp_path / "runs").iterdir()] == [first.selection.folder.name]


def test_flags_in_another_folder_of_the_same_run_are_pointed_at(make_napari_viewer, qtbot, tmp_path,
                                                                checkpoint_files, notifications):
    """Two reviewers ran the same pixels under other layer names and both flagged before either
    folder existed: two folders. Reopening the pair lists one folder's flags and names the other's."""
    first = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2])
    second = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2], names=("sub01_t1", "sub01_t2"))
    run_and_wait(qtbot, first)
    run_and_wait(qtbot, second)
    for workbench, reviewer in ((first, "alice"), (second, "bob")):
        workbench.annotation_panel.reviewer.value = reviewer
        workbench.annotation_panel.add_slice_flag()
    folders = {first.selection.folder, second.selection.folder}
    assert len(folders) == 2

    reopened = workbench_on(make_napari_viewer(), tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, reopened)
    (other,) = folders - {reopened.selection.folder}
    warnings = [message for level, message in notifications if level == "warning"]
    assert any(str(other / ANNOTATIONS_FILE) in message and str(reopened.selection.folder) in message
               for message in warnings), warnings
