"""The UniFuse workbench: run the model on two layers, review the result, flag failures, save.

Layout: the run form on top; below it tabs for review controls, metrics and annotations; the
per-slice plot (degradation probabilities and quality-map scores) docks beside the viewer once
there is something to plot. The model runs in a napari ``thread_worker`` (the viewer stays
responsive); progress arrives through a Qt signal, which Qt delivers on the GUI thread, and shows
in the dock's bar and in napari's activity panel; Cancel sets the engine's CancelToken, honoured
before the next tile or analysis step, and counts until the layers are drawn: a run cancelled
before then draws none and computes no volume metrics. The worker yields the outcome as soon as
the layers can be drawn and only then computes the whole-volume metrics (12 s of the 60 of a
176 × 216 × 180 pair on two cores), which fill the *Metrics* tab when they arrive; metrics that
fail (out of memory, say) leave the layers, Save and the QC report (which says why they are
missing) usable. Closing the workbench, or the viewer's window, releases every viewer event, the
timer and the plot dock it holds and cancels a run whose layers are not drawn yet, so that closing
and reopening it leaves nothing behind; a run that ends after that draws nothing, but still
writes the metrics.json a Save made before its metrics promised.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui import widgets
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtGui import QMovie
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFrame,
    QLabel,
    QMainWindow,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_unifuse._qt.analysis import (
    METRIC_KEYS_IN_FILE,
    RunOutcome,
    RunRequest,
    build_engine,
    engine_key,
    run_and_analyse,
    slice_metrics,
    volume_metrics,
)
from napari_unifuse._qt.annotation_panel import AnnotationPanel
from napari_unifuse._qt.method_compare import MethodComparePanel
from napari_unifuse._qt.metrics_panel import MetricsPanel
from napari_unifuse._qt.notifications import WorkerFailed, report_error, reports_errors, show_warnings
from napari_unifuse._qt.outputs import ResultLayers, show_data_position, viewed_slice
from napari_unifuse._qt.plots import ProbabilityPlot
from napari_unifuse._qt.qc_panel import QCPanel
from napari_unifuse._qt.run_panel import ProgressRelay, RunPanel, RunSelection, WorkerHandover
from napari_unifuse.engine.annotations import ANNOTATIONS_FILE, INPUTS_SUBJECT, AnnotationStore
from napari_unifuse.engine.device import is_out_of_memory
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.input_checks import model_dimensions
from napari_unifuse.engine.outputs import (
    METRICS_FILE,
    PROVENANCE_FILE,
    REVIEW_MAP_NAMES,
    output_folder_lock,
    review_map_extension,
    write_files_together,
    write_fusion_outputs,
    write_json,
)
from napari_unifuse.engine.overlays import joined_run_folder, other_folders_of_run
from napari_unifuse.engine.progress import CancelToken, ProgressCallback
from napari_unifuse.engine.quality import QualityMaps
from napari_unifuse.engine.report import outside_moving_text, whole_volume_text, write_report
from napari_unifuse.engine.result import FusionResult
from napari_unifuse.errors import Cancelled, InputError, UniFuseError
from napari_unifuse.io import ImageVolume, placement_metadata
from napari_unifuse.io.image import single_slice_axis_of
from napari_unifuse.json_records import standard_json

if TYPE_CHECKING:
    import napari.viewer

PLOT_DOCK_NAME = "UniFuse degradation per slice"
# The docks share the window with the canvas, which keeps at least half of it (1280 px and up).
# napari's layer controls need 320 px on the left, so at 1280 px the workbench gets 22 % (282 px).
DOCK_WIDTH_FRACTION, DOCK_MIN_WIDTH, DOCK_MAX_WIDTH = 0.22, 260, 440
COMBO_MIN_CHARACTERS = 6
FILE_BUTTON_TEXTS = ("Select file", "Choose directory", "Select files", "Save file")
PLOT_HEIGHT_FRACTION = 0.45
# napari's "in progress" indicator, shown while the run's activity entry is open, is a GIF at 33
# frames a second, and each frame repaints the main window around the OpenGL canvas. On a
# software-rendered display (Mesa under Xvfb, two cores) that cost the GUI thread 7 CPU-seconds and
# the click-to-layers time 59 s instead of 48 s on the bundled 3-D sample; a run slows it to 3
# frames a second, still moving, and gives it its speed back when it ends.
ACTIVITY_SPINNER_SPEED_PERCENT = 10
# The run's status once it is over: its layers drawn, with or without its volume metrics.
RUN_DONE, RUN_DONE_WITHOUT_METRICS = "done", "results shown; the volume metrics failed"
# Said by Save and the QC report button while the report's worker holds the run folder.
REPORT_BEING_WRITTEN = "the QC report is being written into the run folder; wait for it"


def _narrow(content: QWidget) -> None:
    """Let the form fit a 280-pixel dock: combo boxes elide long layer names, file pickers show
    "…" instead of "Select file", and nested forms drop their margins."""
    for combo in content.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(COMBO_MIN_CHARACTERS)
    for button in content.findChildren(QPushButton):
        if button.text() in FILE_BUTTON_TEXTS:
            button.setToolTip(button.text())
            button.setText("…")
    for child in content.findChildren(QWidget):
        layout = child.layout()
        if layout is not None and child is not content:
            layout.setContentsMargins(0, 0, 0, 0)


def _dock_of(widget: QWidget) -> QDockWidget | None:
    """The dock widget holding ``widget``, if it is docked."""
    parent = widget.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def metrics_file_contents(metrics: Mapping[str, float]) -> dict[str, float]:
    """The volume metrics as metrics.json holds them: under the names scripts join them by, those
    of ``unifuse evaluate``'s columns ("gain_min", not the Metrics tab's "gain min") and of
    ``unifuse fuse --label``'s metrics.json ("ncc", not "NCC to label")."""
    return {METRIC_KEYS_IN_FILE.get(name, name): value for name, value in metrics.items()}


