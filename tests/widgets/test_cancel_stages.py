"""Cancel counts at every stage of a run until its layers are drawn, and the status keeps saying so."""

from __future__ import annotations

import threading

import pytest

import napari_unifuse._qt.analysis as analysis_module
import napari_unifuse._qt.workbench as workbench_module

from .conftest import add_pair
from .test_workbench import RUN_TIMEOUT_MS, make_workbench

pytestmark = pytest.mark.gui
HOLD_TIMEOUT_S = 60
CANCELLED = "Run UniFuse was cancelled; no layers were added and nothing was written."


@pytest.fixture
def metrics_calls(monkeypatch):
    """The outcomes the workbench computed volume metrics for."""
    calls = []
    real_volume_metrics = workbench_module.volume_metrics

    def recorded(outcome):
        calls.append(outcome)
        return real_volume_metrics(outcome)

    monkeypatch.setattr(workbench_module, "volume_metrics", recorded)
    return calls


def hold(monkeypatch, module, name: str) -> tuple[threading.Event, threading.Event]:
    """(started, release): ``module.name`` signals ``started`` on the worker, then waits for ``release``."""
    started, release = threading.Event(), threading.Event()
    real = getattr(module, name)

    def held(*args, **kwargs):
        started.set()
        release.wait(timeout=HOLD_TIMEOUT_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return started, release


def assert_cancelled_without_layers(qtbot, viewer, workbench, before, notifications, metrics_calls) -> None:
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == before
    assert workbench.outcome is None and metrics_calls == []
    assert notifications == [("info", CANCELLED)]
    assert workbench.run_panel.status.value == "stopped"
    assert workbench.run_panel.run_button.enabled and not workbench.run_panel.cancel_button.enabled


# The first and the last step of the analysis: the maps between them are as long on a clinical volume.
@pytest.mark.parametrize("step", ["display_grey", "field_jacobian"])
def test_cancel_during_the_analysis_adds_no_layers_and_computes_no_metrics(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch, metrics_calls, step):
    started, release = hold(monkeypatch, analysis_module, step)
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(8, 32, 32))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    before = [layer.name for layer in viewer.layers]
    workbench.run_panel.run_button.clicked()
    qtbot.waitUntil(started.is_set, timeout=RUN_TIMEOUT_MS)
    try:
        qtbot.waitUntil(lambda: workbench.run_panel.status.value == "analyse", timeout=5_000)
        workbench.run_panel.cancel_button.clicked()
    finally:
        release.set()
    assert_cancelled_without_layers(qtbot, viewer, workbench, before, notifications, metrics_calls)


def test_cancel_after_the_analysis_but_before_the_layers_are_drawn_draws_nothing(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch, metrics_calls):
    """The outcome is yielded and the worker has gone on to the metrics, but the GUI thread has not
    drawn it yet when Cancel is pressed: the click still counts."""
    metrics_started, release_metrics = hold(monkeypatch, workbench_module, "volume_metrics")
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(8, 32, 32))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    before = [layer.name for layer in viewer.layers]
    workbench.run_panel.run_button.clicked()
    try:
        # Waiting without processing Qt events: the yielded outcome stays queued for the GUI thread.
        assert metrics_started.wait(timeout=RUN_TIMEOUT_MS / 1000)
        assert workbench.outcome is None
        workbench.run_panel.cancel_button.clicked()
    finally:
        release_metrics.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == before
    assert workbench.outcome is None
    assert notifications == [("info", CANCELLED)]
    assert workbench.run_panel.status.value == "stopped"


def test_progress_after_cancel_keeps_saying_the_run_is_cancelling(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications, monkeypatch):
    """A fuse tile under way when Cancel is pressed still reports when it ends (tens of seconds
    later on a large volume): the status must not read as if the run went on."""
    tile_started, finish_tile, next_tile = threading.Event(), threading.Event(), threading.Event()

    def one_tile_then_the_cancel(request, engine, progress, cancel):
        # As engine.tiling does: report after each tile, look at the token before the next one.
        progress("fuse", 0, 2)
        tile_started.set()
        finish_tile.wait(timeout=HOLD_TIMEOUT_S)
        progress("fuse", 1, 2)
        next_tile.wait(timeout=HOLD_TIMEOUT_S)  # the test reads the status the finished tile left
        cancel.raise_if_cancelled()
        raise AssertionError("the run was not cancelled")

    monkeypatch.setattr(workbench_module, "run_and_analyse", one_tile_then_the_cancel)
    viewer = make_napari_viewer()
    add_pair(viewer, shape=(8, 32, 32))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[3])
    status = workbench.run_panel.status
    workbench.run_panel.run_button.clicked()
    try:
        qtbot.waitUntil(lambda: tile_started.is_set() and status.value == "fuse tile 0/2", timeout=RUN_TIMEOUT_MS)
        workbench.run_panel.cancel_button.clicked()
        assert status.value.startswith("cancelling")
        finish_tile.set()
        qtbot.waitUntil(lambda: workbench.run_panel.progress.value == 1, timeout=RUN_TIMEOUT_MS)
        assert status.value == "cancelling: waiting for the current fuse tile to finish…"
    finally:
        finish_tile.set()
        next_tile.set()
    qtbot.waitUntil(lambda: workbench.worker is None, timeout=RUN_TIMEOUT_MS)
    assert notifications == [("info", CANCELLED)]
    assert status.value == "stopped"