def _holds_saved_run(folder: Path, provenance: Mapping) -> bool:
    """Whether ``folder``'s provenance.json is the one a Save of the run of ``provenance`` wrote, not
    that of another run saved there since (a run of the pair with another ground truth or device,
    from another workbench or process, shares the folder)."""
    try:
        saved = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved == json.loads(standard_json(provenance))


def _refuse_beside_another_run(folder: Path, provenance: Mapping) -> None:
    """Refuse a QC report of the run of ``provenance`` beside another run's saved outputs: its page
    would describe other files than those beside it (their metrics, error map and provenance)."""
    if (folder / PROVENANCE_FILE).exists() and not _holds_saved_run(folder, provenance):
        raise InputError("the run folder holds outputs saved from another run of this pair; press "
                         "'Save outputs' first so that the report sits beside this run's files", folder)


@dataclass(frozen=True)
class VolumeMetrics:
    """What a run's worker returns once its layers are drawn: its whole-volume metrics (None when
    they could not be computed) and, if anything failed after the layers, what."""

    metrics: dict[str, float] | None
    failure: WorkerFailed | None = None


class MetricsPromise:
    """The metrics.json a Save made before its run's volume metrics came promises. The Save hands
    over its folder and the provenance it wrote there (:meth:`keep_in`, GUI thread), the run's
    worker the metrics as soon as they are computed (:meth:`fulfil`); whichever comes second writes
    the file, only while the folder still holds that Save's run: another run saved there since keeps
    its own metrics.json. No widget takes part: closing the viewer stops the worker before its
    metrics reach the workbench, and the file is still owed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saved: tuple[Path, Mapping] | None = None
        self._metrics: dict[str, float] | None = None
        self.written: Path | None = None

    def keep_in(self, folder: Path, provenance: Mapping) -> None:
        with self._lock:
            self._saved, metrics = (folder, provenance), self._metrics
        if metrics is not None:
            self._write(folder, provenance, metrics)

    def fulfil(self, metrics: dict[str, float]) -> None:
        with self._lock:
            self._metrics, saved = metrics, self._saved
        if saved is not None:
            self._write(*saved, metrics)

    def _write(self, folder: Path, provenance: Mapping, metrics: dict[str, float]) -> None:
        contents = metrics_file_contents(metrics)
        with output_folder_lock(folder) as lock:
            if not _holds_saved_run(folder, provenance):
                raise InputError(f"the run folder now holds another run's outputs, saved there since this run's "
                                 f"Save, and their {METRICS_FILE} is kept; press 'Save outputs' again to save this "
                                 "run there with its volume metrics", folder)
            written = write_files_together(folder, {METRICS_FILE: lambda path: write_json(contents, path)}, lock=lock)
        self.written = written[METRICS_FILE]


class UniFuseWorkbench(QWidget):
    """The dock napari opens for *Plugins → UniFuse workbench* (and ``unifuse view``).

    ``napari_viewer`` is the viewer whose layers it reads and adds to; the plot it docks beside
    the viewer and every viewer event it follows are released when the workbench is closed or
    removed from the window (:meth:`release_viewer`).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        # napari docks a plugin's widget with a PublicOnlyProxy of the viewer, which hands out a new
        # proxy of a layer at each lookup: the weak references the panels keep to layers would die at once.
        napari_viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.viewer = napari_viewer
        self.run_panel = RunPanel(napari_viewer)
        self.results = ResultLayers(napari_viewer)
        self.qc_panel = QCPanel(self.results)
        self.metrics_panel = MetricsPanel()
        self.annotation_panel = AnnotationPanel(napari_viewer)
        self.plot = ProbabilityPlot(napari_viewer)
        self.save_button = widgets.PushButton(text="Save outputs", enabled=False,
                                              tooltip="Write fused / aligned / field / maps + provenance.json "
                                                      "into the run folder")
        self.report_button = widgets.PushButton(text="QC report", enabled=False,
                                                tooltip="Write the run's one-page QC report (key slices, maps, "
                                                        "metrics, annotations, provenance) into the run folder")
        self.tabs = QTabWidget()
        self.tabs.addTab(self.qc_panel.native, "Review")
        self.tabs.addTab(self.metrics_panel, "Metrics")
        self.tabs.addTab(self.annotation_panel.native, "Annotate")
        self.method_compare = MethodComparePanel(napari_viewer, self.run_panel, self.results, self.annotation_panel)
        self.method_compare.on_flags_shown = self._say_whether_the_report_lists_the_flags
        self.tabs.addTab(self.method_compare.native, "Methods")
        content = QWidget()
        content_layout = QVBoxLayout(content)
        content_layout.setContentsMargins(4, 4, 4, 4)
        content_layout.addWidget(self.run_panel.native)
        content_layout.addWidget(self.tabs)
        content_layout.addWidget(widgets.Container(widgets=[self.save_button, self.report_button],
                                                   layout="horizontal", labels=False).native)
        content_layout.addStretch()
        _narrow(content)
        # Scrolls rather than growing the window: the form is taller than a 800-pixel screen.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        self.setMinimumWidth(DOCK_MIN_WIDTH)
        self.setMaximumWidth(DOCK_MAX_WIDTH)
        self.plot_dock: QDockWidget | None = napari_viewer.window.add_dock_widget(
            self.plot, name=PLOT_DOCK_NAME, area="right")
        self.plot_dock.hide()  # shown by the first run: an empty plot would only take room
        # Closing the viewer deletes its window (and this dock with it) without closing or
        # un-parenting the workbench: follow the window the plot dock was added to, docked or not.
        self._viewer_window: QWidget | None = self.plot_dock.window()
        self._viewer_window.installEventFilter(self)

        self.outcome: RunOutcome | None = None
        self.selection: RunSelection | None = None
        self.worker = None
        self.report_worker = None
        self.last_run_seconds: float | None = None
        self.last_report: Path | None = None
        # The outcome whose QC report the worker is writing; then whether the run folder's report.html
        # is the page of the outcome on screen: a Save keeps only its own run's page (and a page goes
        # only beside its own run's saved outputs: _refuse_beside_another_run).
        self._reporting: RunOutcome | None = None
        self._report_is_of_outcome = False
        # The ids of the flags the page being written lists; then those the page of the outcome on
        # screen lists (None while it has none): the page copies the flags, later ones are not on it.
        self._reporting_flags: frozenset[str] = frozenset()
        self._flags_in_report: frozenset[str] | None = None
        # Why the run on screen has no volume metrics (for its QC report), once computing them failed.
        self._metrics_missing: str | None = None
        # The metrics.json of the run on screen, owed to a Save made before its volume metrics came.
        self._metrics_promise: MetricsPromise | None = None
        # The pair being run, when it started and the metrics.json its worker owes, until the worker finishes.
        self._running: tuple[RunSelection, float, MetricsPromise] | None = None
        # The running run's token until its layers are drawn: from then on it can no longer be cancelled.
        self._cancel: CancelToken | None = None
        self._activity: progress | None = None
        self._spinners: list[tuple[QMovie, int]] = []  # (napari's animation, its own speed) while a run is open
        self._engines: dict[tuple, FusionEngine] = {}
        self._docked = False
        self._released = False
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._show_progress)

        self.run_panel.run_button.changed.connect(self.start_run)
        self.run_panel.cancel_button.changed.connect(self.cancel_run)
        self.save_button.changed.connect(self.save_outputs)
        self.report_button.changed.connect(self.write_qc_report)
        self.qc_panel.next_suspicious.changed.connect(lambda: self.go_to_suspicious(+1))
        self.qc_panel.previous_suspicious.changed.connect(lambda: self.go_to_suspicious(-1))
        for button in (self.annotation_panel.flag_slice, self.annotation_panel.flag_region,
                       self.annotation_panel.delete):  # after the panel's own handler, connected first
            button.changed.connect(self._say_whether_the_report_lists_the_flags)
        for widget in (self.run_panel.reference, self.run_panel.moving, self.run_panel.checkpoint,
                       self.run_panel.checkpoint_file, self.run_panel.task, self.run_panel.moving_modality,
                       self.run_panel.tile_size, self.run_panel.output_root):
            widget.changed.connect(self._select_run)
        napari_viewer.dims.events.current_step.connect(self._on_slice_changed)
        self.results.on_outputs_deleted = self._select_run  # flags follow what is on screen
        self._select_run()

    # ---- placement and cleanup -----------------------------------------------------------------
    def event(self, event: QEvent) -> bool:
        """napari removes a dock by un-parenting its widget (no close event): release the viewer then."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None and not self._docked:
                self._docked = True
                QTimer.singleShot(0, self._fit_to_window)
            elif self.parent() is None and self._docked:
                self.release_viewer()
        return super().event(event)

    def closeEvent(self, event) -> None:
        self.release_viewer()
        super().closeEvent(event)

    def eventFilter(self, watched, event: QEvent) -> bool:
        """Release the viewer as its window closes, before a run's end can draw into it. A close
        from code (``viewer.close()``) always goes through; one from the window's close button may
        be cancelled in napari's confirmation dialog, so for that one wait until the window is
        being deleted (Qt deletes it only when the close went through)."""
        if watched is self._viewer_window and (
                (event.type() == QEvent.Type.Close and not event.spontaneous())
                or event.type() == QEvent.Type.DeferredDelete):
            self.release_viewer()
        return super().eventFilter(watched, event)

    def release_viewer(self) -> None:
        """Disconnect every viewer event, stop the timer and any run, and remove the plot dock."""
        if self._released:
            return
        self._released = True
        self._viewer_window.removeEventFilter(self)
        self._viewer_window = None  # a closed window kept from deletion would keep the whole viewer too
        if self._cancel is not None:
            self._cancel.cancel()
        self.method_compare.release()
        self.annotation_panel.disconnect_viewer()
        self._close_activity()
        self.viewer.dims.events.current_step.disconnect(self._on_slice_changed)
        self.results.disconnect_viewer()
        self.run_panel.disconnect_viewer()
        self.plot.disconnect_viewer()
        if self.plot_dock is not None:
            try:
                self.viewer.window.remove_dock_widget(self.plot_dock)
            except (LookupError, RuntimeError):  # the window is already closing its docks
                pass
            self.plot_dock = None

    def _fit_to_window(self) -> None:
        """Once docked: a fifth of the window's width, and the image refitted to the canvas left."""
        if self._released:
            return
        window, dock = self.window(), _dock_of(self)
        if isinstance(window, QMainWindow) and dock is not None:
            width = int(np.clip(DOCK_WIDTH_FRACTION * window.width(), DOCK_MIN_WIDTH, DOCK_MAX_WIDTH))
            window.resizeDocks([dock], [width], Qt.Orientation.Horizontal)
        self.viewer.reset_view()

    def _show_plot_dock(self) -> None:
        if self.plot_dock is None or self.plot_dock.isVisible():
            return
        self.plot_dock.show()
        # The Qt objects themselves: napari hands plugins proxies of its own, which Qt calls refuse.
        window, own, plot = self.window(), _dock_of(self), _dock_of(self.plot)
        if isinstance(window, QMainWindow) and own is not None and plot is not None:
            plot_height = int(PLOT_HEIGHT_FRACTION * window.height())
            window.resizeDocks([own, plot], [window.height() - plot_height, plot_height], Qt.Orientation.Vertical)

    # ---- run selection -------------------------------------------------------------------------
    def _select_run(self, _value=None) -> None:
        """Follow the form: the folder the next run goes to, and the runs folder the cohort export
        searches. Until a run or a Methods-tab comparison is on screen, and again once every layer of
        the run was deleted, the pair the form describes is also what annotations are about (flags
        made on the inputs); while a run is on screen Save, the QC report and annotations stay with it,
        whatever the form is changed to for the next one."""
        self.annotation_panel.runs_root = Path(self.run_panel.output_root.value)
        try:
            selection = self.run_panel.selection()
        except UniFuseError as error:  # what keeps the form from naming a folder, not always the images
            self.run_panel.folder_label.value = f"({error})"
            if self.outcome is None:
                self.selection = None  # incomplete form: the Run button explains what is missing
            return
        self.run_panel.folder_label.value = str(selection.folder)
        if self.outcome is None:
            self.selection = selection
        if (self.outcome is None or not self.results.outputs_on_screen) and self.method_compare.compared is None:
            reference = self.viewer.layers[selection.reference_name]
            self._show_the_plane_of_a_one_slice_volume(reference)
            self.annotation_panel.set_run(selection.folder, Path(self.run_panel.output_root.value), reference,
                                          subject=INPUTS_SUBJECT, pair=(selection.reference_name,
                                                                        selection.moving_name))
            self._say_whether_the_report_lists_the_flags()

    def _show_the_plane_of_a_one_slice_volume(self, layer) -> None:
        """Slide along the one-voxel axis of a one-slice volume: napari's first view of a one-slice
        coronal or sagittal volume is a line one pixel high per z step, not the image. Other volumes
        keep the view the reviewer chose."""
        axis = single_slice_axis_of(layer.data.shape[:layer.ndim])
        if axis is None:
            return
        offset = self.viewer.dims.ndim - layer.ndim
        plane = [offset + a for a in range(layer.ndim) if a != axis]
        self.viewer.dims.order = (*[a for a in self.viewer.dims.order if a not in plane], *plane)

    # ---- running -------------------------------------------------------------------------------
    @reports_errors("Run UniFuse")
    def start_run(self) -> None:
        if self.worker is not None:
            raise InputError("a run is already in progress; wait for it or press Cancel")
        selection = self.run_panel.selection()  # raises the clear message when the form is incomplete
        self._cancel = cancel = CancelToken()
        # The run on screen (and its canvas text, its promised metrics.json) stays until this one's layers are drawn.
        promise = MetricsPromise()
        self._running = (selection, time.perf_counter(), promise)
        # napari keeps every worker, its function and its signals' slots until the viewer closes: the
        # function is static (a bound one would keep this workbench), the slots are bound methods
        # (which Qt holds weakly) and the generator lets go of its arguments when it ends.
        worker = create_worker(self._compute, selection, cancel, self._engines, self._relay.progressed.emit, promise)
        worker.yielded.connect(self._show_outcome)
        worker.returned.connect(self._finish_run)
        worker.finished.connect(self._run_finished)
        self.worker = worker
        self._activity = progress(total=1, desc="UniFuse: starting")
        self._slow_spinners()
        worker.start()
        self.run_panel.set_running(True)
        self.run_panel.status.value = "starting…"

    @staticmethod
    def _compute(selection: RunSelection, cancel: CancelToken, engines: dict[tuple, FusionEngine],
                 progressed: ProgressCallback, promise: MetricsPromise,
                 ) -> Generator[RunOutcome, None, VolumeMetrics | WorkerFailed]:
        """Worker thread: load (or reuse, from ``engines``) the engine, fuse, compute the review maps
        and yield them to be drawn (a WorkerFailed returned instead when that fails); then return the
        whole-volume metrics, written to the folder of a Save made meanwhile (``promise``)."""
        try:
            outcome = UniFuseWorkbench._fuse_and_analyse(selection.request, cancel, engines, progressed)
            cancel.raise_if_cancelled()
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish_run
            return WorkerFailed(error, "Run UniFuse")
        yield outcome
        if cancel.cancelled:  # Cancel came before the layers were drawn, so _show_outcome drew none
            return _cancelled_before_drawing()
        progressed("volume metrics", 0, 1)
        try:
            metrics = volume_metrics(outcome)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish_run
            return VolumeMetrics(None, WorkerFailed(error, "Volume metrics (the layers are complete)"))
        try:
            promise.fulfil(metrics)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _finish_run
            return VolumeMetrics(metrics, WorkerFailed(error, f"Save {METRICS_FILE} (the other outputs are saved)"))
        progressed("volume metrics", 1, 1)
        return VolumeMetrics(metrics)

    @staticmethod
    def _fuse_and_analyse(request: RunRequest, cancel: CancelToken, engines: dict[tuple, FusionEngine],
                          progressed: ProgressCallback) -> RunOutcome:
        key = engine_key(request)
        if key not in engines:
            progressed("load model", 0, 1)
            engines[key] = build_engine(request.checkpoint, model_dimensions(request.reference), request.device,
                                        request.tile_size)
        return run_and_analyse(request, engines[key], progressed, cancel)

    def cancel_run(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
            self.run_panel.status.value = "cancelling at the next step…"

    def _show_progress(self, stage: str, done: int, total: int) -> None:
        if self._released:  # the run is being cancelled and the form may be gone with the window
            return
        self.run_panel.progress.max = max(total, 1)
        self.run_panel.progress.value = done
        if self._cancel is not None and self._cancel.cancelled:
            # A tile or step that was under way when Cancel was pressed still reports: not a run going on.
            step = "fuse tile" if stage == "fuse" else f"'{stage}' step"
            self.run_panel.status.value = f"cancelling: waiting for the current {step} to finish…"
        else:
            unit = f" tile {done}/{total}" if stage == "fuse" else ""
            self.run_panel.status.value = f"{stage}{unit}"
        activity = self._activity  # napari's activity panel: same stage, same count
        if activity is not None:
            # Its events can let Qt deliver the run's end, which closes it (and makes it ignore updates).
            activity.update(done - activity.n)
            activity.total = max(total, 1)
            activity.set_description(f"UniFuse: {stage}")

    def _close_activity(self) -> None:
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        for movie, speed in self._spinners:
            try:
                movie.setSpeed(speed)
            except RuntimeError:  # the window closed first and took its indicator with it
                pass
        self._spinners = []

    def _slow_spinners(self) -> None:
        """Slow every animated label of the window (napari's in-progress indicator) for the run."""
        movies = [movie for label in self.window().findChildren(QLabel) if (movie := label.movie()) is not None]
        self._spinners = [(movie, movie.speed()) for movie in movies]
        for movie in movies:
            movie.setSpeed(ACTIVITY_SPINNER_SPEED_PERCENT)

    def _run_finished(self) -> None:
        self.worker = None
        self._cancel = None
        self._running = None
        if self._released:  # the form may have been deleted with the viewer's window
            return
        self._close_activity()
        self.run_panel.set_running(False)
        # `returned` (which says how the run ended once its layers are drawn) comes before `finished`.
        if self.run_panel.status.value not in (RUN_DONE, RUN_DONE_WITHOUT_METRICS):
            self.run_panel.status.value = "stopped"

    def _finish_run(self, finished: VolumeMetrics | WorkerFailed) -> None:
        promise = self._running[2]
        if promise.written is not None:  # a file: said even with the workbench closed
            show_info(f"Saved the volume metrics to {promise.written}")
        if self._released:  # closed while the worker ran: its viewer and widgets are no longer ours
            return
        if self._cancel is not None and self._cancel.cancelled:
            # Cancelled after the worker's last look but before _show_outcome: it drew nothing.
            finished = _cancelled_before_drawing()
        if isinstance(finished, WorkerFailed):  # the run itself failed: nothing was drawn
            report_error(finished.error, finished.action)
            return
        if finished.failure is not None:
            report_error(finished.failure.error, finished.failure.action)
        # The layers are drawn: the report and Save describe them, with the metrics or saying why not.
        self.outcome.volume_metrics = finished.metrics
        if finished.metrics is None:
            self._metrics_missing = _why_metrics_are_missing(finished.failure.error)
        self.metrics_panel.show_metrics(volume=finished.metrics or {})
        self.report_button.enabled = True
        self.run_panel.status.value = RUN_DONE if finished.metrics is not None else RUN_DONE_WITHOUT_METRICS

    def _show_outcome(self, outcome: RunOutcome) -> None:
        if self._released or self._cancel.cancelled:  # a cancelled run ends in _finish_run's notification
            return
        self._cancel = None  # drawn: closing the viewer now leaves the volume metrics to finish, as promised
        started_with, started, promise = self._running
        # Its layers may have been renamed while it ran, and its folder, chosen when it started, made
        # meanwhile under other names by another workbench on the same images: this run joins it.
        selection = replace(started_with.under_current_names(), folder=joined_run_folder(started_with.folder))
        self.outcome, self.selection, self._metrics_promise = outcome, selection, promise
        self._metrics_missing = None
        self._report_is_of_outcome = False
        self._flags_in_report = None
        self.annotation_panel.report_note.value = ""
        self.run_panel.last_run_pair = (selection.reference_name, selection.moving_name)
        result = outcome.result
        method = result.provenance["method"]["name"]
        self.method_compare.leave_side_by_side(method)  # the overlays below sit on the fused image, one view
        self.results.show(outcome, selection.reference_name, selection.moving_name)
        self._annotate_run(selection, method)
        self.plot.show_probabilities(result.slice_class_probs, result.class_names, selection.request.task,
                                     result.quality, result.class_caveat)
        self._show_plot_dock()
        self._show_suspicion(result.quality)
        self.annotation_panel.forget_suggestion()  # it named a slice of the last run, flagged by its maps
        self.metrics_panel.show_metrics(volume={})  # the last run's values are not this one's
        self.viewer.reset_view()
        self._on_slice_changed()
        self.save_button.enabled = True
        self.report_button.enabled = False  # the report holds the volume metrics, which come next
        self.run_panel.cancel_button.enabled = False  # the run is done: only those metrics are left
        self.last_run_seconds = time.perf_counter() - started
        show_warnings(outcome.notes)
        if selection.request.checkpoint.startswith("untrained"):
            show_warnings(["These outputs come from an UNTRAINED model (random weights): use them only to "
                           "try the workbench, never for reading."])
        show_info(f"UniFuse finished in {self.last_run_seconds:.1f} s; outputs are in the layer list. "
                  "Press 'Save outputs' to write them.")

    @reports_errors("Annotations of the run")
    def _annotate_run(self, selection: RunSelection, method: str) -> None:
        """Point the Annotate tab at the run on screen: its folder, drawn on its grid (the fused
        layer's), its flags recording the arrays it read. Guarded: flags that cannot be read must not
        keep the run from being saved."""
        self.annotation_panel.method.value = method  # first: set_run keeps a method it finds there
        request = selection.request
        fused = self.results.layer("fused")
        self._show_the_plane_of_a_one_slice_volume(fused)
        self.annotation_panel.set_run(selection.folder, Path(self.run_panel.output_root.value), fused,
                                      subject="run", pair=(selection.reference_name, selection.moving_name),
                                      pair_arrays=(request.reference.array, request.moving.array))
        elsewhere = [str(folder / ANNOTATIONS_FILE) for folder in other_folders_of_run(selection.folder)
                     if (folder / ANNOTATIONS_FILE).is_file()]
        if elsewhere:  # two workbenches ran these images under other layer names before either made a folder
            show_warnings([f"Flags on this run are also in {', '.join(elsewhere)} (the same images and settings, "
                           "run under other layer names before either folder existed); they are not listed here "
                           f"nor in its QC report, whose flags come from {selection.folder / ANNOTATIONS_FILE}. "
                           "Add those lines to that file to list them here."])

    def _on_slice_changed(self, _event=None) -> None:
        fused = self.results.layer("fused")
        if self.outcome is None or fused is None:
            return
        axis, index = viewed_slice(self.viewer, fused)
        stored_slice = self._current_stored_slice(fused)
        self.plot.set_slice(stored_slice)
        self.annotation_panel.follow_viewed_slice(stored_slice)
        self.metrics_panel.show_metrics(slice_values=slice_metrics(self.outcome, axis, index))

    def _current_stored_slice(self, fused) -> int:
        """The index along the ``fused`` layer's first array axis (the plot's and the quality scores'
        axis: world z for a volume in world axis order, as every run fuses one) of the viewed position;
        0 for a 2D image."""
        if fused.ndim < 3:
            return 0
        axis, index = viewed_slice(self.viewer, fused)
        if axis == 0:
            return index
        # Sliced along another axis, or the 3D view (no slice): the sliders keep their position, follow it.
        index = round(fused.world_to_data(self.viewer.dims.point[-fused.ndim:])[0])
        return int(np.clip(index, 0, fused.data.shape[0] - 1))

    # ---- where not to trust the result ----------------------------------------------------------
    def _show_suspicion(self, quality: QualityMaps | None) -> None:
        flagged = quality.suspicious_slices() if quality is not None else []
        for button in (self.qc_panel.next_suspicious, self.qc_panel.previous_suspicious):
            button.enabled = bool(flagged)
        # First, as in the report: where a map flags every slice, none standing out is no good news.
        whole_volume = whole_volume_text(quality)
        if quality is None:
            self.qc_panel.suspicion.value = "no quality maps for this run"
        elif not flagged:
            self.qc_panel.suspicion.value = whole_volume or "no slice is flagged by the quality maps"
        else:
            unit = "slice" if quality.slice_count > 1 else "image"
            counted = f"{len(flagged)} of {quality.slice_count} {unit}{'s' if quality.slice_count > 1 else ''} flagged"
            self.qc_panel.suspicion.value = f"{whole_volume}\n{counted}" if whole_volume else counted
        outside = outside_moving_text(quality)
        if outside:  # the report says it under its verdict; a reviewer here must not miss it either
            self.qc_panel.suspicion.value += f"\n{outside}"

    @reports_errors("Suspicious slice")
    def go_to_suspicious(self, step: int) -> int | None:
        """Move the viewer to the next (``step`` > 0) or previous suspicious slice along the first
        array axis (the quality maps' slices, docs/quality_maps.md) and pre-fill the annotation category with what the quality maps flag there."""
        if self.outcome is None or self.outcome.result.quality is None:
            raise InputError("run UniFuse first: the quality maps say which slices to look at")
        fused = self.results.layer("fused")
        if fused is None:
            raise InputError("the fused layer was deleted; run again to review this pair")
        quality = self.outcome.result.quality
        target = quality.next_suspicious(self._current_stored_slice(fused), step)
        if target is None:
            show_info("No slice is flagged by the quality maps.")
            return None
        if quality.slice_axis is not None:  # one image (a one-slice volume along any axis) is on screen as it is
            self._show_stored_slice(fused, target)
        problem = quality.dominant_problem(target)
        # The share the flagging map flags, not the slice's largest score (often another map's, as
        # high on every slice): "hallucinated structure, 0.2 % flagged", not "…, 35.5 % flagged".
        share = quality.slice_scores[quality.flagged_by(target)[0]][target]
        self.annotation_panel.suggest(problem, None if quality.slice_axis is None else target,
                                      f"{problem}, {100 * share:.1f} % flagged")
        return target

    def _show_stored_slice(self, fused, index: int) -> None:
        """Put the viewer on slice ``index`` along the ``fused`` layer's first array axis (through its
        centre), sliced along that axis: the plot and the quality maps' scores are per slice along it,
        whatever its world direction, so slicing along another axis would show another slice than the
        one named."""
        if fused.ndim < 3:
            return
        offset = self.viewer.dims.ndim - fused.ndim
        if self.viewer.dims.ndisplay == 3:
            self.viewer.dims.ndisplay = 2
        if offset in self.viewer.dims.displayed:  # the first axis is on screen, not sliced: make it the slider
            # The other two down and across, as napari first shows a volume: rolled views leave them swapped.
            stored_order = (offset, offset + 1, offset + 2)
            others = [axis for axis in self.viewer.dims.order if axis not in stored_order]
            self.viewer.dims.order = (*others, *stored_order)
            show_info("Switched to slices along the first array axis of the outputs (world z: every run fuses a "
                      "volume in world axis order): the quality maps score those slices.")
        position = (np.asarray(fused.data.shape, dtype=float) - 1) / 2
        position[0] = index
        show_data_position(self.viewer, fused, position)
        _, shown = viewed_slice(self.viewer, fused)
        if shown != index:
            # napari cuts a tilted volume as if it were straight: its sliders cannot reach every slice.
            show_info(f"napari cannot reach stored slice {index} of this tilted volume; it shows slice {shown}, "
                      "the nearest it can.")

    # ---- QC report -----------------------------------------------------------------------------
    @reports_errors("QC report")
    def write_qc_report(self) -> None:
        """Write the run's QC report in a worker thread; a notification gives its path."""
        if self.outcome is None or self.selection is None:
            raise InputError("run UniFuse first; the report describes a run")
        if not self._metrics_settled():
            raise InputError("the volume metrics are still being computed; the report holds them, so wait for "
                             "them (the Metrics tab fills in)")
        if self.report_worker is not None:
            raise InputError(REPORT_BEING_WRITTEN)
        # Its settings name the folder, so what Save left there is of this pair, model and settings; a
        # run with another ground truth or device shares it, and its provenance, metrics and error map
        # differ: the page goes beside this run's own saved files, or beside none. Said here at once,
        # and checked again under the folder's lock (another workbench may save in between).
        result = self.outcome.result
        _refuse_beside_another_run(self.selection.folder, result.provenance)
        if self._metrics_missing is not None:  # said at the top of the page, with the run's other warnings
            result = replace(result, warnings=[*result.warnings, self._metrics_missing])
        # The run's own flags: the Annotate tab may be on a Methods-tab comparison of another pair.
        # Handed over, not passed: napari keeps a function worker's arguments as long as the viewer.
        annotations = AnnotationStore(self.selection.folder).load()
        worker = create_worker(self._build_report, WorkerHandover(
            (result, self.outcome.volume_metrics, self.selection, annotations)))
        worker.returned.connect(self._report_written)
        worker.finished.connect(self._report_finished)
        self.report_worker, self._reporting = worker, self.outcome
        self._reporting_flags = frozenset(annotation.id for annotation in annotations)
        self.report_button.enabled = False
        worker.start()

    @staticmethod
    def _build_report(handover: WorkerHandover[tuple[FusionResult, dict[str, float] | None, RunSelection, list]],
                      ) -> Path | WorkerFailed:
        result, metrics, selection, annotations = handover.take()
        try:
            with output_folder_lock(selection.folder):  # not while a `unifuse fuse` or a Save writes there
                _refuse_beside_another_run(selection.folder, result.provenance)
                # The inputs as the outputs hold them, as `unifuse fuse --report` shows them: a script's
                # layer stored head to foot or with permuted axes is drawn on the outputs' grid.
                return write_report(result, selection.folder, reference=selection.request.reference.in_world_axis_order(),
                                    moving=selection.request.moving.in_world_axis_order(), annotations=annotations,
                                    metrics=metrics)
        except Exception as error:  # noqa: BLE001 - reported on the GUI thread by _report_written
            return WorkerFailed(error, "QC report")

    def _metrics_settled(self) -> bool:
        """Whether the run on screen has its volume metrics, or will never have them."""
        return self.outcome.volume_metrics is not None or self._metrics_missing is not None

    def _report_finished(self) -> None:
        self.report_worker = self._reporting = None

    def _report_written(self, outcome: Path | WorkerFailed) -> None:
        self.report_button.enabled = self.outcome is not None and self._metrics_settled()
        if isinstance(outcome, WorkerFailed):
            report_error(outcome.error, outcome.action)
            return
        self.last_report = outcome
        if self._reporting is self.outcome:  # not when another run was shown while it was written
            self._report_is_of_outcome = True
            self._flags_in_report = self._reporting_flags
            self._say_whether_the_report_lists_the_flags()
        show_info(f"QC report written: {outcome}")

    def _say_whether_the_report_lists_the_flags(self, _value=None) -> None:
        """Under the flags, which of them the run's QC report leaves out: it copies them when it is
        written, and a reviewer who flags on must know to write it again. Only while the tab lists
        the run's folder: another's flags (a comparison's, the inputs') are in no report of it."""
        note = ""
        if (self._flags_in_report is not None and self.selection is not None
                and self.annotation_panel.store.run_dir == self.selection.folder):
            try:
                live = {annotation.id for annotation in AnnotationStore(self.selection.folder).load()}
            except UniFuseError:  # the Annotate tab says why the flags cannot be read
                live = set(self._flags_in_report)
            changes = [_count(len(live - self._flags_in_report), "flag"),
                       _count(len(self._flags_in_report - live), "withdrawn flag")]
            changes = [change for change in changes if change]
            if changes:
                note = f"The QC report predates {' and '.join(changes)}; press QC report to rewrite it."
        self.annotation_panel.report_note.value = note

    # ---- saving --------------------------------------------------------------------------------
    @reports_errors("Save outputs")
    def save_outputs(self) -> dict[str, Path]:
        if self.outcome is None or self.selection is None:
            raise InputError("run UniFuse first; there is nothing to save yet")
        if self.report_worker is not None:
            raise InputError(REPORT_BEING_WRITTEN)
        folder = self.selection.folder
        result = self.outcome.result
        # Its worker computes them after drawing the layers; the promise is this run's, whatever run started since.
        metrics_coming = not self._metrics_settled()
        map_suffix = review_map_extension(result)  # MetaImage where NIfTI would misplace them (a sheared grid)
        maps = dict(zip(REVIEW_MAP_NAMES, (self.outcome.error_map, self.outcome.jacobian, self.outcome.folding),
                        strict=True))
        inputs = {Path(v.source).resolve() for v in (self.selection.request.reference, self.selection.request.moving)
                  if v.source and Path(v.source).exists()}
        planned = [folder / f"{name}.{map_suffix}" for name in maps]
        if any(path.resolve() in inputs for path in planned) or folder.resolve() in {p.parent for p in inputs}:
            raise InputError("the run folder holds an input image; choose another runs folder so inputs are never "
                             "overwritten", folder)
        # Written where the fused image is, with the reference header's forms (io.nifti_xforms).
        review_maps = {path.name: ImageVolume(array, result.fused.geometry,
                                              {"role": name, **placement_metadata(result.fused.metadata)})
                       for (name, array), path in zip(maps.items(), planned, strict=True)}
        with warnings.catch_warnings(record=True) as caught:  # a PNG loses the layers' spacing: say so here
            warnings.simplefilter("always")
            # With the maps, under the folder's lock like `unifuse fuse`: all or nothing moves in.
            metrics = self.outcome.volume_metrics
            # A report.html there that is not this run's page (an earlier run's) goes, as the other outputs do.
            written = write_fusion_outputs(result, folder, extra_images=review_maps,
                                           metrics=None if metrics is None else metrics_file_contents(metrics),
                                           remove_report=not self._report_is_of_outcome)
        show_warnings(dict.fromkeys(str(warning.message) for warning in caught))
        if metrics_coming:
            self._metrics_promise.keep_in(folder, result.provenance)
            show_info(f"Saved {len(written)} files to {folder}; {METRICS_FILE} will be written when the "
                      "volume metrics finish")
        elif metrics is None:  # no worker left and no metrics: they failed, and the status said why
            show_info(f"Saved {len(written)} files to {folder}; no {METRICS_FILE}: the volume metrics failed")
        else:
            show_info(f"Saved {len(written)} files to {folder}")
        return written


def _count(number: int, noun: str) -> str:
    """"2 flags", "1 flag", or "" for none."""
    return f"{number} {noun}{'s' if number > 1 else ''}" if number else ""


def _cancelled_before_drawing() -> WorkerFailed:
    """How a run ends whose Cancel came after its analysis but before its layers were drawn."""
    return WorkerFailed(Cancelled("the run was cancelled before its layers were drawn"), "Run UniFuse")


def _why_metrics_are_missing(error: Exception) -> str:
    """The QC report's line for a run whose volume metrics could not be computed."""
    cause = ("the computer ran out of memory" if is_out_of_memory(error)
             else f"computing them failed ({type(error).__name__}: {error})")
    return f"The volume metrics are missing: {cause}. Run UniFuse again to compute them."
